"""Storage of the WAL (``envelopes`` table): batched insert, range reads, idempotency lookup,
and on PostgreSQL the ``LISTEN`` side of the commit notifications (:func:`listen_wal`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.model.envelope import Envelope
from agent_network.store.tables import envelopes
from agent_network.store.wal_writer import WAL_CHANNEL, parse_notify_payload

log = structlog.get_logger(__name__)

LISTEN_APP = "agent-network-listen"
"""``application_name`` of the ``LISTEN`` connections (to find them in ``pg_stat_activity``)."""


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
    params = {"thread_id": thread_id, "after": after}
    if limit is None:
        rows = (await conn.execute(_READ, params)).all()
    else:
        rows = (await conn.execute(_READ_LIMIT, {**params, "limit": limit})).all()
    return [row_to_envelope(r) for r in rows]


# built once (a page read is cheap to run; building the statement each time was not)
_READ = (
    select(envelopes)
    .where(envelopes.c.thread_id == bindparam("thread_id"), envelopes.c.seq > bindparam("after"))
    .order_by(envelopes.c.seq)
)
_READ_LIMIT = _READ.limit(bindparam("limit"))


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


async def read_after_many(conn: AsyncConnection, positions: Mapping[str, int]) -> list[Envelope]:
    """Envelopes with ``seq > positions[thread_id]`` of every thread in ``positions``, ordered by
    thread then seq (one query)."""
    if not positions:
        return []
    cond = or_(
        *(
            and_(envelopes.c.thread_id == t, envelopes.c.seq > after)
            for t, after in positions.items()
        )
    )
    q = select(envelopes).where(cond).order_by(envelopes.c.thread_id, envelopes.c.seq)
    return [row_to_envelope(r) for r in (await conn.execute(q)).all()]


async def seq_ranges_since(conn: AsyncConnection, since_iso: str) -> dict[str, tuple[int, int]]:
    """``thread_id -> (first, last)`` seqs of the envelopes created at or after ``since_iso``
    (an ISO timestamp as in ``created_at``): what to catch up on after missed notifications."""
    q = (
        select(envelopes.c.thread_id, func.min(envelopes.c.seq), func.max(envelopes.c.seq))
        .where(envelopes.c.created_at >= since_iso)
        .group_by(envelopes.c.thread_id)
    )
    return {str(t): (int(a), int(b)) for t, a, b in (await conn.execute(q)).all()}


def listen_dsn(engine: AsyncEngine) -> str:
    """A plain ``postgresql://`` DSN (for asyncpg) of ``engine``'s database, password included."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def listen_wal(
    engine: AsyncEngine,
    on_notify: Callable[[str, int, int], None],
    on_connected: Callable[[float | None], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    retry: float = 0.5,
) -> None:
    """``LISTEN`` on :data:`WAL_CHANNEL` on a dedicated asyncpg connection of ``engine``'s
    PostgreSQL database until cancelled; calls ``on_notify(thread_id, first, last)`` for each
    notification (on the event loop) and ``on_connected(alive_at)`` each time the ``LISTEN`` is
    in place: ``alive_at`` is None the first time, and after a reconnect the epoch seconds at which
    the lost connection was last known to work (notifications of commits since then may be
    missing: the caller catches up from the WAL). A lost connection is opened again every
    ``retry`` seconds. ``task_status.started()`` once the first ``LISTEN`` is in place (errors
    of that first connection are raised)."""
    import asyncpg  # type: ignore[import-untyped]

    dsn = listen_dsn(engine)
    started = False
    alive_at = time.time()

    def deliver(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        parsed = parse_notify_payload(payload)
        if parsed is not None:
            on_notify(*parsed)

    while True:
        lost = asyncio.Event()
        try:
            conn = await asyncpg.connect(dsn, server_settings={"application_name": LISTEN_APP})
        except (OSError, asyncpg.PostgresError) as exc:
            if not started:
                raise
            log.warning("hub.listen_reconnect_failed", error=repr(exc))
            await anyio.sleep(retry)
            continue
        try:
            conn.add_termination_listener(lambda _c, ev=lost: ev.set())
            await conn.add_listener(WAL_CHANNEL, deliver)
            on_connected(alive_at if started else None)
            alive_at = time.time()
            if not started:
                started = True
                task_status.started()
            while not lost.is_set():
                # a cheap liveness probe: a half-open TCP connection raises here
                with anyio.move_on_after(5):
                    await lost.wait()
                if not lost.is_set():
                    try:
                        with anyio.fail_after(5):
                            await conn.execute("SELECT 1")
                        alive_at = time.time()
                    except (OSError, TimeoutError, asyncpg.PostgresError):
                        lost.set()
            log.warning("hub.listen_lost")
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("hub.listen_lost", error=repr(exc))
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close(timeout=2)
        await anyio.sleep(retry)
