"""Request ids: every HTTP request and WebSocket connection gets one, an ASGI middleware.

:class:`RequestIdMiddleware` takes the caller's ``X-Request-ID`` when it is 1-64 characters of
``A-Za-z0-9._-`` (so a proxy's id runs through), else makes a new one (32 hex characters). The id
is put in ``scope["state"]["request_id"]`` (``request.state.request_id``), bound to structlog's
context variables for every log line written while the request runs, and sent back as the
``X-Request-ID`` response header; the error handlers add it to every error body
(``{"error": {..., "request_id"}}``).
"""

from __future__ import annotations

import re
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HEADER", "RequestIdMiddleware", "request_id_of"]

HEADER = "x-request-id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_of(scope: Scope) -> str | None:
    """The request id the middleware gave ``scope`` (None outside it)."""
    state = scope.get("state") or {}
    value = state.get("request_id")
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Give each HTTP request and WebSocket connection a request id (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = next(
            (
                v.decode("latin-1")
                for k, v in scope.get("headers", ())
                if k.lower() == HEADER.encode()
            ),
            "",
        )
        request_id = given if _VALID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        raw = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((HEADER.encode(), raw))
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)
