"""Keyset pages for the services' list methods (the API's cursor pagination, docs/api.md).

A list method takes ``after`` (the sort key of the last item of the previous page, or None for
the first page) and ``limit`` (None: every item). It orders its rows by a stable unique key and,
with a limit, returns up to ``limit + 1`` items, so that the caller learns whether a next page
exists without a second query (the API layer trims the extra item and turns the key of the
page's last item into the next cursor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["Key", "keyset", "keyset_in_memory"]

Key = tuple[Any, ...]
T = TypeVar("T")
_S = TypeVar("_S", bound=Select[Any])


def keyset(
    q: _S, columns: Sequence[ColumnElement[Any]], after: Key | None, limit: int | None
) -> _S:
    """``q`` ordered by ``columns`` (a unique key, e.g. ``(created_at, id)``), restricted to the
    rows whose key is greater than ``after`` (when given), and limited to ``limit + 1`` rows
    (when ``limit`` is given). ``after`` must have one value per column."""
    if after is not None:
        if len(columns) == 1:
            q = q.where(columns[0] > after[0])
        else:
            q = q.where(tuple_(*columns) > tuple_(*after))
    q = q.order_by(*columns)
    if limit is not None:
        q = q.limit(limit + 1)
    return q


def keyset_in_memory(
    items: Sequence[T], key: Callable[[T], Key], after: Key | None, limit: int | None
) -> list[T]:
    """The same page as :func:`keyset` over items already read (lists assembled from several
    queries): sorted by ``key``, those after ``after``, at most ``limit + 1`` of them."""
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [item for item in ordered if key(item) > after]
    return ordered if limit is None else ordered[: limit + 1]
