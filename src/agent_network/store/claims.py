"""Work claims of runners (``runner_claims``): one atomic statement per claim or completion.

A claim names ``(agent_id, thread_id, trigger_seq)`` — one agent answering one trigger envelope —
the ``runner_id`` working on it, until when (``expires_at``, epoch seconds of the server clock),
and whether the trigger is ``done`` (answered or deliberately skipped). Each function here is a
single ``INSERT … ON CONFLICT … DO UPDATE … WHERE <conditions> RETURNING`` statement, so two
runners racing for the same trigger (two processes on one SQLite file, or several hub processes
on PostgreSQL) cannot both win: the database serialises the two upserts on the primary key and
the second one sees the first one's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.store.tables import runner_claims

ClaimOutcome = Literal["granted", "held", "done"]


@dataclass(frozen=True, slots=True)
class ClaimState:
    """The result of a claim or completion attempt.

    ``outcome``: ``granted`` (the caller holds the lease until ``expires_at``), ``held`` (another
    runner, ``runner_id``, holds a live lease until ``expires_at``) or ``done`` (the trigger is
    finished; nobody may take it again). ``expires_at`` is epoch seconds (server clock).
    """

    outcome: ClaimOutcome
    runner_id: str
    expires_at: float


def _insert(conn: AsyncConnection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


async def try_claim(
    conn: AsyncConnection,
    *,
    agent_id: str,
    thread_id: str,
    trigger_seq: int,
    runner_id: str,
    lease_seconds: float,
    now: float,
) -> ClaimState:
    """Take (or renew, or take over) the claim on one trigger, atomically.

    Granted when no claim exists, when the existing claim's lease expired (``expires_at <=
    now``: a crashed runner's work is taken over) or when ``runner_id`` already holds it (a
    renewal: the lease moves to ``now + lease_seconds``). Never granted for a ``done`` trigger.
    Runs in the caller's transaction; returns the :class:`ClaimState` after the attempt.
    """
    ins = _insert(conn)
    expires_at = now + lease_seconds
    stmt = ins(runner_claims).values(
        agent_id=agent_id,
        thread_id=thread_id,
        trigger_seq=trigger_seq,
        runner_id=runner_id,
        expires_at=expires_at,
        done=False,
    )
    row = runner_claims.c
    stmt = stmt.on_conflict_do_update(
        index_elements=[row.agent_id, row.thread_id, row.trigger_seq],
        set_={"runner_id": stmt.excluded.runner_id, "expires_at": stmt.excluded.expires_at},
        where=(row.done.is_(False)) & ((row.expires_at <= now) | (row.runner_id == runner_id)),
    ).returning(row.runner_id, row.expires_at)
    won = (await conn.execute(stmt)).first()
    if won is not None:
        return ClaimState("granted", won[0], float(won[1]))
    return await _current(conn, agent_id, thread_id, trigger_seq)


async def complete_claim(
    conn: AsyncConnection,
    *,
    agent_id: str,
    thread_id: str,
    trigger_seq: int,
    runner_id: str,
    now: float,
) -> ClaimState:
    """Mark one trigger done, atomically (idempotent).

    Allowed when ``runner_id`` holds the claim, when the claim's lease expired, when there is no
    claim yet (a runner recording a trigger it skipped) or when it is already done; refused
    (outcome ``held``) while another runner holds a live lease. Returns the state afterwards:
    ``done`` on success.
    """
    ins = _insert(conn)
    stmt = ins(runner_claims).values(
        agent_id=agent_id,
        thread_id=thread_id,
        trigger_seq=trigger_seq,
        runner_id=runner_id,
        expires_at=now,
        done=True,
    )
    row = runner_claims.c
    stmt = stmt.on_conflict_do_update(
        index_elements=[row.agent_id, row.thread_id, row.trigger_seq],
        set_={"done": True},
        where=row.done.is_(True) | (row.expires_at <= now) | (row.runner_id == runner_id),
    ).returning(row.runner_id, row.expires_at)
    won = (await conn.execute(stmt)).first()
    if won is not None:
        return ClaimState("done", won[0], float(won[1]))
    return await _current(conn, agent_id, thread_id, trigger_seq)


async def release_claims(
    conn: AsyncConnection, runner_id: str, agent_ids: Sequence[str] | None = None
) -> int:
    """End the live leases ``runner_id`` holds on triggers not yet done (a runner stopping
    cleanly), so another runner takes them over at once instead of waiting for the lease to run
    out. ``agent_ids`` limits it to those agents' claims (a remote runner's credential). Returns
    how many claims were released."""
    row = runner_claims.c
    stmt = update(runner_claims).where(row.runner_id == runner_id, row.done.is_(False))
    if agent_ids is not None:
        stmt = stmt.where(row.agent_id.in_(list(agent_ids)))
    result = await conn.execute(stmt.values(expires_at=0.0))
    return int(result.rowcount or 0)


async def stored_claim(
    conn: AsyncConnection, agent_id: str, thread_id: str, trigger_seq: int
) -> ClaimState | None:
    """The claim on one trigger as stored: ``done``, or ``held`` by its ``runner_id`` until
    ``expires_at`` (epoch seconds; a past time means the lease ran out); None when nobody
    claimed it yet."""
    row = (
        await conn.execute(
            select(
                runner_claims.c.runner_id, runner_claims.c.expires_at, runner_claims.c.done
            ).where(
                runner_claims.c.agent_id == agent_id,
                runner_claims.c.thread_id == thread_id,
                runner_claims.c.trigger_seq == trigger_seq,
            )
        )
    ).first()
    if row is None:
        return None
    return ClaimState("done" if row[2] else "held", row[0], float(row[1]))


async def _current(
    conn: AsyncConnection, agent_id: str, thread_id: str, trigger_seq: int
) -> ClaimState:
    """The stored claim after a refused attempt: ``held`` by another runner, or ``done``."""
    state = await stored_claim(conn, agent_id, thread_id, trigger_seq)
    if state is None:  # pragma: no cover - a refused upsert always leaves the conflicting row
        raise RuntimeError("claim row vanished during the attempt")
    return state


async def open_claims(conn: AsyncConnection) -> list[tuple[str, str, int]]:
    """Every claim not done yet, as ``(agent_id, thread_id, trigger_seq)`` (for catch-up after a
    restart: a trigger whose runner died before completing it)."""
    rows = await conn.execute(
        select(
            runner_claims.c.agent_id, runner_claims.c.thread_id, runner_claims.c.trigger_seq
        ).where(runner_claims.c.done.is_(False))
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def done_seqs(conn: AsyncConnection, agent_id: str, thread_id: str) -> list[int]:
    """The trigger seqs of ``thread_id`` that are done for ``agent_id``, ascending."""
    rows = await conn.execute(
        select(runner_claims.c.trigger_seq)
        .where(
            runner_claims.c.agent_id == agent_id,
            runner_claims.c.thread_id == thread_id,
            runner_claims.c.done.is_(True),
        )
        .order_by(runner_claims.c.trigger_seq)
    )
    return [r[0] for r in rows]
