"""The ``discussion`` adapter: two or more participants speak round-robin.

The order starts with the initiator and follows the participant list, wrapping around (knob
``order``: an explicit permutation of the participant ids; knob ``ordering``: only
``"round_robin"``). A message out of turn is refused with NotYourTurnError. It ends by an
explicit close or the TTL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from agent_network.errors import InvalidRequestError, NotYourTurnError
from agent_network.protocol.adapters.base import (
    BaseAdapter,
    Proposal,
    register_adapter,
    speaker_label,
)
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.knobs import OpenRequest

if TYPE_CHECKING:
    from agent_network.model.envelope import Envelope
    from agent_network.protocol.state import ThreadState

ORDERING_ROUND_ROBIN = "round_robin"


@dataclass(frozen=True, slots=True)
class DiscussionState:
    """The speaking ``order`` (ids) and how many turns were taken."""

    order: tuple[str, ...]
    turn: int = 0

    @property
    def expected(self) -> str:
        """Whose turn it is."""
        return self.order[self.turn % len(self.order)]


def _order(request_ids: tuple[str, ...], initiator: str, order: object) -> tuple[str, ...]:
    if order is None:
        return (initiator, *(pid for pid in request_ids if pid != initiator))
    if not isinstance(order, list | tuple) or sorted(map(str, order)) != sorted(request_ids):
        raise InvalidRequestError("order must list every participant id exactly once")
    return tuple(str(pid) for pid in order)


class DiscussionAdapter(BaseAdapter):
    """Round-robin turns among 2+ participants, starting with the initiator."""

    name = "discussion"
    min_participants = 2

    def check_open(self, request: OpenRequest) -> None:
        """Participant count, ``ordering`` and ``order`` (InvalidRequestError)."""
        super().check_open(request)
        ordering = request.data.get("ordering", ORDERING_ROUND_ROBIN)
        if ordering != ORDERING_ROUND_ROBIN:
            raise InvalidRequestError(
                f"discussion ordering must be 'round_robin', not {ordering!r}"
            )
        assert request.initiator is not None
        _order(request.participant_ids, request.initiator[1], request.data.get("order"))

    def opened(self, state: ThreadState, env: Envelope) -> ThreadState:
        """The order: ``order`` knob, else the initiator followed by the other participants."""
        assert state.initiator is not None
        ids = tuple(pid for _, pid in state.participants)
        order = _order(ids, state.initiator[1], env.data.get("order"))
        return replace(state, protocol=DiscussionState(order))

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """NotYourTurnError for a message from anyone but the expected speaker."""
        super().validate(state, proposal)
        if proposal.type == EV_MESSAGE:
            expected = self.expected_speaker(state)
            if proposal.sender.id != expected:
                turn = speaker_label(state, str(expected))
                raise NotYourTurnError(f"discussion: it is {turn}'s turn (round-robin)")

    def apply(self, state: ThreadState, env: Envelope) -> ThreadState:
        """Each message passes the turn to the next in the order."""
        ds = state.protocol
        if env.type != EV_MESSAGE or not isinstance(ds, DiscussionState):
            return state
        return replace(state, protocol=replace(ds, turn=ds.turn + 1))

    def expected_speaker(self, state: ThreadState) -> str | None:
        """The participant at ``turn`` (mod the order's length)."""
        ds = state.protocol
        assert isinstance(ds, DiscussionState), "discussion thread without its state"
        return ds.expected


register_adapter(DiscussionAdapter())
