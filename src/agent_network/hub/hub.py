"""The hub: the one write path for envelopes.

``append`` -> (queue) -> committer task: idempotency lookup -> thread status and runaway budget
-> adapter.validate -> stamp (seq, prev_hash, hash) -> one transaction for the whole batch
(group commit: many envelopes, one fsync) -> fold -> wake waiters -> fan-out to subscribers.
An ``append`` returns only after the transaction holding its envelope committed durably.

Revocations are ordered against appends through the **access epoch**: every append made on
behalf of a checked principal carries the epoch at which its access check passed
(``checked_at``); :meth:`Hub.revoke_access` bumps the epoch and returns only once the batch the
committer was writing (if any) has committed. A batch prepared after the bump refuses every
append checked before it with :class:`AccessChangedError`, and the caller checks again. So once a
revocation is acknowledged, no append checked against the old access commits.

The committer is the only writer of envelopes in this process. On PostgreSQL several server
processes append to one database (docs/architecture.md, "Several servers on one PostgreSQL"):

- each batch transaction first takes a transaction-scoped advisory lock per thread of the batch
  (sorted: no deadlock), then reads the threads' heads and steps each cached state over what
  other processes appended since (only those envelopes), so no batch is stamped on a stale fold;
  the idempotency lookup runs under the same locks, so keys hold across processes;
- the ``(thread_id, seq)`` primary key stays the arbiter: a batch that still conflicts (a unique
  violation) is prepared again from fresh states (nothing was acknowledged yet);
- the batch sends ``NOTIFY an_wal`` (delivered at commit); each hub ``LISTEN``s and, for threads
  someone here follows, reads the WAL after the last seq it published and publishes in seq
  order. Every publication goes through one watermark per thread, so subscribers get each
  envelope once, in seq order, without a gap (a gap is filled from the WAL first).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from agent_network.errors import (
    AgentNetworkError,
    NotFoundError,
    ThreadClosedError,
)
from agent_network.hub.sweeper import Sweeper
from agent_network.model.envelope import Envelope, Sender, envelope_hash
from agent_network.model.ids import new_sorted_id, now_iso
from agent_network.protocol.adapters import Proposal
from agent_network.protocol.events import EV_MESSAGE, EV_THREAD_CREATED
from agent_network.protocol.fold import fold, step
from agent_network.protocol.knobs import STATUS_CLOSING
from agent_network.protocol.lifecycle import admit, person_message, reply_key
from agent_network.protocol.state import ThreadState
from agent_network.store.audit import audit_row
from agent_network.store.wal import listen_wal, read_after_many, read_envelopes, seq_ranges_since
from agent_network.store.wal_writer import (
    WalConflictError,
    WalSession,
    WalWriter,
    open_wal_writer,
)

log = structlog.get_logger(__name__)


class HubBusyError(AgentNetworkError):
    """Too many appends are waiting for the committer; nothing was written."""

    code = "hub_busy"
    status = 503


class HubClosedError(AgentNetworkError):
    """The hub stopped before the append was committed (nothing was written)."""

    code = "hub_unavailable"
    status = 503


class AccessChangedError(AgentNetworkError):
    """Access was removed somewhere (a revocation) after this append's access check passed: the
    append was not stored; check access again and append again (:meth:`Hub.append`)."""

    code = "access_changed"
    status = 409


@dataclass(slots=True)
class _Pending:
    thread_id: str
    proposal: Proposal
    causation_id: str | None
    idempotency_key: str | None
    acted_by: tuple[str, str] | None
    future: asyncio.Future[Envelope]
    checked_at: int | None = None


@dataclass(slots=True)
class _BatchResult:
    accepted: list[tuple[_Pending, Envelope]] = field(default_factory=list)
    duplicates: list[tuple[_Pending, Envelope]] = field(default_factory=list)
    refused: list[tuple[_Pending, AgentNetworkError]] = field(default_factory=list)
    states: dict[str, ThreadState] = field(default_factory=dict)
    # envelopes other processes committed, found while catching the cached states up
    seen: list[Envelope] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of re-checking a thread's hash chain.

    ``ok`` is False at the first break; ``first_bad_seq`` and ``reason`` say where and why;
    ``checked`` is how many envelopes were read.
    """

    thread_id: str
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


@dataclass(eq=False)
class Subscription:
    """A live feed of committed envelopes: of every thread, or of a set of threads that may
    change while it runs (:meth:`add_thread`, :meth:`discard_thread`).

    Iterate it with ``async for`` (or take what is waiting with :meth:`receive_batch`). The
    buffer is bounded: a subscriber that falls further behind than ``buffer`` envelopes is
    dropped and ``lagged`` becomes True; it must then catch up from the store with its own
    cursor (the log is the truth, the feed only a hint).
    """

    _threads: set[str] | None
    _send: MemoryObjectSendStream[Envelope]
    _recv: MemoryObjectReceiveStream[Envelope]
    lagged: bool = False
    _hub: Hub | None = field(default=None, repr=False)

    @property
    def thread_ids(self) -> frozenset[str] | None:
        """The threads followed now (None: every thread)."""
        return None if self._threads is None else frozenset(self._threads)

    @property
    def closed(self) -> bool:
        """True once the subscription stopped (closed, or dropped for lagging)."""
        return self._hub is None

    def add_thread(self, thread_id: str) -> None:
        """Also receive envelopes of ``thread_id`` from now on (those committed after this call).

        ValueError on a subscription to every thread. No effect once closed.
        """
        if self._threads is None:
            raise ValueError("this subscription already follows every thread")
        if self._hub is not None and thread_id not in self._threads:
            self._threads.add(thread_id)
            self._hub._by_thread.setdefault(thread_id, set()).add(self)

    def discard_thread(self, thread_id: str) -> None:
        """Stop receiving envelopes of ``thread_id`` (no error if it was not followed)."""
        if self._threads is None or thread_id not in self._threads:
            return
        self._threads.discard(thread_id)
        if self._hub is not None:
            self._hub._unindex(self, thread_id)

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._recv.__aiter__()

    async def receive_batch(self, limit: int = 1000) -> list[Envelope]:
        """Wait for the next envelope; return it with those already waiting (at most ``limit``,
        in commit order). Returns ``[]`` once the subscription is closed (check ``lagged``)."""
        try:
            out = [await self._recv.receive()]
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return []
        while len(out) < limit:
            try:
                out.append(self._recv.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        return out

    def close(self) -> None:
        """Stop receiving; safe to call more than once."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub._subscribers.discard(self)
            hub._everything.discard(self)
            for thread_id in self._threads or ():
                hub._unindex(self, thread_id)
        self._send.close()
        self._recv.close()


class Hub:
    """Owner of the WAL write path. Use ``async with Hub.open(engine) as hub``.

    ``max_batch`` bounds how many envelopes one transaction carries; ``max_queue`` how many
    appends may wait for the committer before ``append`` answers HubBusyError (backpressure).
    """

    def __init__(
        self, engine: AsyncEngine, *, max_batch: int = 1000, max_queue: int = 100_000
    ) -> None:
        self.engine = engine
        self._max_batch = max_batch
        self._states: dict[str, ThreadState] = {}
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._max_queue = max_queue
        self._subscribers: set[Subscription] = set()
        # Fan-out index: subscriptions to every thread, and per thread id the subscriptions
        # following it, so a batch costs O(subscribers of its threads), not O(all subscribers).
        self._everything: set[Subscription] = set()
        self._by_thread: dict[str, set[Subscription]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._closed = False
        self._sweeper: Sweeper | None = None  # made by _start
        self.batches = 0  # number of committed transactions (exposed for benchmarks)
        # Revocation ordering (module docstring): the epoch, and batches started / finished.
        self.access_epoch = 0
        self._batches_started = 0
        self._batches_finished = 0
        self._batch_done = asyncio.Event()
        # Cross-process (PostgreSQL): the last seq published here per thread, the threads
        # to read from the WAL (thread id -> first seq notified), and whether we listen at all.
        self._published: dict[str, int] = {}
        self._behind: dict[str, int] = {}
        self._behind_event = asyncio.Event()
        self.shared = engine.dialect.name == "postgresql"
        self.conflicts = 0  # batches prepared again after a unique violation
        # envelopes created from this moment (less a clock-skew margin) are news to subscribers
        self._since = datetime.fromtimestamp(time.time() - _START_SKEW, UTC).isoformat()
        self._listen_lost_at: float | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        engine: AsyncEngine,
        *,
        max_batch: int = 1000,
        max_queue: int = 100_000,
        sweep_interval: float | None = 1.0,
    ) -> AsyncIterator[Hub]:
        """Start the committer task; on exit, stop it and fail whatever was still queued.

        ``sweep_interval`` (seconds) runs the deadline sweeper (TTL, ack timeouts,
        expectations, closing -> closed) with the wall clock; None or 0 disables the task
        (``sweep(now)`` still works, e.g. for tests that drive time themselves).
        """
        hub = cls(engine, max_batch=max_batch, max_queue=max_queue)
        async with anyio.create_task_group() as tg:
            await hub._start(tg, sweep_interval)
            try:
                yield hub
            finally:
                hub._closed = True
                tg.cancel_scope.cancel()
        hub._fail_queued()
        for sub in list(hub._subscribers):
            sub.close()

    async def _start(self, tg: TaskGroup, sweep_interval: float | None = None) -> None:
        writer = await open_wal_writer(self.engine)
        tg.start_soon(self._committer, writer)
        if self.shared:
            await tg.start(self._listen)
            tg.start_soon(self._follow)
        self._sweeper = Sweeper(self)
        if sweep_interval:
            tg.start_soon(self._sweeper.run, sweep_interval)

    # ---------------------------------------------------------------- public API

    async def append(
        self,
        thread_id: str,
        *,
        type: str,
        data: dict[str, Any],
        sender: Sender,
        audience: list[str] | None = None,
        causation_id: str | None = None,
        idempotency_key: str | None = None,
        acted_by: tuple[str, str] | None = None,
        checked_at: int | None = None,
    ) -> Envelope:
        """Append one envelope and return it once it is durably committed.

        ``checked_at`` is the :attr:`access_epoch` read before the caller checked the sender's
        access (None: no access check applies, e.g. system envelopes). If access was removed
        since (:meth:`revoke_access`), the append raises :class:`AccessChangedError` without
        writing or auditing anything.

        Every accepted or refused envelope is recorded in the sender org's audit log in the same
        transaction (action ``envelope.<type>``); ``acted_by`` = (principal kind, principal id)
        names the credential that acted when it is not the sender itself (default: the sender).

        If ``idempotency_key`` was already accepted in this thread, the original envelope is
        returned and nothing is written. Raises NotFoundError (no such thread), ThreadClosedError,
        RunawayBudgetError (agent budget spent; the refusal is audited), an adapter's error, or
        HubClosedError when the hub shuts down first.
        """
        if self._closed:
            raise HubClosedError("the hub is shutting down; retry against a running server")
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            thread_id,
            Proposal(type=type, data=data, sender=sender, audience=audience),
            causation_id,
            idempotency_key,
            acted_by,
            fut,
            checked_at,
        )
        if len(self._queue) >= self._max_queue:
            raise HubBusyError(f"the hub has {len(self._queue)} appends waiting; retry in a moment")
        self._queue.append(pending)
        self._wakeup.set()
        return await fut

    async def revoke_access(self) -> None:
        """Order a removal of access (already committed by the caller) before later appends.

        Bumps :attr:`access_epoch`, then waits until the batch the committer is writing, if any,
        has committed. Returns at once when the committer is idle. After it returns, every
        append whose ``checked_at`` predates the bump is refused with AccessChangedError.
        """
        self.access_epoch += 1
        target = self._batches_started
        while self._batches_finished < target and not self._closed:
            self._batch_done.clear()
            await self._batch_done.wait()

    async def read(
        self, thread_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[Envelope]:
        """Committed envelopes of ``thread_id`` with ``seq > after`` (at most ``limit``)."""
        async with self.engine.connect() as conn:
            return await read_envelopes(conn, thread_id, after=after, limit=limit)

    async def state(self, thread_id: str) -> ThreadState:
        """The folded state of ``thread_id`` (cached; loaded from the WAL on first use)."""
        cached = self._states.get(thread_id)
        if cached is not None:
            return cached
        state = fold(thread_id, await self.read(thread_id))
        if state.last_seq == 0:
            return state  # no such thread (yet): nothing to cache
        # setdefault: a state the committer stored meanwhile is at least as new as this one
        return self._states.setdefault(thread_id, state)

    async def fresh_state(self, thread_id: str) -> ThreadState:
        """The state of ``thread_id`` including every envelope committed so far by any process
        (on PostgreSQL the cached state is stepped over what the WAL holds after it; elsewhere
        the same as :meth:`state`)."""
        state = await self.state(thread_id)
        if not self.shared or state.last_seq == 0:
            return state
        newer = await self.read(thread_id, after=state.last_seq)
        for env in newer:
            if env.seq == state.last_seq + 1:
                state = step(state, env)
        self._keep_state(state)
        return state

    def _keep_state(self, state: ThreadState) -> None:
        """Cache ``state`` unless the cache already holds a newer one of its thread."""
        cur = self._states.get(state.thread_id)
        if cur is None or cur.last_seq < state.last_seq:
            self._states[state.thread_id] = state

    def cached_states(self) -> dict[str, ThreadState]:
        """A snapshot of the thread states held in memory, by thread id (what the sweeper
        scans besides its own watch list)."""
        return dict(self._states)

    async def wait_for(self, thread_id: str, after: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for an envelope with ``seq > after`` in ``thread_id``.

        Returns True as soon as one is committed (or already was), False on timeout.
        """
        with anyio.move_on_after(seconds):
            while True:
                event = self._events.setdefault(thread_id, asyncio.Event())
                if (await self.state(thread_id)).last_seq > after:
                    return True
                await event.wait()
        return False

    def subscribe(
        self, thread_ids: set[str] | None = None, *, buffer: int = 10_000
    ) -> Subscription:
        """A live feed of envelopes committed from now on (see :class:`Subscription`).

        ``thread_ids`` None follows every thread; a set (possibly empty) follows those threads
        and can grow or shrink later. ``buffer`` is how many envelopes may wait unread before
        the subscription is dropped as lagged.
        """
        send, recv = anyio.create_memory_object_stream[Envelope](buffer)
        sub = Subscription(
            set(thread_ids) if thread_ids is not None else None, send, recv, _hub=self
        )
        self._subscribers.add(sub)
        if thread_ids is None:
            self._everything.add(sub)
        else:
            for thread_id in thread_ids:
                self._by_thread.setdefault(thread_id, set()).add(sub)
        return sub

    def _unindex(self, sub: Subscription, thread_id: str) -> None:
        subs = self._by_thread.get(thread_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_thread[thread_id]

    async def verify(self, thread_id: str) -> VerifyReport:
        """Recompute the hash chain of ``thread_id``; report the first envelope that breaks it."""
        envs = await self.read(thread_id)
        prev = "0" * 64
        for i, e in enumerate(envs, start=1):
            if e.seq != i:
                return VerifyReport(thread_id, False, i, e.seq, f"expected seq {i}, found {e.seq}")
            if e.prev_hash != prev:
                return VerifyReport(thread_id, False, i, e.seq, "prev_hash does not match")
            fields = e.as_dict()
            fields.pop("hash")
            if envelope_hash(**fields) != e.hash:
                return VerifyReport(thread_id, False, i, e.seq, "content does not match its hash")
            prev = e.hash
        return VerifyReport(thread_id, True, len(envs))

    def forget(self, thread_id: str) -> None:
        """Drop the cached state of ``thread_id`` (it is reloaded from the WAL on next use)."""
        self._states.pop(thread_id, None)

    # ---------------------------------------------------------------- committer

    async def _committer(self, writer: WalWriter) -> None:
        try:
            queue = self._queue
            while True:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                n = min(len(queue), self._max_batch)
                batch = [queue.popleft() for _ in range(n)]
                self._batches_started += 1
                # A started batch always finishes, so every future learns the truth.
                with anyio.CancelScope(shield=True):
                    try:
                        await self._commit(writer, batch)
                    finally:
                        self._batches_finished += 1
                        self._batch_done.set()
        finally:
            with anyio.CancelScope(shield=True):
                await writer.aclose()

    async def _commit(self, writer: WalWriter, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        try:
            for attempt in range(_CONFLICT_RETRIES + 1):
                try:
                    await writer.transaction(
                        lambda session: self._prepare(session, batch), then=self._committed
                    )
                    return
                except (IntegrityError, WalConflictError):
                    # another writer took a (thread_id, seq) or an idempotency key first (the
                    # advisory locks make this rare): nothing was written or acknowledged, so
                    # prepare the batch again from states read afresh
                    self.conflicts += 1
                    for p in batch:
                        self.forget(p.thread_id)
                    if attempt == _CONFLICT_RETRIES:
                        raise
        except Exception as exc:
            log.error("hub.commit_failed", error=repr(exc))
            for p in batch:
                self.forget(p.thread_id)
                if not p.future.done():
                    p.future.set_exception(
                        HubClosedError(f"the envelope was not stored ({type(exc).__name__})")
                    )

    def _committed(self, result: _BatchResult) -> None:
        """Everything after a durable commit, run on the event loop as soon as it is known:
        new states, acknowledgements, long-poll wake-ups, fan-out (all synchronous)."""
        if result.accepted:
            self.batches += 1
        for state in result.states.values():
            self._keep_state(state)
        states = result.states
        if self._sweeper is not None and any(
            states[env.thread_id].status == STATUS_CLOSING for _, env in result.accepted
        ):
            self._sweeper.poke()  # an accepted envelope began closing: thread.closed follows now
        for p, env in result.accepted:
            if not p.future.done():
                p.future.set_result(env)
        for p, env in result.duplicates:
            if not p.future.done():
                p.future.set_result(env)
        for p, err in result.refused:
            if not p.future.done():
                p.future.set_exception(err)
        for thread_id in result.states:
            ev = self._events.pop(thread_id, None)
            if ev is not None:
                ev.set()
        if result.accepted or result.seen:
            self._deliver([*result.seen, *(env for _, env in result.accepted)])

    def _prepare(self, session: WalSession, batch: list[_Pending]) -> _BatchResult:
        """Validate, stamp and insert ``batch`` (runs in the writer, inside its transaction).

        On a shared store (PostgreSQL) first lock the batch's threads and catch their cached
        states up with what other processes appended (module docstring)."""
        result = _BatchResult()
        work = result.states
        if session.shared:
            threads = sorted({p.thread_id for p in batch})
            # the orgs audited into: each accepted or refused append audits its sender's org
            session.lock_threads(threads, sorted({p.proposal.sender.org_id for p in batch}))
            heads = session.heads(threads)
            for tid in threads:
                head = heads.get(tid, 0)
                if head == 0:
                    continue  # no such thread yet (a thread.created in the batch creates it)
                cached = self._states.get(tid)
                first_sight = tid not in self._published
                if cached is None or cached.last_seq > head or first_sight:
                    # (last_seq > head cannot happen with one store)
                    history = session.read_envelopes(tid)
                    work[tid] = fold(tid, history)
                    if first_sight:
                        # nothing of this thread published here yet: what was committed since
                        # this hub started is news to its subscribers (the notifications may
                        # still be on the way); older history is not
                        result.seen.extend(e for e in history if e.created_at >= self._since)
                    continue
                caught = cached
                if cached.last_seq < head:
                    newer = session.read_after(tid, cached.last_seq)
                    for env in newer:
                        caught = step(caught, env)
                    result.seen.extend(newer)
                work[tid] = caught
        keys = [(p.thread_id, p.idempotency_key) for p in batch if p.idempotency_key]
        existing = session.find_by_idempotency(keys) if keys else {}
        audits: list[dict[str, Any]] = []
        epoch = self.access_epoch
        for p in batch:
            if p.checked_at is not None and p.checked_at != epoch:
                # checked before a revocation that was acknowledged meanwhile: check again
                result.refused.append((p, AccessChangedError("access changed; check again")))
                continue
            if p.idempotency_key:
                found = existing.get((p.thread_id, p.idempotency_key))
                if found is not None:
                    result.duplicates.append((p, found))
                    continue
            state = work.get(p.thread_id) or self._states.get(p.thread_id)
            if state is None:
                state = fold(p.thread_id, session.read_envelopes(p.thread_id))
            try:
                self._validate(state, p, _answers_person(session, state, p, result.accepted))
            except AgentNetworkError as err:
                result.refused.append((p, err))
                audits.append(_refusal_audit(p, err))
                work.setdefault(p.thread_id, state)
                continue
            env = _stamp(state, p)
            work[p.thread_id] = step(state, env)
            result.accepted.append((p, env))
            audits.append(_accepted_audit(p, env))
            if p.idempotency_key:
                existing[(p.thread_id, p.idempotency_key)] = env
        session.insert_envelopes([env for _, env in result.accepted])
        session.insert_audit(audits)
        if session.shared and result.accepted:
            ranges: dict[str, tuple[int, int]] = {}
            for _, env in result.accepted:
                first = ranges.get(env.thread_id, (env.seq, env.seq))[0]
                ranges[env.thread_id] = (first, env.seq)
            session.notify([(t, a, b) for t, (a, b) in ranges.items()])
        return result

    @staticmethod
    def _validate(state: ThreadState, p: _Pending, answers_person: bool = False) -> None:
        prop = p.proposal
        if state.last_seq == 0 and prop.type != EV_THREAD_CREATED:
            raise NotFoundError("thread", p.thread_id)
        if state.last_seq > 0 and prop.type == EV_THREAD_CREATED:
            raise ThreadClosedError("thread already exists")
        # lifecycle, membership, audience, budget, then the adapter (pure)
        admit(state, prop, answers_person=answers_person)

    def _deliver(self, envs: Iterable[Envelope]) -> None:
        """Publish ``envs`` (each thread's in ascending seq order) exactly once per seq and in
        seq order per thread: those at or below the thread's watermark were published already;
        a seq beyond ``watermark + 1`` means envelopes committed elsewhere are not read yet, so
        that thread waits for :meth:`_follow` to read them from the WAL."""
        out: list[Envelope] = []
        published = self._published
        gapped: set[str] = set()
        for env in envs:
            tid = env.thread_id
            if tid in gapped:
                continue
            mark = published.get(tid)
            if mark is not None and env.seq <= mark:
                continue
            if mark is not None and env.seq != mark + 1 and self.shared:
                gapped.add(tid)
                self._mark_behind(tid, mark + 1)
                continue
            published[tid] = env.seq
            out.append(env)
        if out and self._subscribers:
            self._publish(out)

    def _interested(self, thread_id: str) -> bool:
        return bool(
            self._everything
            or thread_id in self._by_thread
            or thread_id in self._states
            or thread_id in self._events
        )

    def _mark_behind(self, thread_id: str, first: int) -> None:
        cur = self._behind.get(thread_id)
        self._behind[thread_id] = first if cur is None else min(cur, first)
        self._behind_event.set()

    def _notified(self, thread_id: str, first: int, last: int) -> None:
        """A commit (of any process, this one included) appended ``first``..``last`` to
        ``thread_id``."""
        mark = self._published.get(thread_id)
        if mark is not None and mark >= last:
            return  # published here already (our own commit, usually)
        if self._interested(thread_id):
            self._mark_behind(thread_id, first)
        else:  # nobody here follows it: nothing to publish, but a later follower starts here
            self._published[thread_id] = last

    def _listen_connected(self, alive_at: float | None) -> None:
        if alive_at is not None:  # a reconnect: _follow catches up on what may have been missed
            lost = self._listen_lost_at
            self._listen_lost_at = alive_at if lost is None else min(lost, alive_at)
            self._behind_event.set()

    async def _listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await listen_wal(
            self.engine, self._notified, self._listen_connected, task_status=task_status
        )

    async def _follow(self) -> None:
        """Read what other processes committed to the threads :meth:`_notified` marked, step the
        cached states, wake long-polls and publish (until cancelled)."""
        while True:
            await self._behind_event.wait()
            self._behind_event.clear()
            try:
                await self._catch_up()
            except Exception as exc:  # the store is unreachable: try again shortly
                log.warning("hub.follow_failed", error=repr(exc))
                await anyio.sleep(0.5)
                self._behind_event.set()

    async def _catch_up(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self.engine.connect() as conn:
                lost_at = self._listen_lost_at
                if lost_at is not None:
                    # the LISTEN connection was lost: notifications may be missing; what was
                    # created since shortly before (clock skew between servers) tells which
                    stamp = datetime.fromtimestamp(lost_at - _MISSED_MARGIN, UTC).isoformat()
                    ranges = await seq_ranges_since(conn, stamp)
                    if self._listen_lost_at == lost_at:  # (not lost again meanwhile)
                        self._listen_lost_at = None
                    for tid, (first, last) in ranges.items():
                        self._notified(tid, first, last)
                behind, self._behind = self._behind, {}
                if not behind:
                    return
                positions = {
                    tid: self._published.get(tid, first - 1) for tid, first in behind.items()
                }
                try:
                    envs = await read_after_many(conn, positions)
                except BaseException:
                    for tid, first in behind.items():  # read them next time
                        self._mark_behind(tid, first)
                    raise
        self._apply_remote(envs)

    def _apply_remote(self, envs: list[Envelope]) -> None:
        """Step the cached states over ``envs`` (committed by any process, in thread and seq
        order), wake long-polls, publish."""
        closing = False
        for env in envs:
            tid = env.thread_id
            cached = self._states.get(tid)
            if cached is None:
                if env.seq == 1:  # a new thread: its whole history is here (the sweeper sees it)
                    self._states[tid] = fold(tid, [env])
            elif cached.last_seq == env.seq - 1:
                self._states[tid] = step(cached, env)
            elif cached.last_seq < env.seq - 1:
                self.forget(tid)  # a gap: fold again from the WAL when next needed
            state = self._states.get(tid)
            closing = closing or (state is not None and state.status == STATUS_CLOSING)
            ev = self._events.pop(tid, None)
            if ev is not None:
                ev.set()
        if closing and self._sweeper is not None:
            self._sweeper.poke()
        self._deliver(envs)

    def _publish(self, envs: list[Envelope]) -> None:
        """Hand each envelope to the subscriptions of its thread and to those of every thread,
        without ever waiting: a subscription whose buffer is full is dropped (``lagged``)."""
        everything = self._everything
        by_thread = self._by_thread
        for env in envs:
            subs = by_thread.get(env.thread_id)
            if subs:
                for sub in tuple(subs):
                    _offer(sub, env)
            if everything:
                for sub in tuple(everything):
                    _offer(sub, env)

    def _fail_queued(self) -> None:
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(HubClosedError("the hub is shutting down"))

    # ---------------------------------------------------------------- deadlines (sweeper)

    async def sweep(self, now: float, *, thread_ids: Iterable[str] | None = None) -> list[Envelope]:
        """Act on every deadline passed at ``now`` (seconds since the epoch): finish closing
        threads (``thread.closed``), TTL and ack timeouts (``thread.closing`` then
        ``thread.closed``), expectation violations (``expectation.violated``, ``notify``).

        ``thread_ids`` limits the sweep to those threads (default: every thread with deadlines
        or a pending close). Returns the envelopes written, in order. Each carries an
        idempotency key derived from what it is about, so a violation fires once, also across
        restarts. Needs a hub started by ``Hub.open``; tests pass their own ``now``.
        """
        if self._sweeper is None:
            raise HubClosedError("the hub is not running: open it with Hub.open")
        return await self._sweeper.sweep(now, thread_ids)


_CONFLICT_RETRIES = 5
"""How many times a batch that hit a unique violation is prepared again before failing."""
_MISSED_MARGIN = 60.0
"""Seconds before a lost ``LISTEN`` connection from which commits are re-read (clock skew)."""
_START_SKEW = 5.0
"""Seconds before a hub's start from which envelopes committed elsewhere count as news."""


def _answers_person(
    session: WalSession,
    state: ThreadState,
    p: _Pending,
    accepted: list[tuple[_Pending, Envelope]],
) -> bool:
    """Whether ``p`` is an agent's answer to a person's message, which a spent runaway budget
    does not refuse (:func:`~agent_network.protocol.lifecycle.budget_spent`): an agent's
    ``message`` whose ``causation_id`` is a ``message`` of a ``user`` in the same thread and
    whose idempotency key is the agent's reply key for it (so it is stored at most once per
    agent and person's message). Looked up only while the budget is spent."""
    prop = p.proposal
    if (
        prop.type != EV_MESSAGE
        or prop.sender.kind != "agent"
        or p.causation_id is None
        or p.idempotency_key != reply_key(prop.sender.id, p.causation_id)
        or not 0 < state.agent_budget <= state.consecutive_agent
    ):
        return False
    cause = next(
        (e for _, e in accepted if e.id == p.causation_id and e.thread_id == p.thread_id), None
    ) or session.find_envelope(p.thread_id, p.causation_id)
    return cause is not None and person_message(cause.type, cause.sender_kind)


def _offer(sub: Subscription, env: Envelope) -> None:
    try:
        sub._send.send_nowait(env)
    except anyio.WouldBlock:
        sub.lagged = True
        sub.close()
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        sub.close()


def _stamp(state: ThreadState, p: _Pending) -> Envelope:
    prop = p.proposal
    fields: dict[str, Any] = {
        "thread_id": p.thread_id,
        "seq": state.last_seq + 1,
        "id": new_sorted_id("env"),
        "type": prop.type,
        "data": prop.data,
        "sender_kind": prop.sender.kind,
        "sender_id": prop.sender.id,
        "sender_org_id": prop.sender.org_id,
        "audience": prop.audience,
        "causation_id": p.causation_id,
        "idempotency_key": p.idempotency_key,
        "created_at": now_iso(),
        "prev_hash": state.head_hash,
    }
    return Envelope(**fields, hash=envelope_hash(**fields))


def _accepted_audit(p: _Pending, env: Envelope) -> dict[str, Any]:
    kind, principal = p.acted_by or (env.sender_kind, env.sender_id)
    return audit_row(
        org_id=env.sender_org_id,
        principal_kind=kind,
        principal_id=principal,
        action=f"envelope.{env.type}",
        resource_kind="thread",
        resource_id=env.thread_id,
        data={"seq": env.seq, "envelope_id": env.id, "sender_id": env.sender_id},
        created_at=env.created_at,
    )


def _refusal_audit(p: _Pending, err: AgentNetworkError) -> dict[str, Any]:
    sender = p.proposal.sender
    kind, principal = p.acted_by or (sender.kind, sender.id)
    return audit_row(
        org_id=sender.org_id,
        principal_kind=kind,
        principal_id=principal,
        action=f"envelope.{p.proposal.type}",
        resource_kind="thread",
        resource_id=p.thread_id,
        outcome="refused",
        reason=f"{err.code}: {err.message}",
        data={"causation_id": p.causation_id, "sender_id": sender.id},
    )
