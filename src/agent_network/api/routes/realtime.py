"""The WebSocket endpoint ``/api/v1/ws`` (protocol v1, ``docs/protocol.md``): framing only.

This module accepts the socket, reads the ``Authorization`` header and adapts Starlette's
WebSocket to the realtime protocol's :class:`~agent_network.api.realtime.Transport`; everything
the WebSocket protocol means lives in the ``api/realtime`` package.

Serve the app with :class:`agent_network.api.server.GracefulServer` so that clients get
``disconnect`` ``shutdown`` and close code 1001 when the server stops.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from starlette.websockets import WebSocket, WebSocketDisconnect

from agent_network.api.realtime import RealtimeProtocol, TransportClosed


class StarletteTransport:
    """A Starlette WebSocket as a realtime :class:`~agent_network.api.realtime.Transport`."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, text: str) -> None:
        """Write one text frame; TransportClosed when the socket is gone."""
        try:
            await self.websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosed(str(exc)) from exc

    async def receive(self) -> str | bytes | None:
        """The next frame's text (or bytes for a binary frame); None once the peer closed."""
        try:
            message = await self.websocket.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is not None:
            return str(text)
        data = message.get("bytes")
        return bytes(data) if data is not None else None

    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` (ignored if the socket is already closed)."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.websocket.close(code, reason)


def bearer_token(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header; ``""`` (which never
    authenticates) for any other scheme; None when there is no header."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


async def realtime_socket(websocket: WebSocket) -> None:
    """Realtime protocol v1: authenticate (Bearer header, or an ``auth`` first frame), then
    ``join``/``leave``/``post``/``ack``/``typing``/``ping`` frames; see ``docs/protocol.md``."""
    realtime: RealtimeProtocol = websocket.app.state.realtime
    await websocket.accept()
    await realtime.serve(
        StarletteTransport(websocket), bearer_token(websocket.headers.get("authorization"))
    )


# A plain Starlette route: the socket needs no FastAPI dependency machinery, whose per-request
# state would otherwise stay allocated for the life of every connection.
router = APIRouter(tags=["realtime"])
router.add_websocket_route("/ws", realtime_socket, name="realtime_socket")
