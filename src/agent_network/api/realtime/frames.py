"""Frames of the realtime protocol (WebSocket protocol v1): client frame models, the
``error`` frame, limits and close codes, and the :class:`Transport` a socket adapts to.

The frames themselves are specified in docs/protocol.md.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_network.errors import AgentNetworkError

PROTOCOL_VERSION = 1
AUTH_TIMEOUT = 10.0  # seconds to send the ``auth`` frame when no Authorization header was sent
MAX_FOLLOWS = 1000  # threads one connection may follow at once
REPLAY_PAGE = 500  # envelopes per WAL read while catching up
POSTS_IN_FLIGHT = 64  # posts of one connection processed concurrently (group commit)
POST_GRACE = 10.0  # seconds posts in flight may take to finish after their socket closed
TYPING_INTERVAL = 1.0  # seconds: at most one typing frame per (connection, thread, sender)
NAME_TTL = 30.0  # seconds a sender's display name is cached for rendering
NAME_CACHE_MAX = 50_000
FRAME_CACHE_MAX = 10_000  # rendered envelope frames kept for replays of recent history
HUB_BUFFER = 100_000  # envelopes the fan-out task may fall behind the hub before resubscribing
DB_SLOTS = 6  # concurrent database uses by realtime work (joins, replays, re-checks)
IDLE_HEARTBEATS = 3  # heartbeats of client silence before the connection is closed

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 4000
CLOSE_UNAUTHENTICATED = 4401
CLOSE_LAGGED = 4008
CLOSE_IDLE = 4009


class TransportClosed(Exception):
    """The socket is gone (the peer closed it or the server is tearing it down)."""


class Transport(Protocol):
    """What the service needs from a socket: text frames in and out, and closing it."""

    async def send(self, text: str) -> None:
        """Write one text frame; raise :class:`TransportClosed` when the socket is gone."""

    async def receive(self) -> str | bytes | None:
        """The next frame (``bytes`` for a binary frame), or None once the peer closed."""

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket with ``code`` (no error if it is already closed)."""


def dumps(obj: Any) -> str:
    """``obj`` as compact JSON text (the form of every frame sent)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


PING_TEXT = dumps({"type": "ping"})

# ------------------------------------------------------------------------------ client frames


class Frame(BaseModel):
    """A client frame (every frame may carry a ``ref`` echoed by its reply)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    ref: str | int | None = None


class AuthFrame(Frame):
    token: str


class JoinFrame(Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    after: int | None = Field(default=None, ge=0)
    cursor: str | None = Field(default=None, min_length=1, max_length=100)


class LeaveFrame(Frame):
    thread_id: str = Field(min_length=1, max_length=100)


class PostFrame(Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    content: str
    agent_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None
    causation_id: str | None = Field(default=None, min_length=1, max_length=40)
    audience: list[str] | None = Field(default=None, min_length=1, max_length=200)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=50)


class AckFrame(Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    seq: int = Field(ge=0)
    cursor: str = Field(min_length=1, max_length=100)


class TypingFrame(Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    agent_id: str | None = None
    user_id: str | None = None


class PingFrame(Frame):
    pass


class WatchFrame(Frame):
    """Receive every thread the credential may read (docs/protocol.md, ``watch``)."""

    cursor: str = Field(min_length=1, max_length=100)


class AcksFrame(Frame):
    """Move the watch's cursor in many threads at once: ``{thread_id: seq}``."""

    positions: dict[str, int] = Field(min_length=1, max_length=1000)


FRAME_MODELS: dict[str, type[Frame]] = {
    "auth": AuthFrame,
    "join": JoinFrame,
    "leave": LeaveFrame,
    "post": PostFrame,
    "ack": AckFrame,
    "typing": TypingFrame,
    "ping": PingFrame,
    "pong": PingFrame,
    "watch": WatchFrame,
    "acks": AcksFrame,
}


# frame type -> name of the Connection method handling it (``post`` runs as its own task)
HANDLERS = {
    "join": "_join",
    "leave": "_leave",
    "ack": "_ack",
    "typing": "_typing",
    "ping": "_ping",
    "pong": "_pong",
    "auth": "_auth_again",
    "watch": "_watch",
    "acks": "_acks",
}


def validation_message(kind: str, exc: ValidationError) -> str:
    """The message of the ``error`` frame for a ``kind`` frame that failed validation."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or '(frame)'}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return f"invalid {kind!r} frame: {problems}"


def error_frame(
    err: AgentNetworkError, ref: str | int | None = None, thread_id: str | None = None
) -> dict[str, Any]:
    """The ``error`` frame for ``err`` (REST code and message; ``details`` when it has some)."""
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details:
        body["details"] = err.details
    frame: dict[str, Any] = {"type": "error", "ref": ref, "error": body}
    if thread_id is not None:
        frame["thread_id"] = thread_id
    return frame


def internal_error() -> AgentNetworkError:
    """The error sent for an unexpected failure while handling a frame (500, logged)."""
    err = AgentNetworkError("internal error while handling the frame; it was logged")
    err.code = "internal_error"
    err.status = 500
    return err
