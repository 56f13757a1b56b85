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

The committer is the only writer of envelopes in this process. Ordering across processes (a
later PostgreSQL deployment) rests on the ``(thread_id, seq)`` primary key: a conflicting batch
fails, its threads are reloaded from the store and the appends are refused with a retryable error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
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
from agent_network.store.wal import read_envelopes
from agent_network.store.wal_writer import WalSession, WalWriter, open_wal_writer

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
            await writer.transaction(
                lambda session: self._prepare(session, batch), then=self._committed
            )
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
        self._states.update(result.states)
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
        if result.accepted and self._subscribers:
            self._publish([env for _, env in result.accepted])

    def _prepare(self, session: WalSession, batch: list[_Pending]) -> _BatchResult:
        """Validate, stamp and insert ``batch`` (runs in the writer, inside its transaction)."""
        keys = [(p.thread_id, p.idempotency_key) for p in batch if p.idempotency_key]
        existing = session.find_by_idempotency(keys) if keys else {}
        result = _BatchResult()
        work = result.states
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
