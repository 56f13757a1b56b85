"""Admission of a proposed envelope: lifecycle, membership, audience, budget, then the adapter.

:func:`admit` is what the hub runs (inside its writer, before stamping) for every proposal; it
is pure, so :func:`may_speak` can ask the very same question without writing anything (the
runner uses it so that an agent whose turn it is not makes no model call).

Open a protocol thread by appending ``thread.created`` with data from
:func:`thread_created_data` (or the same keys by hand)::

    await hub.append(thread_id, type="thread.created", sender=system_sender, data={
        "title": "Review", "team_id": team_id,
        **thread_created_data(
            "consulting", [("agent", asker_id), ("agent", expert_id)],
            invitees=[("agent", expert_id)], ack_timeout=60, ttl=3600,
            expectations=[reply_within(30, "notify")],
        ),
    })
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent_network.errors import (
    AgentNetworkError,
    InvalidAudienceError,
    InvalidRequestError,
    ProtocolViolationError,
    RunawayBudgetError,
    ThreadClosedError,
)
from agent_network.protocol.adapters.base import Proposal, get_adapter
from agent_network.protocol.adapters.graph import TransitionGraph
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_EXPECTATION_VIOLATED,
    EV_MESSAGE,
    EV_NOTIFY,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
    EV_VISIBILITY_SET,
)
from agent_network.protocol.knobs import (
    HANDLERS,
    REASON_CLOSED,
    STATUS_CLOSED,
    STATUS_CLOSING,
    STATUS_INVITED,
    Expectation,
    OpenRequest,
    Participant,
    parse_open,
    parse_reason,
)

if TYPE_CHECKING:
    from agent_network.model.envelope import Sender
    from agent_network.protocol.state import ThreadState


SYSTEM_TYPES = frozenset(
    {EV_BUDGET_SET, EV_EXPECTATION_VIOLATED, EV_NOTIFY, EV_PARTICIPANTS_ADDED, EV_VISIBILITY_SET}
)
"""Envelope types only the hub or the services (a ``system`` sender) write."""


def check_created(data: Mapping[str, Any]) -> OpenRequest:
    """Validate the data of a ``thread.created`` proposal (generic knobs, then the adapter's).

    Returns the parsed request; raises InvalidRequestError naming the bad knob (unknown adapter,
    wrong participant count, initiator/invitee not a participant, bad seconds, bad graph...).
    """
    request = parse_open(data)
    get_adapter(request.adapter).check_open(request)
    return request


def person_message(env_type: str, sender_kind: str) -> bool:
    """True for a ``message`` sent by a person (a ``user``): an agent's answer to it is
    ``answers_person`` in :func:`budget_spent`."""
    return env_type == EV_MESSAGE and sender_kind == "user"


def reply_key(agent_id: str, trigger_id: str) -> str:
    """The idempotency key of ``agent_id``'s reply to the envelope ``trigger_id``, as stored:
    ``reply:<agent_id>:<trigger_id>`` (re-exported by :mod:`agent_network.services.claims`)."""
    return f"reply:{agent_id}:{trigger_id}"


def budget_spent(state: ThreadState, *, answers_person: bool = False) -> bool:
    """Whether the runaway budget refuses an agent's message in the thread whose folded state is
    ``state``: ``consecutive_agent`` agent messages since the latest message of a person have
    reached ``agent_budget``.

    ``answers_person``: the message is an agent's first answer to a person's message (the hub
    decides it: a message whose ``causation_id`` is a person's message of the thread, stored
    under that agent's reply key ``reply:<agent id>:<message id>``, so at most one per agent and
    person's message). Such an answer is refused only by a budget of 0: the person's message was
    posted while the budget was not spent (it starts the count afresh), and an answer that comes
    late — its runner crashed and restarted while other agents spent the budget — must not be
    starved. It still counts as an agent message, so the agents' exchanges that follow stay
    bounded (at most ``agent_budget`` plus one answer per agent and person's message).
    """
    if answers_person and state.agent_budget > 0:
        return False
    return state.consecutive_agent >= state.agent_budget


def admit(state: ThreadState, proposal: Proposal, *, answers_person: bool = False) -> None:
    """Raise the typed error the hub answers when ``proposal`` may not be appended to the thread
    whose folded state is ``state``; return None when it may. ``answers_person``: the proposal
    is an agent's answer to a person's message, which a spent budget does not refuse
    (:func:`budget_spent`).

    Order of checks: ``thread.created`` knobs; closed (ThreadClosedError); closing (only the
    system's ``thread.closed``; else ThreadClosedError); sender is a participant of a protocol
    thread (ProtocolViolationError); audience names participants only (InvalidAudienceError);
    envelope types only the system writes (``expectation.violated``, ``notify``, budget and
    visibility changes; ProtocolViolationError from anyone else, InvalidRequestError for bad
    data); lifecycle envelopes (ack/reject only by a pending invitee, close types); messages
    not while invited (ProtocolViolationError) nor past the runaway budget
    (RunawayBudgetError); then the adapter's own rules (e.g. NotYourTurnError). The caller
    checks that the thread exists.
    """
    if proposal.type == EV_THREAD_CREATED:
        check_created(proposal.data)
        return
    sender = proposal.sender
    system = sender.kind == "system"
    if state.status == STATUS_CLOSED:
        raise ThreadClosedError("the thread is closed; its history is read-only")
    if state.status == STATUS_CLOSING:
        if proposal.type == EV_THREAD_CLOSED and system:
            return
        raise ThreadClosedError(
            f"the thread is closing ({state.close_reason}); it accepts nothing more"
        )
    who = (sender.kind, sender.id)
    if state.participants and not system and who not in state.participants:
        raise ProtocolViolationError(
            f"{sender.kind} {sender.id!r} is not a participant of this thread"
        )
    _check_audience(state, proposal)
    kind = proposal.type
    if kind in SYSTEM_TYPES:
        _check_system_envelope(proposal)
        return
    if kind == EV_THREAD_CLOSED:
        if state.participants and not system:
            raise ProtocolViolationError(
                "participants close a protocol thread with a thread.closing envelope"
            )
        parse_reason(proposal.data, REASON_CLOSED)
        return
    if kind == EV_THREAD_CLOSING:
        parse_reason(proposal.data, REASON_CLOSED)
        return
    if kind in (EV_THREAD_ACK, EV_THREAD_REJECT):
        if state.status != STATUS_INVITED or who not in state.pending_acks:
            raise ProtocolViolationError(
                f"{sender.kind} {sender.id!r} has no pending invitation to this thread"
            )
        if kind == EV_THREAD_REJECT:
            parse_reason(proposal.data, "")
        return
    if kind == EV_MESSAGE:
        if state.status == STATUS_INVITED:
            waiting = ", ".join(pid for _, pid in state.pending_acks)
            raise ProtocolViolationError(
                f"the thread is not active yet: waiting for acks from {waiting}"
            )
        if sender.kind == "agent" and budget_spent(state, answers_person=answers_person):
            raise RunawayBudgetError(
                f"thread budget exhausted: {state.consecutive_agent} consecutive agent messages "
                f"without a human one (budget {state.agent_budget}); a person must post before "
                "agents may speak again"
            )
    get_adapter(state.adapter).validate(state, proposal)


def _check_system_envelope(proposal: Proposal) -> None:
    if proposal.sender.kind != "system":
        raise ProtocolViolationError(f"only the system writes {proposal.type!r} envelopes")
    data = proposal.data
    if proposal.type == EV_BUDGET_SET:
        budget = data.get("agent_budget")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise InvalidRequestError("agent_budget must be a non-negative integer")
    elif proposal.type == EV_EXPECTATION_VIOLATED and not (
        isinstance(data.get("key"), str)
        and isinstance(data.get("name"), str)
        and data.get("handler") in HANDLERS
    ):
        raise InvalidRequestError("expectation.violated needs a key, a name and a handler")


def _check_audience(state: ThreadState, proposal: Proposal) -> None:
    audience = proposal.audience
    if audience is None or not state.participants:
        return  # everyone; or an open thread whose membership the services check
    if not isinstance(audience, list) or not audience:
        raise InvalidAudienceError(
            "audience must name at least one participant id (omit it to address everyone)"
        )
    ids = {pid for _, pid in state.participants}
    strangers = sorted({str(a) for a in audience if a not in ids})
    if strangers:
        raise InvalidAudienceError(
            f"audience may only name participants of this thread; not participants: "
            f"{', '.join(strangers)}"
        )


def may_speak(state: ThreadState, actor: Sender, *, answers_person: bool = False) -> bool:
    """True when a plain ``message`` from ``actor`` would be accepted now (same rules as the
    hub: status, membership, acks, budget, turn order). A runner asks this before calling a
    model, so an agent whose turn it is not makes no model call. ``answers_person``: the
    message would be the agent's answer to a person's message (see :func:`budget_spent`)."""
    if state.last_seq == 0:
        return False
    try:
        admit(
            state,
            Proposal(type=EV_MESSAGE, data={"content": ""}, sender=actor),
            answers_person=answers_person,
        )
    except AgentNetworkError:
        return False
    return True


def thread_created_data(
    adapter: str,
    participants: Sequence[Participant],
    *,
    initiator: Participant | None = None,
    invitees: Sequence[Participant] = (),
    ttl: float | None = None,
    ack_timeout: float | None = None,
    expectations: Sequence[Expectation] = (),
    names: Mapping[str, str] | None = None,
    graph: TransitionGraph | Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The protocol knobs of a ``thread.created`` envelope as JSON-ready data, validated.

    ``participants`` are ``(kind, id)`` pairs incl. the ``initiator`` (default: the first);
    ``invitees`` must ``thread.ack`` before the thread is live; ``ttl``/``ack_timeout`` are
    seconds from creation; ``names`` maps participant names to ids (workflow targets,
    Handoff); ``graph`` is the workflow graph; ``extra`` passes adapter knobs such as the
    discussion ``order`` and ``agent_budget``. Raises InvalidRequestError like the hub would.
    """
    data: dict[str, Any] = {
        "adapter": adapter,
        "participants": [list(p) for p in participants],
        **extra,
    }
    if initiator is not None:
        data["initiator"] = list(initiator)
    if invitees:
        data["invitees"] = [list(p) for p in invitees]
    if ttl is not None:
        data["ttl"] = ttl
    if ack_timeout is not None:
        data["ack_timeout"] = ack_timeout
    if expectations:
        data["expectations"] = [e.to_data() for e in expectations]
    if names:
        data["names"] = dict(names)
    if graph is not None:
        data["graph"] = graph.to_dict() if isinstance(graph, TransitionGraph) else dict(graph)
    check_created(data)
    return data
