"""Storage of the WAL (``envelopes`` table): batched insert, range reads, idempotency lookup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.model.envelope import Envelope
from agent_network.store.tables import envelopes


def row_to_envelope(row: Row[Any]) -> Envelope:
    """Build an :class:`Envelope` from a row of the ``envelopes`` table."""
    m = row._mapping
    return Envelope(
        thread_id=m["thread_id"],
        seq=m["seq"],
        id=m["id"],
        type=m["type"],
        data=m["data"],
        sender_kind=m["sender_kind"],
        sender_id=m["sender_id"],
        sender_org_id=m["sender_org_id"],
        audience=m["audience"],
        causation_id=m["causation_id"],
        idempotency_key=m["idempotency_key"],
        created_at=m["created_at"],
        prev_hash=m["prev_hash"],
        hash=m["hash"],
    )


async def insert_envelopes(conn: AsyncConnection, batch: Sequence[Envelope]) -> None:
    """Insert ``batch`` with one executemany (the caller owns the transaction)."""
    if batch:
        await conn.execute(envelopes.insert(), [e.as_dict() for e in batch])


async def read_envelopes(
    conn: AsyncConnection, thread_id: str, *, after: int = 0, limit: int | None = None
) -> list[Envelope]:
    """Envelopes of ``thread_id`` with ``seq > after``, in order, at most ``limit`` of them."""
    q = (
        select(envelopes)
        .where(envelopes.c.thread_id == thread_id, envelopes.c.seq > after)
        .order_by(envelopes.c.seq)
    )
    if limit is not None:
        q = q.limit(limit)
    return [row_to_envelope(r) for r in (await conn.execute(q)).all()]


async def find_by_idempotency(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Envelope]:
    """Envelopes already stored under ``(thread_id, idempotency_key)`` pairs, keyed by the pair."""
    if not keys:
        return {}
    cond = or_(
        *(and_(envelopes.c.thread_id == t, envelopes.c.idempotency_key == k) for t, k in keys)
    )
    rows = (await conn.execute(select(envelopes).where(cond))).all()
    found = [row_to_envelope(r) for r in rows]
    return {(e.thread_id, e.idempotency_key or ""): e for e in found}
