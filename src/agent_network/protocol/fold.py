"""Thread state as a pure function of its envelopes (the fold).

``fold(envelopes)`` and ``step(state, envelope)`` never touch the store, the clock or anything
else; a restart that replays the same WAL therefore rebuilds exactly the same state. The
lifecycle (invited -> active/open -> closing -> closed), the adapter's own state and the
bookkeeping the sweeper needs for deadlines (marks of the envelopes that start them, the
violations already fired) are all part of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from agent_network.model.envelope import Envelope
from agent_network.protocol.adapters import get_adapter
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_EXPECTATION_VIOLATED,
    EV_MESSAGE,
    EV_NOTIFY,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
)
from agent_network.protocol.knobs import (
    EXPECTATION_REASON_PREFIX,
    LIVE_STATUSES,
    REASON_CLOSED,
    REASON_INVITE_REJECTED,
    STATUS_ACTIVE,
    STATUS_CLOSED,
    STATUS_INVITED,
    STATUS_OPEN,
    Mark,
    parse_open,
)
from agent_network.protocol.state import DEFAULT_AGENT_BUDGET, ThreadState, begin_closing

__all__ = ["fold", "step"]


def step(state: ThreadState, env: Envelope) -> ThreadState:
    """Apply one envelope to ``state`` and return the new state (``state`` is unchanged)."""
    kind = env.type
    changes: dict[str, Any] = {"last_seq": env.seq, "head_hash": env.hash}
    if kind == EV_MESSAGE:  # the hot path: one copy of the state for an open thread
        _message(state, env, changes)
        s = replace(state, **changes)
    elif kind == EV_THREAD_CREATED:
        s = _created(replace(state, **changes), env)
    else:
        s = replace(state, **changes)
        if kind == EV_BUDGET_SET:
            s = replace(s, agent_budget=int(env.data["agent_budget"]))
        elif kind == EV_THREAD_ACK:
            s = _ack(s, env)
        elif kind == EV_THREAD_REJECT:  # the rejecter has answered: no longer pending
            rejecter = (env.sender_kind, env.sender_id)
            s = replace(s, pending_acks=tuple(p for p in s.pending_acks if p != rejecter))
            s = begin_closing(s, REASON_INVITE_REJECTED, env)
        elif kind == EV_THREAD_CLOSING:
            s = begin_closing(s, str(env.data.get("reason") or REASON_CLOSED), env)
        elif kind == EV_THREAD_CLOSED:
            reason = env.data.get("reason")
            s = replace(
                s, status=STATUS_CLOSED, close_reason=str(reason) if reason else s.close_reason
            )
        elif kind == EV_EXPECTATION_VIOLATED:
            s = replace(s, fired=s.fired | {str(env.data["key"])})
            if env.data.get("handler") == "auto_close":
                s = begin_closing(s, f"{EXPECTATION_REASON_PREFIX}{env.data['name']}", env)
        elif kind == EV_NOTIFY and isinstance(env.data.get("key"), str):
            s = replace(s, fired=s.fired | {env.data["key"]})
    adapter = get_adapter(s.adapter)
    if kind != EV_THREAD_CREATED:
        s = adapter.apply(s, env)
    expected = adapter.expected_speaker(s) if s.status in LIVE_STATUSES else None
    return s if expected == s.expected_speaker else replace(s, expected_speaker=expected)


def _created(s: ThreadState, env: Envelope) -> ThreadState:
    request = parse_open(env.data)
    adapter = get_adapter(request.adapter)
    mark = Mark.of(env)
    live = STATUS_OPEN if request.adapter == "open" else STATUS_ACTIVE
    s = replace(
        s,
        adapter=request.adapter,
        agent_budget=int(env.data.get("agent_budget", DEFAULT_AGENT_BUDGET)),
        org_id=env.sender_org_id,
        created=mark,
        participants=request.participants,
        initiator=request.initiator,
        pending_acks=request.invitees,
        knobs=request.knobs,
        status=STATUS_INVITED if request.invitees else live,
        active_since=None if request.invitees else mark,
        turn_started=None if request.invitees else mark,
    )
    return adapter.opened(s, env)


def _message(s: ThreadState, env: Envelope, changes: dict[str, Any]) -> None:
    changes["messages"] = s.messages + 1
    if env.sender_kind == "agent":
        changes["consecutive_agent"] = s.consecutive_agent + 1
    elif env.sender_kind == "user":
        changes["consecutive_agent"] = 0
    if not s.knobs.expectations:
        return  # the marks below only feed expectation deadlines
    mark = Mark.of(env)
    awaiting = s.awaiting_reply
    if awaiting is None or awaiting.sender != env.sender_id:
        awaiting = mark  # a new speaker: this message now waits for someone else's answer
    changes["last_message"] = mark
    changes["awaiting_reply"] = awaiting
    changes["turn_started"] = mark


def _ack(s: ThreadState, env: Envelope) -> ThreadState:
    pending = tuple(p for p in s.pending_acks if p != (env.sender_kind, env.sender_id))
    if pending or s.status != STATUS_INVITED:
        return replace(s, pending_acks=pending)
    mark = Mark.of(env)
    live = STATUS_OPEN if s.adapter == "open" else STATUS_ACTIVE
    return replace(s, pending_acks=(), status=live, active_since=mark, turn_started=mark)


def fold(thread_id: str, envelopes: Iterable[Envelope]) -> ThreadState:
    """Fold a thread's envelopes (in ``seq`` order) into its state."""
    state = ThreadState(thread_id=thread_id)
    for env in envelopes:
        state = step(state, env)
    return state
