"""The ``workflow`` adapter: who speaks next follows a declarative :class:`TransitionGraph`.

Open a workflow thread with the knob ``graph`` (``TransitionGraph.to_dict()``); every participant
id or name the graph mentions must be a participant (names through the ``names`` knob). The fold
keeps the expected speaker; a message from anyone else is refused (NotYourTurnError). A message
may carry ``tool_calls`` (see :func:`~agent_network.protocol.tool_call`): a Handoff result
picks the next speaker, a Finish result ends the workflow, and ``tool_called`` rules see the tool
names. ``context.set`` (data ``{"values": {key: JSON value}}``, from a participant or the system)
updates the context that ``context_equals`` rules read, and does not advance the turn. When the
graph terminates (a terminate target, Finish, ``max_turns``) the thread moves to ``closing``
with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from agent_network.errors import InvalidRequestError, NotYourTurnError
from agent_network.protocol.adapters.base import (
    BaseAdapter,
    Proposal,
    register_adapter,
    speaker_label,
)
from agent_network.protocol.adapters.graph import (
    GraphError,
    Terminated,
    ToolSpec,
    TransitionGraph,
    Turn,
    parse_tool_calls,
)
from agent_network.protocol.events import EV_CONTEXT_SET, EV_MESSAGE
from agent_network.protocol.knobs import STATUS_ACTIVE, OpenRequest
from agent_network.protocol.state import begin_closing

if TYPE_CHECKING:
    from agent_network.model.envelope import Envelope, Sender
    from agent_network.protocol.state import ThreadState


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """``graph`` (canonical JSON), the round-robin ``order`` (ids), the ``expected`` speaker
    (None once terminated), ``turns`` taken, the ``context`` as sorted (key, canonical JSON)
    pairs, and the ``summary`` of a Finish."""

    graph: str
    order: tuple[str, ...]
    expected: str | None
    turns: int = 0
    context: tuple[tuple[str, str], ...] = ()
    summary: str | None = None

    def context_dict(self) -> dict[str, Any]:
        """The context as a plain dict of JSON values."""
        return {k: json.loads(v) for k, v in self.context}


@lru_cache(maxsize=512)
def load_graph(text: str) -> TransitionGraph:
    """The graph of a workflow thread from its canonical JSON (cached; treat as read-only)."""
    return TransitionGraph.from_json(text)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _resolver(ids: tuple[str, ...], names: Mapping[str, str]) -> Turn:
    return Turn("", "", (), {}, "", ids, ids, 0, names)


def _workflow(state: ThreadState) -> WorkflowState:
    assert isinstance(state.protocol, WorkflowState), "workflow thread without its state"
    return state.protocol


class WorkflowAdapter(BaseAdapter):
    """Turns follow the thread's transition graph."""

    name = "workflow"
    min_participants = 2

    def check_open(self, request: OpenRequest) -> None:
        """The ``graph`` knob parses and names only participants (InvalidRequestError)."""
        super().check_open(request)
        if "graph" not in request.data:
            raise InvalidRequestError("a workflow thread needs a graph (TransitionGraph.to_dict())")
        graph = TransitionGraph.from_dict(request.data["graph"])
        resolver = _resolver(request.participant_ids, dict(request.knobs.names))
        for ref in graph.references():
            try:
                resolver.resolve(ref)
            except GraphError as exc:
                raise InvalidRequestError(f"graph: {exc.message}") from None

    def opened(self, state: ThreadState, env: Envelope) -> ThreadState:
        """Expected speaker: the graph's initial speaker, else the initiator."""
        graph = TransitionGraph.from_dict(env.data["graph"])
        ids = tuple(pid for _, pid in state.participants)
        resolver = _resolver(ids, dict(state.knobs.names))
        order = tuple(resolver.resolve(o) for o in graph.order) if graph.order else ids
        assert state.initiator is not None
        first = resolver.resolve(graph.initial_speaker) if graph.initial_speaker else None
        ws = WorkflowState(graph.to_json(), order, first or state.initiator[1])
        return replace(state, protocol=ws)

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """Messages only from the expected speaker, with valid tool calls and a route that
        names a participant; ``context.set`` with a non-empty ``values`` object."""
        if proposal.type == EV_CONTEXT_SET:
            values = proposal.data.get("values")
            if not isinstance(values, Mapping) or not values:
                raise InvalidRequestError("context.set needs data {'values': {key: value, ...}}")
            if not all(isinstance(k, str) and k for k in values):
                raise InvalidRequestError("context keys must be non-empty strings")
            return
        super().validate(state, proposal)
        if proposal.type != EV_MESSAGE:
            return
        ws = _workflow(state)
        if proposal.sender.id != ws.expected:
            turn = speaker_label(state, str(ws.expected))
            raise NotYourTurnError(f"workflow: it is {turn}'s turn")
        self._route(state, proposal.sender.id, proposal.data)

    def apply(self, state: ThreadState, env: Envelope) -> ThreadState:
        """A message routes to the next speaker or terminates; context.set updates context."""
        ws = state.protocol
        if not isinstance(ws, WorkflowState):
            return state
        if env.type == EV_CONTEXT_SET:
            merged = dict(ws.context)
            merged.update({k: _canonical(v) for k, v in env.data["values"].items()})
            return replace(state, protocol=replace(ws, context=tuple(sorted(merged.items()))))
        if env.type != EV_MESSAGE:
            return state
        route = self._route(state, env.sender_id, env.data)
        if isinstance(route, Terminated):
            done = replace(ws, turns=ws.turns + 1, expected=None, summary=route.summary)
            return begin_closing(replace(state, protocol=done), route.reason, env)
        return replace(state, protocol=replace(ws, turns=ws.turns + 1, expected=route))

    def expected_speaker(self, state: ThreadState) -> str | None:
        """The graph's current speaker (None once it terminated)."""
        return _workflow(state).expected

    @staticmethod
    def _route(state: ThreadState, speaker: str, data: Mapping[str, Any]) -> str | Terminated:
        ws = _workflow(state)
        calls = parse_tool_calls(data)
        content = data.get("content")
        assert state.initiator is not None
        turn = Turn(
            speaker=speaker,
            content=content if isinstance(content, str) else "",
            tools=calls.names,
            context=ws.context_dict(),
            initiator=state.initiator[1],
            participants=tuple(pid for _, pid in state.participants),
            order=ws.order,
            number=ws.turns + 1,
            names=dict(state.knobs.names),
        )
        return load_graph(ws.graph).route(turn, calls.control)


def tools_for(state: ThreadState, actor: Sender) -> tuple[ToolSpec, ...]:
    """The graph's tools ``actor`` gets in ``state``'s thread (() outside workflow threads or
    while the thread is not active)."""
    ws = state.protocol
    if not isinstance(ws, WorkflowState) or state.status != STATUS_ACTIVE:
        return ()
    graph = load_graph(ws.graph)
    resolver = _resolver(tuple(pid for _, pid in state.participants), dict(state.knobs.names))
    out = []
    for tool in graph.tools:
        if tool.speakers is None or actor.id in {resolver.resolve(s) for s in tool.speakers}:
            out.append(tool)
    return tuple(out)


register_adapter(WorkflowAdapter())
