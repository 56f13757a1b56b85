"""The workflow adapter and its transition graph: routing semantics (conditions, targets,
priority, default target, max_turns, Handoff, Finish, context), the factories, JSON round-trip,
the registries of custom conditions and targets, and the researcher -> writer -> reviewer
workflow with one revision loop, run on the real hub over a real SQLite file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent_network.errors import (
    AgentNetworkError,
    InvalidRequestError,
    NotYourTurnError,
    ProtocolViolationError,
    ThreadClosedError,
)
from agent_network.hub import Hub
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.ids import new_id
from agent_network.protocol import (
    AgentTarget,
    Always,
    Condition,
    ContextEquals,
    Finish,
    FromSpeaker,
    Handoff,
    RevertToInitiatorTarget,
    RoundRobinTarget,
    StayTarget,
    Target,
    Terminated,
    TerminateTarget,
    ToolCalled,
    ToolSpec,
    Transition,
    TransitionGraph,
    Turn,
    WorkflowState,
    may_speak,
    register_condition,
    register_target,
    thread_created_data,
    tool_call,
    tools_for,
)
from agent_network.protocol.adapters.graph import Route, parse_tool_calls
from agent_network.protocol.events import (
    EV_CONTEXT_SET,
    EV_MESSAGE,
    EV_THREAD_CLOSED,
    EV_THREAD_CREATED,
)
from agent_network.protocol.fold import fold
from agent_network.protocol.knobs import epoch
from agent_network.protocol.state import ThreadState
from agent_network.store.engine import create_engine, database_url

ORG = "org_workflow"
SYSTEM = Sender("system", "key_test", ORG)
RESEARCHER = Sender("agent", "agt_researcher", ORG)
WRITER = Sender("agent", "agt_writer", ORG)
REVIEWER = Sender("agent", "agt_reviewer", ORG)
EDITOR = Sender("user", "usr_editor", ORG)
TEAM = (RESEARCHER, WRITER, REVIEWER)
NAMES = {"researcher": RESEARCHER.id, "writer": WRITER.id, "reviewer": REVIEWER.id}
IDS = tuple(a.id for a in TEAM)


# ------------------------------------------------------------------------------ pure routing


def turn(
    speaker: str,
    *,
    tools: tuple[str, ...] = (),
    context: dict[str, Any] | None = None,
    number: int = 1,
    order: tuple[str, ...] = IDS,
    content: str = "",
) -> Turn:
    return Turn(
        speaker=speaker,
        content=content,
        tools=tools,
        context=context or {},
        initiator=RESEARCHER.id,
        participants=IDS,
        order=order,
        number=number,
        names=NAMES,
    )


R, W, V = IDS


def test_priority_decides_between_matching_rules_then_list_order() -> None:
    graph = TransitionGraph(
        transitions=[
            Transition(Always(), AgentTarget("writer")),
            Transition(FromSpeaker("researcher"), AgentTarget("reviewer"), priority=5),
            Transition(FromSpeaker(R), StayTarget(), priority=5),  # same priority, later
        ]
    )
    assert graph.route(turn(R)) == V
    assert graph.route(turn(W)) == W  # only `always` matches


def test_default_target_and_the_no_transition_fallback() -> None:
    graph = TransitionGraph(transitions=[Transition(FromSpeaker(R), AgentTarget(W))])
    assert graph.route(turn(W)) == Terminated("no_transition")
    with_default = TransitionGraph(
        transitions=[Transition(FromSpeaker(R), AgentTarget(W))],
        default_target=RevertToInitiatorTarget(),
    )
    assert with_default.route(turn(V)) == R


def test_targets_round_robin_wraps_stay_and_terminate() -> None:
    rr = TransitionGraph(transitions=[Transition(Always(), RoundRobinTarget())])
    assert [rr.route(turn(s)) for s in IDS] == [W, V, R]
    custom_order = TransitionGraph(
        transitions=[Transition(Always(), RoundRobinTarget())], order=[V, R]
    )
    assert custom_order.route(turn(V, order=(V, R))) == R
    assert custom_order.route(turn(W, order=(V, R))) == V  # not in the order: its first
    stay = TransitionGraph(transitions=[Transition(Always(), StayTarget())])
    assert stay.route(turn(W)) == W
    end = TransitionGraph(transitions=[Transition(Always(), TerminateTarget("done"))])
    assert end.route(turn(W)) == Terminated("done")


def test_tool_called_and_context_equals_conditions() -> None:
    graph = TransitionGraph(
        transitions=[
            Transition(ToolCalled("approve"), TerminateTarget("approved")),
            Transition(ContextEquals("phase", {"n": 2}), AgentTarget(V)),
        ],
        default_target=AgentTarget(W),
    )
    assert graph.route(turn(V, tools=("search", "approve"))) == Terminated("approved")
    assert graph.route(turn(R, context={"phase": {"n": 2}})) == V
    assert graph.route(turn(R, context={"phase": {"n": 3}})) == W
    assert graph.route(turn(R)) == W


def test_handoff_overrides_static_rules_and_finish_terminates() -> None:
    graph = TransitionGraph(
        transitions=[Transition(ToolCalled("request_revision"), TerminateTarget("static"))]
    )
    t = turn(V, tools=("request_revision",))
    assert graph.route(t) == Terminated("static")
    assert graph.route(t, Handoff("writer", "tighten it")) == W  # by name
    assert graph.route(t, Handoff(W)) == W  # by id
    assert graph.route(t, Finish("all good")) == Terminated("finished", "all good")
    assert graph.route(t, Finish(reason="shipped")) == Terminated("shipped")
    with pytest.raises(ProtocolViolationError, match="not a participant"):
        graph.route(t, Handoff("stranger"))


def test_max_turns_terminates_unless_the_graph_already_did() -> None:
    graph = TransitionGraph(
        transitions=[
            Transition(ToolCalled("stop"), TerminateTarget("stopped")),
            Transition(Always(), RoundRobinTarget()),
        ],
        max_turns=3,
    )
    assert graph.route(turn(R, number=2)) == W
    assert graph.route(turn(W, number=3)) == Terminated("max_turns")
    assert graph.route(turn(W, number=3, tools=("stop",))) == Terminated("stopped")


def test_factories() -> None:
    seq = TransitionGraph.sequence([R, W, V])
    assert seq.initial_speaker == R
    assert [seq.route(turn(s)) for s in IDS] == [W, V, Terminated("sequence_complete")]
    rr = TransitionGraph.round_robin([V, R], max_turns=3)
    assert rr.initial_speaker == V
    assert rr.route(turn(V, order=(V, R), number=1)) == R
    assert rr.route(turn(R, order=(V, R), number=2)) == V
    assert rr.route(turn(V, order=(V, R), number=3)) == Terminated("max_turns")
    for bad in ([], [R, R]):
        with pytest.raises(InvalidRequestError):
            TransitionGraph.sequence(bad)
    with pytest.raises(InvalidRequestError):
        TransitionGraph.round_robin([R, W], max_turns=0)


def full_graph() -> TransitionGraph:
    return TransitionGraph(
        initial_speaker="researcher",
        transitions=[
            Transition(ToolCalled("approve"), TerminateTarget("approved"), priority=10),
            Transition(FromSpeaker("researcher"), AgentTarget("writer")),
            Transition(FromSpeaker(W), AgentTarget(V)),
            Transition(ContextEquals("mode", ["fast", 1, None]), StayTarget(), priority=-1),
            Transition(Always(), RoundRobinTarget(), priority=-5),
        ],
        default_target=RevertToInitiatorTarget(),
        max_turns=12,
        order=[R, W, V],
        tools=[
            ToolSpec(
                "request_revision", "Send the draft back", speakers=("reviewer",), handoff="writer"
            ),
            ToolSpec("approve", "Approve the draft", speakers=("reviewer",)),
            ToolSpec("give_up", "End it", finish="abandoned"),
        ],
    )


def test_json_round_trip() -> None:
    graph = full_graph()
    text = graph.to_json()
    again = TransitionGraph.from_json(text)
    assert again == graph
    assert again.to_json() == text
    assert TransitionGraph.from_dict(json.loads(json.dumps(graph.to_dict()))) == graph
    assert json.loads(text)["transitions"][0] == {
        "when": {"kind": "tool_called", "tool": "approve"},
        "then": {"kind": "terminate", "reason": "approved"},
        "priority": 10,
    }
    for factory in (TransitionGraph.sequence(IDS), TransitionGraph.round_robin(IDS, max_turns=4)):
        assert TransitionGraph.from_json(factory.to_json()) == factory


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"transitions": [{"when": {"kind": "sometimes"}, "then": {"kind": "stay"}}]}, "unknown"),
        ({"transitions": [{"when": {"kind": "always"}, "then": {"kind": "warp"}}]}, "unknown"),
        ({"transitions": [{"when": {"kind": "from_speaker"}, "then": {"kind": "stay"}}]}, "bad"),
        (
            {"transitions": [{"when": {"kind": "always", "x": 1}, "then": {"kind": "stay"}}]},
            "takes",
        ),
        (
            {
                "transitions": [
                    {"when": {"kind": "always"}, "then": {"kind": "stay"}, "priority": "hi"}
                ]
            },
            "priority",
        ),
        ({"max_turns": 0}, "max_turns"),
        ({"colour": "blue"}, "unknown graph fields"),
        ({"tools": [{"description": "no name"}]}, "tool"),
        ("not an object", "object"),
    ],
)
def test_bad_graphs_are_refused_with_a_reason(data: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        TransitionGraph.from_dict(data)
    assert fragment in info.value.message
    with pytest.raises(InvalidRequestError):
        TransitionGraph.from_json("{not json")


@register_condition
@dataclass(frozen=True)
class ContentContains(Condition):
    kind: ClassVar[str] = "test_content_contains"
    text: str

    def matches(self, turn: Turn) -> bool:
        return self.text in turn.content


@register_target
@dataclass(frozen=True)
class LastInOrder(Target):
    kind: ClassVar[str] = "test_last_in_order"

    def route(self, turn: Turn) -> Route:
        return turn.order[-1]


def test_custom_conditions_and_targets_through_the_registry() -> None:
    graph = TransitionGraph(
        transitions=[Transition(ContentContains("URGENT"), LastInOrder())],
        default_target=AgentTarget(W),
    )
    again = TransitionGraph.from_json(graph.to_json())
    assert again == graph
    assert again.route(turn(R, content="URGENT: fix")) == V
    assert again.route(turn(R, content="whenever")) == W


def test_tool_calls_in_message_data() -> None:
    data = {
        "content": "needs work",
        "tool_calls": [
            tool_call("search", "3 results", args={"q": "tls"}),
            tool_call("request_revision", Handoff("writer", "cite sources")),
        ],
    }
    calls = parse_tool_calls(json.loads(json.dumps(data)))
    assert calls.names == ("search", "request_revision")
    assert calls.control == Handoff("writer", "cite sources")
    two = {"tool_calls": [tool_call("a", Finish()), tool_call("b", Handoff("writer"))]}
    for bad in ({"tool_calls": "approve"}, {"tool_calls": [{"args": {}}]}, two):
        with pytest.raises(InvalidRequestError):
            parse_tool_calls(bad)
    with pytest.raises(InvalidRequestError):
        parse_tool_calls({"tool_calls": [{"name": "x", "result": {"kind": "handoff"}}]})


# ------------------------------------------------------------------------------ on the hub


@contextlib.asynccontextmanager
async def running_hub(db: Path) -> AsyncIterator[Hub]:
    engine = create_engine(database_url(db))
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            yield hub
    finally:
        await engine.dispose()


async def open_workflow(hub: Hub, graph: TransitionGraph, *members: Sender, **knobs: Any) -> str:
    tid = new_id("thr")
    data = {
        "title": "workflow",
        "team_id": "team_x",
        "agent_budget": 100,
        **thread_created_data(
            "workflow",
            [(m.kind, m.id) for m in (members or TEAM)],
            graph=graph,
            names=NAMES,
            **knobs,
        ),
    }
    await hub.append(tid, type=EV_THREAD_CREATED, data=data, sender=SYSTEM)
    return tid


async def send(
    hub: Hub, tid: str, sender: Sender, content: str = "...", *calls: dict[str, Any]
) -> Envelope:
    data: dict[str, Any] = {"content": content}
    if calls:
        data["tool_calls"] = list(calls)
    return await hub.append(tid, type=EV_MESSAGE, data=data, sender=sender)


async def refused(
    hub: Hub, tid: str, sender: Sender, error: type[AgentNetworkError], *calls: dict[str, Any]
) -> None:
    before = await hub.read(tid)
    with pytest.raises(error):
        await send(hub, tid, sender, "out of turn", *calls)
    assert await hub.read(tid) == before


async def state_of(hub: Hub, tid: str) -> ThreadState:
    live = await hub.state(tid)
    assert live == fold(tid, await hub.read(tid))
    return live


async def expect_turn(hub: Hub, tid: str, speaker: Sender) -> None:
    state = await state_of(hub, tid)
    assert state.expected_speaker == speaker.id
    assert {a.id for a in TEAM if may_speak(state, a)} == {speaker.id}
    for other in TEAM:
        if other != speaker:
            await refused(hub, tid, other, NotYourTurnError)


def review_graph() -> TransitionGraph:
    """The seed's example: request_revision routes itself by Handoff; approve is static."""
    return TransitionGraph(
        initial_speaker="researcher",
        transitions=[
            Transition(ToolCalled("approve"), TerminateTarget("approved")),
            Transition(FromSpeaker("researcher"), AgentTarget("writer")),
            Transition(FromSpeaker("writer"), AgentTarget("reviewer")),
        ],
        tools=[
            ToolSpec("request_revision", "Send the draft back", ("reviewer",), handoff="writer"),
            ToolSpec("approve", "Approve the draft and end the workflow", ("reviewer",)),
        ],
    )


@pytest.mark.anyio
async def test_researcher_writer_reviewer_with_one_revision_loop(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, review_graph())
        await expect_turn(hub, tid, RESEARCHER)
        await send(hub, tid, RESEARCHER, "- TLS encrypts\n- certificates\n- key exchange")
        await expect_turn(hub, tid, WRITER)
        await send(hub, tid, WRITER, "Draft 1")
        await expect_turn(hub, tid, REVIEWER)
        # reviewer tools only for the reviewer
        state = await hub.state(tid)
        assert [t.name for t in tools_for(state, REVIEWER)] == ["request_revision", "approve"]
        assert tools_for(state, WRITER) == ()
        await send(
            hub,
            tid,
            REVIEWER,
            "Needs an example.",
            tool_call("request_revision", Handoff("writer", "add an example")),
        )
        await expect_turn(hub, tid, WRITER)  # the Handoff picked the writer
        await send(hub, tid, WRITER, "Draft 2 with an example")
        await expect_turn(hub, tid, REVIEWER)
        last = await send(hub, tid, REVIEWER, "Approved.", tool_call("approve", "Approved."))
        state = await state_of(hub, tid)
        assert (state.status, state.close_reason, state.expected_speaker) == (
            "closing",
            "approved",
            None,
        )
        for member in TEAM:
            await refused(hub, tid, member, ThreadClosedError)
        written = await hub.sweep(epoch(last.created_at))
        assert [(e.type, e.data["reason"]) for e in written] == [(EV_THREAD_CLOSED, "approved")]
        messages = [e for e in await hub.read(tid) if e.type == EV_MESSAGE]
        assert [e.sender_id for e in messages] == [R, W, V, W, V]
        ws = (await state_of(hub, tid)).protocol
        assert isinstance(ws, WorkflowState) and ws.turns == 5


@pytest.mark.anyio
async def test_sequence_closes_with_sequence_complete(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, TransitionGraph.sequence(["writer", "researcher", V]))
        for actor in (WRITER, RESEARCHER, REVIEWER):
            await expect_turn(hub, tid, actor)
            await send(hub, tid, actor)
        state = await state_of(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "sequence_complete")


@pytest.mark.anyio
async def test_round_robin_closes_after_max_turns(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, TransitionGraph.round_robin(IDS, max_turns=5))
        for actor in (RESEARCHER, WRITER, REVIEWER, RESEARCHER):
            await expect_turn(hub, tid, actor)
            await send(hub, tid, actor)
        assert (await state_of(hub, tid)).status == "active"
        await expect_turn(hub, tid, WRITER)
        await send(hub, tid, WRITER)
        state = await state_of(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "max_turns")


@pytest.mark.anyio
async def test_context_set_does_not_advance_the_turn_and_routes(db: Path) -> None:
    graph = TransitionGraph(
        initial_speaker=R,
        transitions=[
            Transition(ContextEquals("needs_review", True), AgentTarget(V), priority=1),
            Transition(Always(), RevertToInitiatorTarget()),
        ],
    )
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, graph, *TEAM, EDITOR)
        await send(hub, tid, RESEARCHER)
        await expect_turn(hub, tid, RESEARCHER)  # revert_to_initiator
        # anyone taking part (or the system) may set context; the turn stays put
        await hub.append(
            tid, type=EV_CONTEXT_SET, data={"values": {"needs_review": True}}, sender=EDITOR
        )
        await expect_turn(hub, tid, RESEARCHER)
        ws = (await state_of(hub, tid)).protocol
        assert isinstance(ws, WorkflowState) and ws.context_dict() == {"needs_review": True}
        assert ws.turns == 1
        await send(hub, tid, RESEARCHER)
        await expect_turn(hub, tid, REVIEWER)
        for bad in ({}, {"values": {}}, {"values": ["x"]}):
            with pytest.raises(InvalidRequestError):
                await hub.append(tid, type=EV_CONTEXT_SET, data=bad, sender=EDITOR)
        with pytest.raises(ProtocolViolationError):
            await hub.append(
                tid,
                type=EV_CONTEXT_SET,
                data={"values": {"x": 1}},
                sender=Sender("agent", "agt_stranger", ORG),
            )


@pytest.mark.anyio
async def test_bad_handoffs_and_finish(db: Path) -> None:
    graph = TransitionGraph(initial_speaker=R, default_target=AgentTarget(W))
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, graph)
        await refused(
            hub, tid, RESEARCHER, ProtocolViolationError, tool_call("h", Handoff("nobody"))
        )
        await refused(
            hub,
            tid,
            RESEARCHER,
            InvalidRequestError,
            tool_call("h", Handoff(W)),
            tool_call("f", Finish()),
        )
        await send(hub, tid, RESEARCHER, "over to you")
        await expect_turn(hub, tid, WRITER)
        await send(hub, tid, WRITER, "done", tool_call("finish", Finish("wrote it")))
        state = await state_of(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "finished")
        ws = state.protocol
        assert isinstance(ws, WorkflowState) and ws.summary == "wrote it"


@pytest.mark.anyio
async def test_graph_must_name_participants_when_the_thread_opens(db: Path) -> None:
    async with running_hub(db) as hub:
        for graph in (
            TransitionGraph(initial_speaker="agt_ghost"),
            TransitionGraph(transitions=[Transition(FromSpeaker("ghost"), StayTarget())]),
            TransitionGraph(transitions=[Transition(Always(), AgentTarget("ghost"))]),
            TransitionGraph(tools=[ToolSpec("t", handoff="ghost")]),
            TransitionGraph.round_robin([R, "agt_ghost"], max_turns=2),
        ):
            tid = new_id("thr")
            with pytest.raises(InvalidRequestError, match="ghost"):
                await hub.append(
                    tid,
                    type=EV_THREAD_CREATED,
                    data={
                        "adapter": "workflow",
                        "participants": [[a.kind, a.id] for a in TEAM],
                        "graph": graph.to_dict(),
                    },
                    sender=SYSTEM,
                )
            assert await hub.read(tid) == []


@pytest.mark.anyio
async def test_workflow_state_survives_a_restart(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = await open_workflow(hub, review_graph())
        await send(hub, tid, RESEARCHER)
        await send(hub, tid, WRITER)
        await hub.append(tid, type=EV_CONTEXT_SET, data={"values": {"k": [1, 2]}}, sender=SYSTEM)
        live = await state_of(hub, tid)
    async with running_hub(db) as hub:
        assert await hub.state(tid) == live
        await expect_turn(hub, tid, REVIEWER)
