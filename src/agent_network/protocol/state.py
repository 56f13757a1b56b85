"""The folded state of one thread (:class:`ThreadState`), what the fold, the adapters and the
deadlines read. Pure data: :mod:`agent_network.protocol.fold` computes it from envelopes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent_network.model.envelope import GENESIS_HASH, Envelope
from agent_network.protocol.knobs import (
    LIVE_STATUSES,
    STATUS_CLOSED,
    STATUS_CLOSING,
    STATUS_OPEN,
    Knobs,
    Mark,
    Participant,
)

__all__ = ["DEFAULT_AGENT_BUDGET", "NO_KNOBS", "ThreadState", "begin_closing"]

DEFAULT_AGENT_BUDGET = 4
NO_KNOBS = Knobs()


@dataclass(frozen=True, slots=True)
class ThreadState:
    """What the hub needs to know about a thread to validate the next append.

    ``consecutive_agent`` counts agent messages since the last message from a person;
    ``agent_budget`` is how many such messages the thread accepts (the runaway guard).

    Protocol fields (defaults = an ``open`` thread as before protocols): ``org_id`` of the
    thread's creator (the hub's own envelopes are sent in its name); ``created`` marks
    ``thread.created``; ``participants``/``initiator`` as ``(kind, id)``; ``pending_acks`` the
    invitees still to ack; ``knobs`` (ttl, ack_timeout, expectations, names); ``active_since``
    marks the envelope that made the thread live; ``last_message``, ``awaiting_reply`` (the
    first message of the latest speaker, waiting for someone else to answer) and
    ``turn_started`` mark what the sweeper's deadlines run from (kept up to date only in
    threads with expectations, the only ones that use them); ``expected_speaker`` is whose
    turn it is (None = anyone, or nobody when not live); ``close_reason`` and ``closing`` (mark
    of the envelope that started closing); ``fired`` the idempotency keys of expectation
    violations and notices already written; ``protocol`` the adapter's own (hashable) state.
    Every field is immutable, so states compare and hash: live state == fold(stored WAL).
    """

    thread_id: str
    last_seq: int = 0
    head_hash: str = GENESIS_HASH
    status: str = STATUS_OPEN
    adapter: str = "open"
    agent_budget: int = DEFAULT_AGENT_BUDGET
    consecutive_agent: int = 0
    messages: int = 0
    org_id: str = ""
    created: Mark | None = None
    participants: tuple[Participant, ...] = ()
    initiator: Participant | None = None
    pending_acks: tuple[Participant, ...] = ()
    knobs: Knobs = NO_KNOBS
    active_since: Mark | None = None
    last_message: Mark | None = None
    awaiting_reply: Mark | None = None
    turn_started: Mark | None = None
    expected_speaker: str | None = None
    close_reason: str | None = None
    closing: Mark | None = None
    fired: frozenset[str] = frozenset()
    protocol: object = None

    @property
    def participant_ids(self) -> tuple[str, ...]:
        """Ids of the participants, in order (empty for an open thread without a list)."""
        return tuple(pid for _, pid in self.participants)

    @property
    def live(self) -> bool:
        """True when messages may be sent (status ``open`` or ``active``)."""
        return self.status in LIVE_STATUSES


def begin_closing(state: ThreadState, reason: str, env: Envelope) -> ThreadState:
    """``state`` moved to ``closing`` because of ``env`` (unchanged if already closing/closed)."""
    if state.status in (STATUS_CLOSING, STATUS_CLOSED):
        return state
    return replace(state, status=STATUS_CLOSING, close_reason=reason, closing=Mark.of(env))
