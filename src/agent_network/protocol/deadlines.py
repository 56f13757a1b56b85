"""Deadlines of protocol threads: when each one falls due and the envelope it calls for.

The fold never reads the clock. :func:`next_due` computes, from a thread's folded state and a
``now`` (seconds since the epoch), the earliest deadline that has passed and the envelope it
calls for; the hub's sweeper (``agent_network.hub.sweeper``) appends that envelope and repeats
until nothing is due. Pure: no clock, no store. Deadlines run from envelope ``created_at`` values:

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

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent_network.protocol.events import (
    EV_EXPECTATION_VIOLATED,
    EV_NOTIFY,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
)
from agent_network.protocol.knobs import (
    REASON_CLOSED,
    REASON_INVITE_TIMEOUT,
    REASON_TTL_EXPIRED,
    STATUS_CLOSED,
    STATUS_CLOSING,
    STATUS_INVITED,
    Expectation,
    Mark,
)
from agent_network.protocol.state import ThreadState

__all__ = [
    "KEY_CLOSED",
    "KEY_INVITE_TIMEOUT",
    "KEY_TTL",
    "Due",
    "due_now",
    "needs_sweep",
    "next_due",
]

KEY_CLOSED = "lifecycle:closed"
KEY_TTL = f"lifecycle:{REASON_TTL_EXPIRED}"
KEY_INVITE_TIMEOUT = f"lifecycle:{REASON_INVITE_TIMEOUT}"


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
