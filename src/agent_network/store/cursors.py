"""Durable runner cursors: the last envelope seq an agent has handled in a thread."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.store.tables import runner_cursors


async def ensure_cursor(conn: AsyncConnection, agent_id: str, thread_id: str, seq: int) -> None:
    """Create the cursor at ``seq`` unless one exists (caller's transaction)."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = ins(runner_cursors).values(agent_id=agent_id, thread_id=thread_id, seq=seq)
    await conn.execute(stmt.on_conflict_do_nothing())


async def advance_cursor(conn: AsyncConnection, agent_id: str, thread_id: str, seq: int) -> None:
    """Move the cursor forward to ``seq`` (never backwards)."""
    await ensure_cursor(conn, agent_id, thread_id, seq)
    await conn.execute(
        update(runner_cursors)
        .where(
            runner_cursors.c.agent_id == agent_id,
            runner_cursors.c.thread_id == thread_id,
            runner_cursors.c.seq < seq,
        )
        .values(seq=seq)
    )


async def all_cursors(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """Every ``(agent_id, thread_id, seq)``."""
    rows = await conn.execute(
        select(runner_cursors.c.agent_id, runner_cursors.c.thread_id, runner_cursors.c.seq)
    )
    return [(r[0], r[1], r[2]) for r in rows]
