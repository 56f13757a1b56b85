"""Adapter protocol, a base class with the usual defaults, and the registry.

An adapter is pure: ``check_open`` validates the knobs of ``thread.created``; ``validate`` sees
the folded :class:`~agent_network.protocol.fold.ThreadState` and a proposed envelope and returns or
raises a typed :class:`~agent_network.errors.AgentNetworkError` *before* anything is written;
``opened``/``apply`` derive the adapter's own state (``ThreadState.protocol``, any hashable
frozen value) from envelopes only; ``expected_speaker`` says whose turn it is (None = anyone).
Membership, lifecycle envelopes (ack, reject, close), audience and the runaway budget are checked
by :func:`agent_network.protocol.lifecycle.admit` before the adapter is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent_network.errors import InvalidRequestError, ProtocolViolationError
from agent_network.model.envelope import Sender
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.knobs import OpenRequest

if TYPE_CHECKING:
    from agent_network.model.envelope import Envelope
    from agent_network.protocol.state import ThreadState


@dataclass(frozen=True, slots=True)
class Proposal:
    """An envelope a client proposes, before the hub stamps it."""

    type: str
    data: dict[str, Any]
    sender: Sender
    audience: list[str] | None = None


class Adapter(Protocol):
    """What the hub needs from a thread protocol (subclass :class:`BaseAdapter` to get defaults).

    ``min_participants``/``max_participants`` bound the participant list of ``thread.created``
    (``max_participants`` None = no upper bound).
    """

    name: str
    min_participants: int
    max_participants: int | None

    def check_open(self, request: OpenRequest) -> None:
        """Raise InvalidRequestError when the knobs of ``thread.created`` do not fit."""
        ...

    def opened(self, state: ThreadState, env: Envelope) -> ThreadState:
        """State right after ``thread.created`` (set ``protocol`` here)."""
        ...

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """Raise an AgentNetworkError to refuse ``proposal`` (nothing is written then)."""
        ...

    def apply(self, state: ThreadState, env: Envelope) -> ThreadState:
        """Fold one stored envelope into the adapter's state (may start closing)."""
        ...

    def expected_speaker(self, state: ThreadState) -> str | None:
        """Id of the participant whose turn it is, or None when anyone may speak."""
        ...


class BaseAdapter:
    """Defaults for an adapter: 2+ participants; every participant may send a ``message`` any
    time; other envelope types only from the system; no adapter state; nobody in particular is
    expected to speak. Override what your protocol changes."""

    name: str = ""
    min_participants: int = 2
    max_participants: int | None = None

    def check_open(self, request: OpenRequest) -> None:
        """Check the participant count (raises InvalidRequestError with the allowed range)."""
        n = len(request.participants)
        low, high = self.min_participants, self.max_participants
        if n < low or (high is not None and n > high):
            want = (
                f"exactly {low}"
                if low == high
                else f"at least {low}"
                if high is None
                else f"{low} to {high}"
            )
            raise InvalidRequestError(
                f"a {self.name} thread needs {want} participants ([kind, id] pairs incl. the "
                f"initiator); got {n}"
            )

    def opened(self, state: ThreadState, env: Envelope) -> ThreadState:
        """No adapter state by default."""
        return state

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """Messages pass; other types only from the system (ProtocolViolationError otherwise)."""
        if proposal.type != EV_MESSAGE and proposal.sender.kind != "system":
            raise ProtocolViolationError(
                f"a {self.name} thread does not accept {proposal.type!r} envelopes from "
                "participants"
            )

    def apply(self, state: ThreadState, env: Envelope) -> ThreadState:
        """No adapter state by default."""
        return state

    def expected_speaker(self, state: ThreadState) -> str | None:
        """Anyone may speak by default."""
        return None


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    """Make ``adapter`` available to threads under ``adapter.name`` (replaces a previous one).

    Register it in every process that opens or folds such threads (the fold of a stored thread
    needs its adapter). Example, a ``broadcast`` protocol where only the initiator speaks::

        from agent_network.protocol import BaseAdapter, register_adapter
        from agent_network.errors import NotYourTurnError

        class BroadcastAdapter(BaseAdapter):
            name = "broadcast"
            min_participants = 2

            def validate(self, state, proposal):
                super().validate(state, proposal)
                if proposal.type == "message" and proposal.sender.id != state.initiator[1]:
                    raise NotYourTurnError("only the initiator speaks in a broadcast thread")

            def expected_speaker(self, state):
                return state.initiator[1]

        register_adapter(BroadcastAdapter())
        # then open a thread with data={"adapter": "broadcast", "participants": [...], ...}
    """
    if not isinstance(adapter.name, str) or not adapter.name:
        raise InvalidRequestError("an adapter needs a non-empty name")
    _REGISTRY[adapter.name] = adapter


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``; raises InvalidRequestError for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidRequestError(f"unknown adapter {name!r}; known adapters: {known}") from None


def adapter_names() -> list[str]:
    """Names of every registered adapter, sorted."""
    return sorted(_REGISTRY)


def speaker_label(state: ThreadState, participant_id: str) -> str:
    """``participant_id`` as a reader of an error message knows it: ``"Name (id)"`` when the
    thread's ``names`` knob names it (the first such name), else the id alone."""
    for name, pid in state.knobs.names:
        if pid == participant_id:
            return f"{name} ({participant_id})"
    return participant_id
