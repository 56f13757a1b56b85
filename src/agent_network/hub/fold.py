"""Thread state as a pure function of its envelopes (the fold).

``fold(envelopes)`` and ``step(state, envelope)`` never touch the store, the clock or anything
else; a restart that replays the same WAL therefore rebuilds exactly the same state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from agent_network.model.envelope import GENESIS_HASH, Envelope

DEFAULT_AGENT_BUDGET = 4

# Envelope types written by the hub and services.
EV_THREAD_CREATED = "thread.created"
EV_MESSAGE = "message"
EV_BUDGET_SET = "thread.budget_set"
EV_THREAD_CLOSED = "thread.closed"
EV_PARTICIPANTS_ADDED = "thread.participants_added"  # restricted thread widened (no state change)
EV_VISIBILITY_SET = "thread.visibility_set"  # restricted thread opened to all members


@dataclass(frozen=True, slots=True)
class ThreadState:
    """What the hub needs to know about a thread to validate the next append.

    ``consecutive_agent`` counts agent messages since the last message from a person;
    ``agent_budget`` is how many such messages the thread accepts (the runaway guard).
    """

    thread_id: str
    last_seq: int = 0
    head_hash: str = GENESIS_HASH
    status: str = "open"
    adapter: str = "open"
    agent_budget: int = DEFAULT_AGENT_BUDGET
    consecutive_agent: int = 0
    messages: int = 0


def step(state: ThreadState, env: Envelope) -> ThreadState:
    """Apply one envelope to ``state`` and return the new state (``state`` is unchanged)."""
    changes: dict[str, object] = {"last_seq": env.seq, "head_hash": env.hash}
    if env.type == EV_THREAD_CREATED:
        changes["adapter"] = str(env.data.get("adapter", "open"))
        changes["agent_budget"] = int(env.data.get("agent_budget", DEFAULT_AGENT_BUDGET))
    elif env.type == EV_MESSAGE:
        changes["messages"] = state.messages + 1
        if env.sender_kind == "agent":
            changes["consecutive_agent"] = state.consecutive_agent + 1
        elif env.sender_kind == "user":
            changes["consecutive_agent"] = 0
    elif env.type == EV_BUDGET_SET:
        changes["agent_budget"] = int(env.data["agent_budget"])
    elif env.type == EV_THREAD_CLOSED:
        changes["status"] = "closed"
    return replace(state, **changes)  # type: ignore[arg-type]


def fold(thread_id: str, envelopes: Iterable[Envelope]) -> ThreadState:
    """Fold a thread's envelopes (in ``seq`` order) into its state."""
    state = ThreadState(thread_id=thread_id)
    for env in envelopes:
        state = step(state, env)
    return state
