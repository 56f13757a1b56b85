"""Cursor pagination of every list route (docs/api.md#pagination).

A list answers a JSON array of at most ``limit`` items (query ``limit``, 1-1000, default 100).
When more items follow, the answer carries the next page's opaque cursor twice: in the
``X-Next-Cursor`` header and as an RFC 8288 ``Link: <url>; rel="next"`` header whose URL is the
same request with ``cursor`` (and ``limit``) set; both are absent on the last page. The cursor is
the URL-safe base64 (unpadded) of the JSON array of the sort key of the page's last item, e.g.
``["2026-12-03T17:00:00.000001+00:00", "agt_…"]``; clients treat it as opaque. A cursor that does
not decode to a key of the route's shape is a 422 ``invalid_request``.

Routes use :class:`PageQuery` as a dependency, pass :meth:`PageQuery.after` and
:attr:`PageQuery.limit` to the service's list method (which returns up to ``limit + 1`` items,
see :mod:`agent_network.services.paging`), and answer :meth:`PageQuery.page` of its result.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Query, Request, Response

from agent_network.errors import InvalidRequestError

__all__ = [
    "BY_CREATED",
    "BY_ID",
    "BY_KIND_ID",
    "BY_NAME",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "NEXT_CURSOR_HEADER",
    "KeySpec",
    "PageQuery",
    "decode_cursor",
    "encode_cursor",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 1000
NEXT_CURSOR_HEADER = "X-Next-Cursor"

T = TypeVar("T")


@dataclass(frozen=True)
class KeySpec:
    """A list's sort key: the item fields it is made of and their JSON types (``str``,
    ``int``), in order."""

    fields: tuple[str, ...]
    types: tuple[type, ...]

    def of(self, item: Any) -> tuple[Any, ...]:
        """The key of ``item`` (a mapping with the :attr:`fields`)."""
        return tuple(item[f] for f in self.fields)


BY_CREATED = KeySpec(("created_at", "id"), (str, str))
BY_ID = KeySpec(("id",), (int,))
BY_KIND_ID = KeySpec(("kind", "id"), (str, str))
BY_NAME = KeySpec(("name",), (str,))


def encode_cursor(key: Sequence[Any]) -> str:
    """The opaque cursor of a sort key (URL-safe base64 of its JSON array, unpadded)."""
    raw = json.dumps(list(key), separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, spec: KeySpec) -> tuple[Any, ...]:
    """The sort key a cursor of :func:`encode_cursor` holds. InvalidRequestError (422) when it is
    not one (not base64 JSON, or not an array of ``spec``'s length and types)."""
    problem = (
        f"invalid cursor {cursor[:40]!r}: pass the X-Next-Cursor value of the previous page "
        "of this list unchanged (or leave cursor out for the first page)"
    )
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidRequestError(problem, details={"field": "cursor"}) from None
    if not isinstance(value, list) or len(value) != len(spec.types):
        raise InvalidRequestError(problem, details={"field": "cursor"})
    for part, kind in zip(value, spec.types, strict=True):
        if not isinstance(part, kind) or isinstance(part, bool):
            raise InvalidRequestError(problem, details={"field": "cursor"})
    return tuple(value)


class PageQuery:
    """The ``limit`` and ``cursor`` query parameters of a list route (a FastAPI dependency)."""

    def __init__(
        self,
        request: Request,
        response: Response,
        limit: Annotated[
            int,
            Query(ge=1, le=MAX_LIMIT, description="at most this many items (1-1000)"),
        ] = DEFAULT_LIMIT,
        cursor: Annotated[
            str | None,
            Query(
                max_length=MAX_CURSOR_CHARS,
                description="opaque: the X-Next-Cursor of the previous page (absent: first page)",
            ),
        ] = None,
    ) -> None:
        self.request = request
        self.response = response
        self.limit = limit
        self.cursor = cursor

    def after(self, spec: KeySpec) -> tuple[Any, ...] | None:
        """The sort key the page starts after (None for the first page); InvalidRequestError
        for a malformed cursor."""
        return None if self.cursor is None else decode_cursor(self.cursor, spec)

    def page(self, items: list[T], spec: KeySpec, *, drop: Sequence[str] = ()) -> list[T]:
        """The first :attr:`limit` of ``items`` (the service's up to ``limit + 1``); when there
        were more, sets ``X-Next-Cursor`` and ``Link: <…>; rel="next"`` on the response (query
        parameters in ``drop`` are left out of the link)."""
        if len(items) <= self.limit:
            return items
        shown = items[: self.limit]
        cursor = encode_cursor(spec.of(shown[-1]))
        url = self.request.url.remove_query_params(["cursor", "limit", *drop])
        url = url.include_query_params(cursor=cursor, limit=self.limit)
        self.response.headers[NEXT_CURSOR_HEADER] = cursor
        self.response.headers["Link"] = f'<{url}>; rel="next"'
        return shown
