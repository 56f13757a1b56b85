"""Durable cursors (table ``cursors``): how far a named consumer has handled a thread.

One row per ``(subscriber_id, name, thread_id)``: the subscriber is the principal's subject (a
user, an agent, or an org for an org key), ``name`` tells one subscriber's consumers apart, and
``seq`` is the last envelope seq that consumer handled. Realtime consumers (WebSocket
``join``/``ack`` frames, hub clients through ``services/delivery.py``) choose their names; the
runner keeps its position as cursor :data:`RUNNER_CURSOR` of the agent it answers as. Cursors
only move forward.
See docs/architecture.md ("Module map and sizes") for where cursors are used.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.model.ids import now_iso
from agent_network.store.tables import cursors

MAX_NAME = 100  # characters of a cursor name (the column's width)
RUNNER_CURSOR = "runner"  # the runner's cursor name; its subscriber is the agent's id


async def read_cursor(conn: AsyncConnection, subscriber_id: str, name: str, thread_id: str) -> int:
    """The seq of cursor ``(subscriber_id, name, thread_id)``; 0 if it does not exist yet."""
    q = select(cursors.c.seq).where(
        cursors.c.subscriber_id == subscriber_id,
        cursors.c.name == name,
        cursors.c.thread_id == thread_id,
    )
    seq = (await conn.execute(q)).scalar_one_or_none()
    return int(seq) if seq is not None else 0


async def ensure_cursor(
    conn: AsyncConnection, subscriber_id: str, name: str, thread_id: str, seq: int
) -> None:
    """Create the cursor at ``seq`` unless it exists (then it is left as it is), in the
    caller's transaction."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = ins(cursors).values(
        subscriber_id=subscriber_id, name=name, thread_id=thread_id, seq=seq, updated_at=now_iso()
    )
    await conn.execute(stmt.on_conflict_do_nothing())


async def advance_cursor(
    conn: AsyncConnection, subscriber_id: str, name: str, thread_id: str, seq: int
) -> int:
    """Move the cursor forward to ``seq`` (create it if needed; never move it back) in the
    caller's transaction, with one atomic upsert (safe against concurrent acks from several
    connections or processes). Returns the cursor's seq afterwards (``>= seq``)."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = ins(cursors).values(
        subscriber_id=subscriber_id, name=name, thread_id=thread_id, seq=seq, updated_at=now_iso()
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[cursors.c.subscriber_id, cursors.c.name, cursors.c.thread_id],
        set_={"seq": stmt.excluded.seq, "updated_at": stmt.excluded.updated_at},
        where=cursors.c.seq < stmt.excluded.seq,
    )
    await conn.execute(stmt)
    return await read_cursor(conn, subscriber_id, name, thread_id)


async def advance_cursors(
    conn: AsyncConnection, subscriber_id: str, name: str, positions: Mapping[str, int]
) -> None:
    """Move the cursors ``(subscriber_id, name, thread_id)`` forward to the seq ``positions``
    gives each thread (create them if needed; never move one back) in the caller's
    transaction: one multi-row atomic upsert, whatever the number of threads (a hub client's
    batched acks), without reading them back."""
    if not positions:
        return
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    at = now_iso()
    stmt = ins(cursors).values(
        [
            {
                "subscriber_id": subscriber_id,
                "name": name,
                "thread_id": thread_id,
                "seq": seq,
                "updated_at": at,
            }
            for thread_id, seq in sorted(positions.items())  # one lock order on PostgreSQL
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[cursors.c.subscriber_id, cursors.c.name, cursors.c.thread_id],
        set_={"seq": stmt.excluded.seq, "updated_at": stmt.excluded.updated_at},
        where=cursors.c.seq < stmt.excluded.seq,
    )
    await conn.execute(stmt)


async def all_cursors(conn: AsyncConnection, name: str) -> list[tuple[str, str, int]]:
    """Every ``(subscriber_id, thread_id, seq)`` of the cursors called ``name``."""
    rows = await conn.execute(
        select(cursors.c.subscriber_id, cursors.c.thread_id, cursors.c.seq).where(
            cursors.c.name == name
        )
    )
    return [(r[0], r[1], r[2]) for r in rows]
