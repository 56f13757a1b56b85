"""The ``consulting`` adapter: one question, one reply, then the thread closes.

Exactly two participants. The initiator asks once; the other participant (the respondent)
replies once; that reply moves the thread to ``closing`` with reason ``consulting_complete``
(the hub's sweeper then writes ``thread.closed``). The respondent speaking first and a second
question are refused with NotYourTurnError; anything after the reply finds the thread closing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from agent_network.errors import NotYourTurnError
from agent_network.protocol.adapters.base import BaseAdapter, Proposal, register_adapter
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.knobs import REASON_CONSULTING_COMPLETE
from agent_network.protocol.state import begin_closing

if TYPE_CHECKING:
    from agent_network.model.envelope import Envelope
    from agent_network.protocol.state import ThreadState


@dataclass(frozen=True, slots=True)
class ConsultingState:
    """``asker``/``respondent`` ids and whether the question was asked."""

    asker: str
    respondent: str
    asked: bool = False


def _consulting(state: ThreadState) -> ConsultingState:
    assert isinstance(state.protocol, ConsultingState), "consulting thread without its state"
    return state.protocol


class ConsultingAdapter(BaseAdapter):
    """Strict one question (initiator) -> one reply (respondent) -> closing."""

    name = "consulting"
    min_participants = 2
    max_participants: int | None = 2

    def opened(self, state: ThreadState, env: Envelope) -> ThreadState:
        """The respondent is the participant who is not the initiator."""
        assert state.initiator is not None
        asker = state.initiator[1]
        respondent = next(pid for _, pid in state.participants if pid != asker)
        return replace(state, protocol=ConsultingState(asker, respondent))

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """NotYourTurnError for the respondent speaking first or a second question."""
        super().validate(state, proposal)
        if proposal.type != EV_MESSAGE:
            return
        cs = _consulting(state)
        if not cs.asked and proposal.sender.id != cs.asker:
            raise NotYourTurnError(
                "consulting: the initiator asks first; the respondent replies after the question"
            )
        if cs.asked and proposal.sender.id != cs.respondent:
            raise NotYourTurnError(
                "consulting: one question per thread; wait for the reply (open a new thread to "
                "ask again)"
            )

    def apply(self, state: ThreadState, env: Envelope) -> ThreadState:
        """The question marks ``asked``; the reply starts closing (``consulting_complete``)."""
        if env.type != EV_MESSAGE:
            return state
        cs = _consulting(state)
        if not cs.asked:
            return replace(state, protocol=replace(cs, asked=True))
        return begin_closing(state, REASON_CONSULTING_COMPLETE, env)

    def expected_speaker(self, state: ThreadState) -> str | None:
        """The initiator until the question is asked, then the respondent."""
        cs = _consulting(state)
        return cs.respondent if cs.asked else cs.asker


register_adapter(ConsultingAdapter())
