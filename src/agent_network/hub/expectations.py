"""Deadlines of protocol threads and the sweeper that acts on them.

The fold never reads the clock. :func:`next_due` computes, from a thread's folded state and a
``now`` (seconds since the epoch), the earliest deadline that has passed and the envelope it
calls for; the :class:`Sweeper` appends that envelope through the hub and repeats until nothing
is due. Deadlines run from envelope ``created_at`` values:

- ``closing`` status -> ``thread.closed`` with the closing reason (no deadline: at once);
- ``ttl`` seconds after ``thread.created`` -> ``thread.closing`` (``ttl_expired``);
- ``ack_timeout`` seconds after ``thread.created`` while invited -> ``thread.closing``
  (``invite_timeout``);
- each expectation -> ``expectation.violated`` (+ ``notify`` for the notify handler; the fold
  moves auto_close violations to closing): ``acks_within`` from creation while invited,
  ``reply_within`` from the message awaiting a reply, ``max_silence`` from the last message
  (or activation), ``turn_within`` from the start of the expected speaker's turn.

Each envelope carries an idempotency key derived from what it is about (``expect:<name>:<env
id>``, ``notify:<name>:<env id>``, ``lifecycle:<reason>``), and the fold remembers fired keys,
so every violation fires exactly once, also across restarts and concurrent sweeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.adapters.model import (
    EV_EXPECTATION_VIOLATED,
    EV_NOTIFY,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    REASON_CLOSED,
    REASON_INVITE_TIMEOUT,
    REASON_TTL_EXPIRED,
    STATUS_CLOSED,
    STATUS_CLOSING,
    STATUS_INVITED,
    Expectation,
    Mark,
)
from agent_network.errors import AgentNetworkError
from agent_network.hub.fold import ThreadState
from agent_network.model.envelope import Actor, Envelope
from agent_network.store.tables import envelopes

if TYPE_CHECKING:
    from agent_network.hub.hub import Hub

log = structlog.get_logger(__name__)

HUB_SENDER_ID = "hub"
"""``sender_id`` of the envelopes the sweeper writes (kind ``system``, the thread's org)."""
KEY_CLOSED = "lifecycle:closed"
KEY_TTL = f"lifecycle:{REASON_TTL_EXPIRED}"
KEY_INVITE_TIMEOUT = f"lifecycle:{REASON_INVITE_TIMEOUT}"
_MAX_STEPS = 64  # envelopes one sweep may write for one thread (each changes the state)


@dataclass(frozen=True, eq=False)
class Due:
    """An envelope a deadline calls for: ``type``, ``data``, idempotency ``key``, the
    ``causation_id`` (the envelope it is about) and the deadline ``at`` (epoch seconds)."""

    at: float
    type: str
    data: dict[str, Any]
    key: str
    causation_id: str | None


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")


def needs_sweep(state: ThreadState) -> bool:
    """True when ``state`` has something for the sweeper: closing, or deadlines while not
    closed."""
    if state.last_seq == 0 or state.status == STATUS_CLOSED:
        return False
    return state.status == STATUS_CLOSING or state.knobs.timed


def _about(state: ThreadState, exp: Expectation) -> Mark | None:
    if exp.kind == "acks_within":
        return state.created if state.status == STATUS_INVITED else None
    if not state.live:
        return None
    if exp.kind == "reply_within":
        return state.awaiting_reply
    if exp.kind == "max_silence":
        return state.last_message or state.active_since
    if exp.kind == "turn_within":
        return state.turn_started if state.expected_speaker is not None else None
    return None


def _notice(state: ThreadState, exp: Expectation, about: Mark) -> str:
    s = f"{exp.seconds:g}s"
    if exp.kind == "reply_within":
        return f"expectation {exp.name}: no reply to {about.sender}'s message within {s}"
    if exp.kind == "max_silence":
        return f"expectation {exp.name}: the thread has been silent for more than {s}"
    if exp.kind == "turn_within":
        return f"expectation {exp.name}: {state.expected_speaker} did not take its turn within {s}"
    waiting = ", ".join(pid for _, pid in state.pending_acks)
    return f"expectation {exp.name}: invitees did not ack within {s} (waiting for {waiting})"


def due_now(state: ThreadState, now: float) -> list[Due]:
    """Every envelope whose deadline passed at ``now`` (epoch seconds), earliest first, for the
    state as it is (acting on the first may make the others moot; see :func:`next_due`)."""
    if state.last_seq == 0 or state.status == STATUS_CLOSED or state.created is None:
        return []
    if state.status == STATUS_CLOSING:
        closing = state.closing
        return [
            Due(
                closing.epoch if closing else now,
                EV_THREAD_CLOSED,
                {"reason": state.close_reason or REASON_CLOSED},
                KEY_CLOSED,
                closing.id if closing else None,
            )
        ]
    created = state.created
    knobs = state.knobs
    found: list[Due] = []
    for exp in knobs.expectations:
        about = _about(state, exp)
        if about is None:
            continue
        at = about.epoch + exp.seconds
        key = f"expect:{exp.name}:{about.id}"
        if key not in state.fired:
            data = {
                "key": key,
                "name": exp.name,
                "kind": exp.kind,
                "handler": exp.handler,
                "seconds": exp.seconds,
                "about": about.id,
                "about_seq": about.seq,
                "deadline": _iso(at),
            }
            found.append(Due(at, EV_EXPECTATION_VIOLATED, data, key, about.id))
        elif exp.handler == "notify":
            nkey = f"notify:{exp.name}:{about.id}"
            if nkey not in state.fired:
                text = _notice(state, exp, about)
                data = {"key": nkey, "expectation": exp.name, "kind": exp.kind, "text": text}
                found.append(Due(at, EV_NOTIFY, data, nkey, about.id))
    if state.status == STATUS_INVITED and knobs.ack_timeout is not None:
        at = created.epoch + knobs.ack_timeout
        missing = [list(p) for p in state.pending_acks]
        data = {"reason": REASON_INVITE_TIMEOUT, "missing": missing}
        found.append(Due(at, EV_THREAD_CLOSING, data, KEY_INVITE_TIMEOUT, created.id))
    if knobs.ttl is not None:
        at = created.epoch + knobs.ttl
        found.append(
            Due(at, EV_THREAD_CLOSING, {"reason": REASON_TTL_EXPIRED}, KEY_TTL, created.id)
        )
    return sorted((d for d in found if d.at <= now), key=lambda d: d.at)


def next_due(state: ThreadState, now: float) -> Due | None:
    """The earliest envelope due at ``now``, or None (pure: no clock, no store)."""
    due = due_now(state, now)
    return due[0] if due else None


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
    """

    def __init__(self, hub: Hub) -> None:
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
                cached = list(self.hub._states.items())  # the hub's own cache (same package)
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
            if not needs_sweep(state):
                self._watched.discard(thread_id)
                break
            due = next_due(state, now)
            if due is None:
                break
            try:
                env = await self.hub.append(
                    thread_id,
                    type=due.type,
                    data=due.data,
                    sender=Actor("system", HUB_SENDER_ID, state.org_id),
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
