"""The envelope types of a thread (the one home of the ``EV_*`` names).

Each thread's WAL is a sequence of envelopes; ``type`` is one of these. See docs/protocols.md for
what each one means to the fold.
"""

from __future__ import annotations

__all__ = [
    "EV_BUDGET_SET",
    "EV_CONTEXT_SET",
    "EV_EXPECTATION_VIOLATED",
    "EV_MESSAGE",
    "EV_NOTIFY",
    "EV_PARTICIPANTS_ADDED",
    "EV_THREAD_ACK",
    "EV_THREAD_CLOSED",
    "EV_THREAD_CLOSING",
    "EV_THREAD_CREATED",
    "EV_THREAD_REJECT",
    "EV_VISIBILITY_SET",
]

EV_THREAD_CREATED = "thread.created"
EV_MESSAGE = "message"
EV_BUDGET_SET = "thread.budget_set"
EV_THREAD_CLOSED = "thread.closed"
EV_PARTICIPANTS_ADDED = "thread.participants_added"  # restricted thread widened (no state change)
EV_VISIBILITY_SET = "thread.visibility_set"  # restricted thread opened to all members
EV_THREAD_ACK = "thread.ack"  # an invitee accepts (sender = the invitee)
EV_THREAD_REJECT = "thread.reject"  # an invitee declines -> closing (invite_rejected)
EV_THREAD_CLOSING = "thread.closing"  # explicit close / TTL: data {"reason": str}
EV_EXPECTATION_VIOLATED = "expectation.violated"  # written by the sweeper, once per violation
EV_NOTIFY = "notify"  # a notice in the thread (handler "notify" of an expectation)
EV_CONTEXT_SET = "context.set"  # workflow context: data {"values": {key: JSON}}; no turn change
