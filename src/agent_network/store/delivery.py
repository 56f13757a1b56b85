"""Durable delivery cursors of realtime consumers (table ``delivery_cursors``).

A cursor is keyed ``(subscriber_id, name, thread_id)``: the subscriber is the principal's subject
(a user, an agent, or an org for an org key), ``name`` is chosen by the consumer (one subscriber
may run several consumers), and ``seq`` is the last envelope seq the consumer acknowledged in the
thread. Cursors only move forward: acknowledging an older seq changes nothing.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.model.ids import now_iso
from agent_network.store.tables import delivery_cursors

MAX_NAME = 100  # characters of a cursor name (the column's width)


async def read_cursor(conn: AsyncConnection, subscriber_id: str, name: str, thread_id: str) -> int:
    """The acknowledged seq of cursor ``(subscriber_id, name, thread_id)``; 0 if it does not
    exist yet."""
    q = select(delivery_cursors.c.seq).where(
        delivery_cursors.c.subscriber_id == subscriber_id,
        delivery_cursors.c.name == name,
        delivery_cursors.c.thread_id == thread_id,
    )
    seq = (await conn.execute(q)).scalar_one_or_none()
    return int(seq) if seq is not None else 0


async def advance_cursor(
    conn: AsyncConnection, subscriber_id: str, name: str, thread_id: str, seq: int
) -> int:
    """Move the cursor forward to ``seq`` (create it if needed; never move it back) in the
    caller's transaction, with one atomic upsert (safe against concurrent acks from several
    connections or processes). Returns the cursor's seq afterwards (``>= seq``)."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = ins(delivery_cursors).values(
        subscriber_id=subscriber_id, name=name, thread_id=thread_id, seq=seq, updated_at=now_iso()
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[
            delivery_cursors.c.subscriber_id,
            delivery_cursors.c.name,
            delivery_cursors.c.thread_id,
        ],
        set_={"seq": stmt.excluded.seq, "updated_at": stmt.excluded.updated_at},
        where=delivery_cursors.c.seq < stmt.excluded.seq,
    )
    await conn.execute(stmt)
    return await read_cursor(conn, subscriber_id, name, thread_id)
