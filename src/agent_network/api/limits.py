"""Request bodies are bounded before they are read whole: an ASGI middleware.

:class:`BodyLimitMiddleware` answers ``413 body_too_large`` (the project's error body) for a
request whose ``Content-Length`` exceeds the limit without reading any of it, and stops reading a
body sent without a length (chunked) as soon as it passes the limit. JSON bodies, at most the
limit in size, are also checked for nesting and for U+0000 in strings
(:func:`agent_network.json_limits.parse_json`) and refused with ``422 json_too_deep`` or
``422 nul_character`` before any route parses them; a URL holding U+0000 is refused the same way
(PostgreSQL text cannot store it, so no engine gets it). Knowledge uploads
(``POST .../knowledge``) have their own, larger limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_network.json_limits import JsonInputError, NulCharacterError, parse_json

__all__ = ["BodyLimitMiddleware"]


async def _send_error(send: Send, status: int, code: str, message: str, details: Any) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse HTTP request bodies over a size limit (413) or JSON nested too deep (422).

    Args:
        app: The ASGI app to protect.
        max_body_bytes: Largest body accepted, in bytes, for every route but uploads.
        max_upload_bytes: Largest body of a knowledge upload (``POST`` to a path ending in
            ``/knowledge``), in bytes.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/knowledge"):
            return self.max_upload_bytes
        return self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (
            b"%00" in scope.get("query_string", b"") or "\x00" in scope.get("path", "")
        ):
            err = NulCharacterError(
                "the URL must not contain the NUL character (U+0000, %00); remove it"
            )
            if scope["type"] == "http":
                await _send_error(send, 422, err.code, err.message, None)
            else:  # refuse the upgrade
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        too_large = f"the request body exceeds {limit} bytes; send less per request"
        if limit > self.max_body_bytes:
            too_large += " (documents can be split over several uploads)"
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, "body_too_large", too_large, {"max_bytes": limit})
            return
        # Read the body here, counting (it is at most `limit` bytes), then hand it on.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, 413, "body_too_large", too_large, {"max_bytes": limit})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if b"json" in headers.get(b"content-type", b"") and body:
            try:
                parse_json(body)
            except JsonInputError as err:
                await _send_error(send, 422, err.code, err.message, err.details)
                return
            except ValueError:
                pass  # malformed JSON: the route answers 422 with the parser's message
        elif b"x-www-form-urlencoded" in headers.get(b"content-type", b"") and b"%00" in body:
            refused = NulCharacterError(
                "form fields must not contain the NUL character (U+0000); remove it"
            )
            await _send_error(send, 422, refused.code, refused.message, None)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette does

        await self.app(scope, replay, send)
