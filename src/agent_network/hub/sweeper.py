"""The hub's deadline sweeper: finds the threads with deadlines and appends what falls due.

What is due, and the envelope it calls for, is pure protocol
(:mod:`agent_network.protocol.deadlines`); this module adds the store scan after a restart and
the loop that appends through the hub. It sees the hub only through :class:`SweptHub`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import anyio
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.errors import AgentNetworkError
from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.deadlines import needs_sweep, next_due
from agent_network.protocol.events import EV_THREAD_CLOSED, EV_THREAD_CREATED
from agent_network.protocol.state import ThreadState
from agent_network.store.tables import envelopes

__all__ = ["HUB_SENDER_ID", "Sweeper", "SweptHub", "lifecycle_thread_ids"]

log = structlog.get_logger(__name__)

HUB_SENDER_ID = "hub"
"""``sender_id`` of the envelopes the sweeper writes (kind ``system``, the thread's org)."""
_MAX_STEPS = 64  # envelopes one sweep may write for one thread (each changes the state)


class SweptHub(Protocol):
    """What the sweeper needs of the hub: its engine (the restart scan), its cached states,
    a thread's current state and the append path."""

    @property
    def engine(self) -> AsyncEngine:
        """The engine of the hub's store."""
        ...

    def cached_states(self) -> Mapping[str, ThreadState]:
        """The thread states the hub holds in memory, by thread id (a snapshot)."""
        ...

    async def state(self, thread_id: str) -> ThreadState:
        """The current folded state of ``thread_id``."""
        ...

    async def fresh_state(self, thread_id: str) -> ThreadState:
        """The state of ``thread_id`` with every envelope committed so far by any process."""
        ...

    async def append(
        self,
        thread_id: str,
        *,
        type: str,
        data: dict[str, Any],
        sender: Sender,
        causation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Append one envelope (the hub's validated append path)."""
        ...


async def lifecycle_thread_ids(conn: AsyncConnection) -> list[str]:
    """Ids of threads whose ``thread.created`` has protocol knobs and that have no
    ``thread.closed`` yet (what a sweeper must watch after a restart)."""
    closed = select(envelopes.c.thread_id).where(envelopes.c.type == EV_THREAD_CLOSED)
    q = select(envelopes.c.thread_id, envelopes.c.data).where(
        envelopes.c.type == EV_THREAD_CREATED, envelopes.c.thread_id.not_in(closed)
    )
    out = []
    for tid, data in (await conn.execute(q)).all():
        if isinstance(data, dict) and (
            data.get("adapter", "open") != "open"
            or any(data.get(k) for k in ("ttl", "ack_timeout", "expectations", "invitees"))
        ):
            out.append(str(tid))
    return out


class Sweeper:
    """Acts on the deadlines of a hub's threads (owned by the hub; see ``Hub.open``).

    It watches the threads found by one scan of the store (on the first sweep) plus every
    thread whose cached state needs it; threads without deadlines cost nothing.

    Several server processes on one PostgreSQL each run one: every envelope it writes carries
    an idempotency key derived from what it is about, looked up under the thread's lock against
    the fresh state, so a deadline fires once whichever process sweeps first (the others get the
    stored envelope back).
    """

    def __init__(self, hub: SweptHub) -> None:
        self.hub = hub
        self._watched: set[str] = set()
        self._scanned = False
        self._lock = anyio.Lock()
        self._poked = anyio.Event()

    def poke(self) -> None:
        """Sweep now rather than at the end of the interval (the hub calls this when a commit
        put a thread into ``closing``, so its ``thread.closed`` follows at once)."""
        self._poked.set()

    async def sweep(self, now: float, thread_ids: Iterable[str] | None = None) -> list[Envelope]:
        """Append every envelope due at ``now`` (epoch seconds) in ``thread_ids`` (default: all
        watched threads); returns the envelopes written, in order. Refusals (e.g. a thread
        closed meanwhile) and threads that cannot be folded here are logged and skipped."""
        async with self._lock:
            if thread_ids is None:
                if not self._scanned:
                    # shielded: cancelling an aiosqlite query half-way leaves an orphan close
                    # task behind that blocks the event loop's shutdown
                    with anyio.CancelScope(shield=True):
                        async with self.hub.engine.connect() as conn:
                            self._watched.update(await lifecycle_thread_ids(conn))
                    self._scanned = True
                cached = list(self.hub.cached_states().items())
                self._watched.update(tid for tid, st in cached if needs_sweep(st))
                ids = sorted(self._watched)
            else:
                ids = list(thread_ids)
            written: list[Envelope] = []
            for tid in ids:
                try:
                    written.extend(await self._sweep_thread(tid, now))
                except AgentNetworkError as err:  # e.g. its adapter is not registered here
                    log.warning("hub.sweep_skipped", thread_id=tid, error=err.code)
            return written

    async def _sweep_thread(self, thread_id: str, now: float) -> list[Envelope]:
        written: list[Envelope] = []
        for _ in range(_MAX_STEPS):
            with anyio.CancelScope(shield=True):  # a store read: see sweep()
                state = await self.hub.state(thread_id)
                due = next_due(state, now) if needs_sweep(state) else None
                if due is not None:
                    # something is due by the cache: read what the WAL holds beyond it first
                    # (on PostgreSQL another server may have swept, or answered, already)
                    fresh = await self.hub.fresh_state(thread_id)
                    if fresh.last_seq != state.last_seq:
                        state = fresh
                        due = next_due(state, now) if needs_sweep(state) else None
            if not needs_sweep(state):
                self._watched.discard(thread_id)
                break
            if due is None:
                break
            try:
                env = await self.hub.append(
                    thread_id,
                    type=due.type,
                    data=due.data,
                    sender=Sender("system", HUB_SENDER_ID, state.org_id),
                    causation_id=due.causation_id,
                    idempotency_key=due.key,
                )
            except AgentNetworkError as err:
                log.warning("hub.sweep_refused", thread_id=thread_id, type=due.type, error=err.code)
                break
            if env.seq <= state.last_seq:
                break  # already written (a concurrent sweep): the state will catch up
            written.append(env)
        return written

    async def run(self, interval: float) -> None:
        """Sweep every ``interval`` seconds with the wall clock, and at once when
        :meth:`poke` is called, until cancelled."""
        while True:
            self._poked = anyio.Event()
            try:
                await self.sweep(time.time())
            except Exception as exc:  # keep sweeping; the next round retries
                log.error("hub.sweep_failed", error=repr(exc))
            with anyio.move_on_after(interval):
                await self._poked.wait()
