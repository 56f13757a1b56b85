"""The in-process runner inside protocol threads: it speaks only when the adapter lets it (no
model call otherwise), is triggered by whatever makes it the expected speaker (thread.created,
thread.ack, context.set, a Handoff), keeps audiences out of prompts and replies, and drives a
workflow through the graph's tools (pydantic-ai tool calls and the ``[tool]`` text convention) —
exactly once per trigger, also across a restart of the runner.

Real hub over a real SQLite file; the services create the org, agents, team and routines; the
protocol threads are opened on the hub directly (``thread.created`` plus the ``threads`` /
``thread_participants`` rows the runner's dispatch reads). Models are pydantic-ai
``FunctionModel``s that count their calls.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo
from sqlalchemy import select

from agent_network.client import AsyncClient
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.ids import new_id, now_iso
from agent_network.protocol import (
    AgentTarget,
    FromSpeaker,
    ToolSpec,
    Transition,
    TransitionGraph,
    thread_created_data,
)
from agent_network.protocol.events import (
    EV_CONTEXT_SET,
    EV_MESSAGE,
    EV_THREAD_ACK,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
)
from agent_network.protocol.knobs import epoch
from agent_network.runtime.remote import RemoteRunner
from agent_network.runtime.runner import Job, Runner
from agent_network.runtime.thread_view import (
    HANDOFF_TOOL,
    PASS_REPLY,
    ToolBox,
    graph_tools,
    reply_audience,
    thread_may_speak,
)
from agent_network.services.base import ServiceContext
from agent_network.services.principal import Principal
from agent_network.store.claims import ClaimState
from agent_network.store.tables import audit_log, thread_participants, threads
from conftest import LiveServer, Org, World, all_envelopes, function_model, world

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------ scripted models


@dataclass
class Step:
    """One turn of a scripted model: the text, and optionally a tool call made first."""

    text: str
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


class Scripted:
    """A FunctionModel body that plays ``steps`` turn by turn and counts its turns (a turn is a
    request that does not carry a tool result). ``block_turn``: that turn waits on ``gate``."""

    def __init__(self, *steps: Step | str, block_turn: int | None = None) -> None:
        self.steps = [s if isinstance(s, Step) else Step(s) for s in steps]
        self.turns = 0
        self.prompts: list[str] = []
        self.tools: list[list[str]] = []
        self.block_turn = block_turn
        self.gate = anyio.Event()
        self._after_tool = ""

    def step(self, n: int) -> Step:
        return self.steps[min(n, len(self.steps)) - 1]

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart(self._after_tool)])
        self.turns += 1
        self.prompts.append(prompt_text(messages))
        self.tools.append(sorted(t.name for t in info.function_tools))
        if self.turns == self.block_turn:
            await self.gate.wait()
        step = self.step(self.turns)
        if step.tool is not None:
            self._after_tool = step.text
            return ModelResponse(parts=[ToolCallPart(step.tool, step.args)])
        return ModelResponse(parts=[TextPart(step.text)])


def prompt_text(messages: list[ModelMessage]) -> str:
    out = []
    for m in messages:
        for part in m.parts:
            content = getattr(part, "content", None)
            if isinstance(content, str):
                out.append(content)
    return "\n".join(out)


def model(script: Callable[[list[ModelMessage], AgentInfo], Awaitable[ModelResponse]]) -> str:
    return function_model("proto", script)


# ------------------------------------------------------------------------------ the world


@dataclass
class Cast:
    """What :func:`seed` created: the org principal, the team, and ids by role name."""

    org: Principal
    org_id: str
    team_id: str
    ids: dict[str, str]

    def role(self, pid: str) -> str:
        return next((r for r, i in self.ids.items() if i == pid), pid)

    def actor(self, role: str) -> Sender:
        if role == "ann":
            return Sender("user", self.ids[role], self.org_id, role)
        return Sender("agent", self.ids[role], self.org_id, role)


async def seed(w: World, agents: dict[str, Scripted | None]) -> Cast:
    """An org with the user ``ann`` and one agent per role (its model the role's script, or the
    ``test`` model for None), all in one team, each agent with a participate routine."""
    s = w.services
    admin = Principal("admin", None, "adm_test")
    created = await s.orgs.create_org(admin, "Acme")
    org = await s.orgs.authenticate(created["secret"])
    team = await s.teams.create(org, "team", "Protocols")
    ids: dict[str, str] = {}
    ann = await s.orgs.create_user(org, "Ann", None)
    ids["ann"] = ann["id"]
    await s.teams.add_member(org, "team", team["id"], user_id=ann["id"])
    for role, script in agents.items():
        a = await s.agents.create_agent(
            org, name=role, lookup_key=role, model=model(script) if script else "test"
        )
        ids[role] = a["id"]
        await s.teams.add_member(org, "team", team["id"], agent_id=a["id"])
        await s.agents.create_routine(
            org,
            a["id"],
            name="participate",
            event_type="thread.message_added",
            handler_type="preset",
            preset_name="participate",
        )
    return Cast(org, created["org"]["id"], team["id"], ids)


async def open_thread(
    w: World,
    cast: Cast,
    adapter: str,
    roles: list[str],
    *,
    rows_first: bool = True,
    title: str = "Protocol work",
    **knobs: Any,
) -> str:
    """Open a restricted protocol thread among ``roles`` on the hub (``thread.created``) with
    its ``threads``/``thread_participants`` rows — written before the envelope, or just after
    it (``rows_first=False``, as a service that appends first would)."""
    tid = new_id("thr")
    participants = [(cast.actor(r).kind, cast.ids[r]) for r in roles]
    data = {
        "title": title,
        "team_id": cast.team_id,
        **thread_created_data(adapter, participants, **knobs),
    }

    async def rows() -> None:
        async with w.ctx.engine.begin() as conn:
            await conn.execute(
                threads.insert().values(
                    id=tid,
                    team_id=cast.team_id,
                    org_id=cast.org_id,
                    title=title,
                    adapter=adapter,
                    visibility="restricted",
                    created_at=now_iso(),
                )
            )
            for kind, pid in participants:
                await conn.execute(
                    thread_participants.insert().values(
                        thread_id=tid,
                        member_kind=kind,
                        member_id=pid,
                        org_id=cast.org_id,
                        created_at=now_iso(),
                    )
                )

    if rows_first:
        await rows()
    system = Sender("system", "key_test", cast.org_id)
    await w.hub.append(tid, type=EV_THREAD_CREATED, data=data, sender=system)
    if not rows_first:
        await anyio.sleep(0.02)
        await rows()
    return tid


async def settle(w: World, tid: str, *, quiet: float = 1.0) -> None:
    """Wait until the runner is idle and the thread has not moved for ``quiet`` seconds."""
    with anyio.fail_after(30):
        last, since = -1, time.monotonic()
        while True:
            await w.runner.wait_idle()
            seq = (await w.hub.state(tid)).last_seq
            if seq != last:
                last, since = seq, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await anyio.sleep(0.05)


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it is true (fail after 30 seconds)."""
    with anyio.fail_after(30):
        while True:
            if check():
                return
            await anyio.sleep(0.02)


async def messages(w: World, tid: str) -> list[Envelope]:
    return [e for e in await w.hub.read(tid) if e.type == EV_MESSAGE]


async def audits(w: World, tid: str, action: str | None = None) -> list[dict[str, Any]]:
    """The refusals recorded about the thread (``action``: only those)."""
    q = select(audit_log).where(audit_log.c.resource_id == tid, audit_log.c.outcome == "refused")
    if action is not None:
        q = q.where(audit_log.c.action == action)
    async with w.ctx.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(q)).mappings()]


def one_reply_per_trigger(msgs: list[Envelope]) -> None:
    pairs = Counter((m.sender_id, m.causation_id) for m in msgs if m.sender_kind == "agent")
    assert pairs and max(pairs.values()) == 1, pairs


# ------------------------------------------------------------------------------ discussion


async def test_discussion_three_agents_round_robin_until_the_budget(db: Path) -> None:
    scripts = {r: Scripted(f"{r} has a point.") for r in ("alpha", "beta", "gamma")}
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_thread(w, cast, "discussion", ["alpha", "beta", "gamma"], agent_budget=5)
        await settle(w, tid)

        msgs = await messages(w, tid)
        # the creator opens (triggered by thread.created), then round-robin, wrapping
        assert [cast.role(m.sender_id) for m in msgs] == ["alpha", "beta", "gamma", "alpha", "beta"]
        # a model is called only on its own turn: every agent message of an open thread would
        # otherwise have triggered both other agents
        assert {r: s.turns for r, s in scripts.items()} == {"alpha": 2, "beta": 2, "gamma": 1}
        assert all("it is your turn" in p for s in scripts.values() for p in s.prompts)
        # each reply answers the envelope that gave the turn
        created = (await w.hub.read(tid, limit=1))[0]
        assert [m.causation_id for m in msgs] == [created.id] + [m.id for m in msgs[:-1]]
        one_reply_per_trigger(msgs)
        # the runaway budget stops gamma's second turn before its model is called, audited
        refused = await audits(w, tid, "envelope.message")
        assert [(cast.role(r["principal_id"]), r["reason"].split(":")[0]) for r in refused] == [
            ("gamma", "agent_budget_exhausted")
        ]
        state = await w.hub.state(tid)
        assert state.expected_speaker == cast.ids["gamma"] and state.status == "active"


async def test_an_empty_model_reply_on_a_protocol_turn_passes_the_turn(db: Path) -> None:
    """A model that says nothing usable on a turn the discussion waits for posts PASS_REPLY
    (audited ``routine.passed``) instead of stalling the thread until its TTL."""
    scripts = {"alpha": Scripted("alpha speaks."), "beta": Scripted(""), "gamma": Scripted("g.")}
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_thread(w, cast, "discussion", ["alpha", "beta", "gamma"], agent_budget=3)
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [cast.role(m.sender_id) for m in msgs] == ["alpha", "beta", "gamma"]
        assert msgs[1].data["content"] == PASS_REPLY
        assert scripts["beta"].turns >= 1  # its model was asked (and came out empty)
        q = select(audit_log.c.principal_id).where(
            audit_log.c.resource_id == tid, audit_log.c.action == "routine.passed"
        )
        async with w.ctx.engine.connect() as conn:
            passed = list((await conn.execute(q)).scalars())
        assert [cast.role(p) for p in passed] == ["beta"]


async def test_a_person_in_the_discussion_takes_turns_and_out_of_turn_posts_trigger_nobody(
    db: Path,
) -> None:
    scripts = {r: Scripted(f"{r} answers.") for r in ("alpha", "beta")}
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_thread(w, cast, "discussion", ["ann", "alpha", "beta"])
        await settle(w, tid)
        assert await messages(w, tid) == []  # ann's turn: no agent is triggered
        assert all(s.turns == 0 for s in scripts.values())

        await w.hub.append(
            tid, type=EV_MESSAGE, data={"content": "Kick-off"}, sender=cast.actor("ann")
        )
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [cast.role(m.sender_id) for m in msgs] == ["ann", "alpha", "beta"]
        assert {r: s.turns for r, s in scripts.items()} == {"alpha": 1, "beta": 1}
        assert "Kick-off" in scripts["alpha"].prompts[0]


# ------------------------------------------------------------------------------ consulting


async def test_consulting_between_two_agents_asks_once_and_closes(db: Path) -> None:
    asker, expert = Scripted("Is TLS 1.2 still fine?"), Scripted("Yes, with modern suites.")
    async with world(db) as w:
        cast = await seed(w, {"asker": asker, "expert": expert})
        tid = await open_thread(
            w,
            cast,
            "consulting",
            ["asker", "expert"],
            invitees=[("agent", cast.ids["expert"])],
            title="TLS question",
        )
        await settle(w, tid)
        # invited: nobody's turn yet, so no model call at all
        assert (asker.turns, expert.turns) == (0, 0)
        assert (await w.hub.state(tid)).status == "invited"

        ack = await w.hub.append(tid, type=EV_THREAD_ACK, data={}, sender=cast.actor("expert"))
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [(cast.role(m.sender_id), m.data["content"]) for m in msgs] == [
            ("asker", "Is TLS 1.2 still fine?"),
            ("expert", "Yes, with modern suites."),
        ]
        assert msgs[0].causation_id == ack.id  # the ack that made the thread active
        assert msgs[1].causation_id == msgs[0].id
        assert 'You open the thread "TLS question"' in asker.prompts[0]
        # one question, one reply; the asker is not called again
        assert (asker.turns, expert.turns) == (1, 1)
        state = await w.hub.state(tid)
        assert (state.status, state.close_reason) == ("closing", "consulting_complete")
        closed = await w.hub.sweep(epoch(msgs[-1].created_at))
        assert [(e.type, e.data["reason"]) for e in closed] == [
            ("thread.closed", "consulting_complete")
        ]
        await settle(w, tid)
        assert (asker.turns, expert.turns) == (1, 1)
        assert len(await messages(w, tid)) == 2


async def test_the_rows_of_a_thread_written_after_its_first_envelope_still_start_it(
    db: Path,
) -> None:
    asker, expert = Scripted("A question."), Scripted("An answer.")
    async with world(db) as w:
        cast = await seed(w, {"asker": asker, "expert": expert})
        tid = await open_thread(w, cast, "consulting", ["asker", "expert"], rows_first=False)
        await settle(w, tid)
        assert [cast.role(m.sender_id) for m in await messages(w, tid)] == ["asker", "expert"]
        assert (asker.turns, expert.turns) == (1, 1)


# ------------------------------------------------------------------------------ workflow


def review_graph() -> TransitionGraph:
    return TransitionGraph(
        initial_speaker="researcher",
        transitions=[
            Transition(FromSpeaker("researcher"), AgentTarget("writer")),
            Transition(FromSpeaker("writer"), AgentTarget("reviewer")),
        ],
        tools=[
            ToolSpec("request_revision", "Send the draft back", ("reviewer",), handoff="writer"),
            ToolSpec("approve", "Approve the draft", ("reviewer",), finish="finished"),
        ],
    )


def review_scripts(*, block_writer_turn: int | None = None) -> dict[str, Scripted]:
    return {
        "researcher": Scripted("Facts: TLS encrypts traffic."),
        "writer": Scripted(
            "Draft 1 on TLS.", "Draft 2 on TLS, with an example.", block_turn=block_writer_turn
        ),
        "reviewer": Scripted(
            Step("Needs an example.", "request_revision", {"reason": "add an example"}),
            Step("Good now.", "approve", {"summary": "TLS explained"}),
        ),
    }


async def open_review(w: World, cast: Cast) -> str:
    names = {r: cast.ids[r] for r in ("researcher", "writer", "reviewer")}
    return await open_thread(
        w,
        cast,
        "workflow",
        ["researcher", "writer", "reviewer"],
        graph=review_graph(),
        names=names,
        agent_budget=10,
    )


def wal_shape(cast: Cast, envs: list[Envelope]) -> list[tuple[Any, ...]]:
    """The WAL without ids and times: type, sender role, the seq it answers, content, tools."""
    seq_of = {e.id: e.seq for e in envs}
    return [
        (
            e.type,
            cast.role(e.sender_id) if e.sender_kind != "system" else "system",
            seq_of.get(e.causation_id or ""),
            e.data.get("content"),
            tuple((c["name"], c["result"]) for c in e.data.get("tool_calls", [])),
        )
        for e in envs
    ]


async def test_workflow_review_loop_with_tools_then_finish(db: Path) -> None:
    scripts = review_scripts()
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_review(w, cast)
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [cast.role(m.sender_id) for m in msgs] == [
            "researcher",
            "writer",
            "reviewer",
            "writer",
            "reviewer",
        ]
        assert {r: s.turns for r, s in scripts.items()} == {
            "researcher": 1,
            "writer": 2,
            "reviewer": 2,
        }
        # the graph's tools go to the reviewer only; every speaker gets the generic handoff
        assert scripts["reviewer"].tools[0] == sorted(["approve", "request_revision", "handoff"])
        assert scripts["writer"].tools[0] == [HANDOFF_TOOL]
        assert "[approve: summary]" in scripts["reviewer"].prompts[0]
        revision, approval = msgs[2], msgs[4]
        assert revision.data == {
            "content": "Needs an example.",
            "tool_calls": [
                {
                    "name": "request_revision",
                    "args": {"reason": "add an example"},
                    "result": {"kind": "handoff", "target": "writer", "reason": "add an example"},
                }
            ],
        }
        assert approval.data["tool_calls"] == [
            {
                "name": "approve",
                "args": {"summary": "TLS explained"},
                "result": {"kind": "finish", "summary": "TLS explained", "reason": "finished"},
            }
        ]
        assert msgs[3].causation_id == revision.id  # the Handoff triggered the writer
        state = await w.hub.state(tid)
        assert (state.status, state.close_reason) == ("closing", "finished")
        await w.hub.sweep(epoch(approval.created_at))
        assert (await w.hub.state(tid)).status == "closed"
        one_reply_per_trigger(msgs)


async def test_workflow_restart_mid_way_repeats_nothing_and_ends_the_same(
    db: Path, tmp_path: Path
) -> None:
    # the reference run, uninterrupted, in a database of its own
    ref_db = tmp_path / "reference.db"
    shutil.copyfile(db, ref_db)
    async with world(ref_db) as w:
        ref_cast = await seed(w, dict(review_scripts()))
        ref_tid = await open_review(w, ref_cast)
        await settle(w, ref_tid)
        await w.hub.sweep(epoch((await w.hub.read(ref_tid))[-1].created_at))
        reference = wal_shape(ref_cast, await w.hub.read(ref_tid))

    scripts = review_scripts(block_writer_turn=2)  # the writer's revision hangs in run 1
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_review(w, cast)
        await until(lambda: scripts["writer"].turns >= 2)
        before = await w.hub.read(tid)
        assert [cast.role(m.sender_id) for m in before if m.type == EV_MESSAGE] == [
            "researcher",
            "writer",
            "reviewer",
        ]
    # a new hub and runner over the same database pick the trigger up again
    scripts["writer"].block_turn = None
    async with world(db) as w:
        await settle(w, tid)
        await w.hub.sweep(epoch((await w.hub.read(tid))[-1].created_at))
        after = await w.hub.read(tid)
    assert after[: len(before)] == before
    assert wal_shape(cast, after) == reference
    assert [cast.role(e.sender_id) for e in after if e.type == EV_MESSAGE] == [
        "researcher",
        "writer",
        "reviewer",
        "writer",
        "reviewer",
    ]
    one_reply_per_trigger([e for e in after if e.type == EV_MESSAGE])
    # the interrupted call is the only extra one
    assert {r: s.turns for r, s in scripts.items()} == {
        "researcher": 1,
        "writer": 3,
        "reviewer": 2,
    }


class StopsBeforeClaim(Runner):
    """A runner whose jobs stop just before their claim is written (where a shutdown can land)."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.reached = anyio.Event()

    async def _claim(self, job: Job) -> ClaimState:
        self.reached.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_job_stopped_before_its_claim_is_answered_after_the_restart(db: Path) -> None:
    """A job cancelled by a stop leaves its trigger unhandled (no cursor advance), so the next
    start answers it once. (It used to advance the cursor on the way out: the trigger was lost.)"""
    bot = Scripted("Here I am.")
    async with world(db, StopsBeforeClaim) as w:
        assert isinstance(w.runner, StopsBeforeClaim)
        cast = await seed(w, {"bot": bot})
        tid = (await w.services.threads.create(cast.org, cast.team_id, "Open"))["id"]
        await w.services.threads.post(cast.org, tid, "Anyone there?", user_id=cast.ids["ann"])
        with anyio.fail_after(30):
            await w.runner.reached.wait()
    assert bot.turns == 0
    async with world(db) as w:
        await settle(w, tid)
        msgs = await messages(w, tid)
    assert [(cast.role(m.sender_id), m.data["content"]) for m in msgs] == [
        ("ann", "Anyone there?"),
        ("bot", "Here I am."),
    ]
    assert bot.turns == 1


async def test_text_convention_tags_become_tool_calls(db: Path) -> None:
    # a model without tool calls (like the bundled local model) writes tags instead
    scripts = {
        "researcher": Scripted("Facts gathered."),
        "writer": Scripted("Draft 1.", "Draft 2."),
        "reviewer": Scripted(
            "Please add numbers. [request_revision: add numbers]",
            "[approve: ready to ship]",
        ),
    }
    async with world(db) as w:
        cast = await seed(w, dict(scripts))
        tid = await open_review(w, cast)
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [cast.role(m.sender_id) for m in msgs] == [
            "researcher",
            "writer",
            "reviewer",
            "writer",
            "reviewer",
        ]
        assert msgs[2].data["content"] == "Please add numbers."
        assert msgs[2].data["tool_calls"][0]["result"] == {
            "kind": "handoff",
            "target": "writer",
            "reason": "add numbers",
        }
        assert msgs[4].data["content"] == "Approve."  # only a tag: a short content
        assert msgs[4].data["tool_calls"][0]["result"]["summary"] == "ready to ship"
        assert (await w.hub.state(tid)).close_reason == "finished"


async def test_generic_handoff_and_context_set_trigger_the_expected_speaker(db: Path) -> None:
    # ann -> planner by the graph; the planner stays silent (empty reply) until the context says
    # go, then hands the turn to the checker by the generic handoff tool
    def planner_step(prompt: str) -> Step:
        if "go=true" in prompt:
            return Step("Plan ready.", HANDOFF_TOOL, {"target": "checker", "reason": "verify"})
        return Step("")

    class Planner(Scripted):
        def step(self, n: int) -> Step:
            return planner_step(self.prompts[-1])

    planner, checker = Planner(), Scripted("Checked.")
    graph = TransitionGraph(
        initial_speaker="ann",
        transitions=[Transition(FromSpeaker("ann"), AgentTarget("planner"))],
    )
    async with world(db) as w:
        cast = await seed(w, {"planner": planner, "checker": checker})
        names = {r: cast.ids[r] for r in ("ann", "planner", "checker")}
        tid = await open_thread(
            w, cast, "workflow", ["ann", "planner", "checker"], graph=graph, names=names
        )
        await w.hub.append(
            tid, type=EV_MESSAGE, data={"content": "Plan it"}, sender=cast.actor("ann")
        )
        await settle(w, tid)
        assert planner.turns >= 3  # three attempts, all empty: skipped and audited
        assert [cast.role(m.sender_id) for m in await messages(w, tid)] == ["ann"]
        assert [r["reason"] for r in await audits(w, tid, "routine.skipped")] == [
            "the model's reply was empty after cleaning (3 attempts)"
        ]

        ctx_env = await w.hub.append(
            tid, type=EV_CONTEXT_SET, data={"values": {"go": True}}, sender=cast.actor("ann")
        )
        await settle(w, tid)
        msgs = await messages(w, tid)
        assert [cast.role(m.sender_id) for m in msgs] == ["ann", "planner", "checker"]
        assert msgs[1].causation_id == ctx_env.id
        assert msgs[1].data["tool_calls"] == [
            {
                "name": "handoff",
                "args": {"target": "checker", "reason": "verify"},
                "result": {"kind": "handoff", "target": "checker", "reason": "verify"},
            }
        ]
        assert "Workflow context: go=true" in planner.prompts[-1]
        assert checker.turns == 1


# ------------------------------------------------------------------------------ audience


async def test_audience_limits_triggers_prompts_and_replies(db: Path) -> None:
    alpha, beta = Scripted("Alpha here."), Scripted("Beta here.")
    async with world(db) as w:
        cast = await seed(w, {"alpha": alpha, "beta": beta})
        # an open-adapter thread with a participant list: anyone may speak
        tid = await open_thread(w, cast, "open", ["ann", "alpha", "beta"], agent_budget=2)
        secret = await w.hub.append(
            tid,
            type=EV_MESSAGE,
            data={"content": "Private note for alpha: code 4711"},
            sender=cast.actor("ann"),
            audience=[cast.ids["alpha"]],
        )
        await settle(w, tid)
        msgs = await messages(w, tid)
        # only alpha was triggered; its reply goes to the trigger's audience plus its sender
        assert (alpha.turns, beta.turns) == (1, 0)
        reply = msgs[-1]
        assert cast.role(reply.sender_id) == "alpha" and reply.causation_id == secret.id
        assert reply.audience == [cast.ids["ann"]]
        assert "4711" in alpha.prompts[0]

        await w.hub.append(
            tid, type=EV_MESSAGE, data={"content": "Hello all"}, sender=cast.actor("ann")
        )
        await settle(w, tid)
        assert beta.turns >= 1
        # beta never sees the private note; its first prompt (answering "Hello all") shows
        # no line of alpha either: alpha's only earlier message was private to ann
        assert all("4711" not in p for p in beta.prompts)
        assert "Hello all" in beta.prompts[0] and "Alpha here" not in beta.prompts[0]


# ------------------------------------------------------------------------------ races


async def test_a_thread_closing_while_the_model_runs_gets_no_reply(db: Path) -> None:
    slow = Scripted("Late answer.", block_turn=1)
    async with world(db) as w:
        cast = await seed(w, {"slow": slow})
        tid = await open_thread(w, cast, "conversation", ["ann", "slow"])
        await w.hub.append(tid, type=EV_MESSAGE, data={"content": "Hi"}, sender=cast.actor("ann"))
        await until(lambda: slow.turns >= 1)
        await w.hub.append(
            tid, type=EV_THREAD_CLOSING, data={"reason": "done"}, sender=cast.actor("ann")
        )
        slow.gate.set()
        await settle(w, tid)
        assert [cast.role(m.sender_id) for m in await messages(w, tid)] == ["ann"]
        # the re-check before the append stopped it: no refused append in the audit log
        assert await audits(w, tid, "envelope.message") == []


# ------------------------------------------------------------------------------ pure helpers


def test_thread_may_speak_from_the_rest_view() -> None:
    base = {
        "status": "active",
        "participants": [["agent", "agt_a"], {"kind": "agent", "id": "agt_b"}],
        "expected_speaker": "agt_a",
        "pending_acks": [],
        "agent_budget": 4,
        "consecutive_agent_messages": 1,
    }
    assert thread_may_speak(base, "agt_a")
    assert not thread_may_speak(base, "agt_b")  # not its turn
    assert not thread_may_speak(base, "agt_x")  # not a participant
    assert thread_may_speak({**base, "expected_speaker": None}, "agt_b")
    assert not thread_may_speak({**base, "status": "closing"}, "agt_a")
    assert not thread_may_speak({**base, "status": "invited"}, "agt_a")
    assert not thread_may_speak({**base, "pending_acks": [["agent", "agt_b"]]}, "agt_a")
    assert not thread_may_speak({**base, "consecutive_agent_messages": 4}, "agt_a")
    # an open thread of an older server: no protocol fields at all
    assert thread_may_speak({"status": "open", "agent_budget": 4}, "agt_z")


def test_reply_audience() -> None:
    ids = ["usr_a", "agt_b", "agt_c"]
    assert reply_audience(None, ("user", "usr_a"), "agt_b", ids) is None
    assert reply_audience(["agt_b"], ("user", "usr_a"), "agt_b", ids) == ["usr_a"]
    assert reply_audience(["agt_b", "agt_c"], ("user", "usr_a"), "agt_b", ids) == [
        "agt_c",
        "usr_a",
    ]
    # a system sender is not a participant; nobody else left: the reply stays private
    assert reply_audience(["agt_b"], ("system", "key_1"), "agt_b", ids) == ["agt_b"]


def test_toolbox_text_tags_and_one_decision_per_turn() -> None:
    ids = ("agt_r", "agt_w", "agt_v")
    names = {"researcher": "agt_r", "writer": "agt_w", "reviewer": "agt_v"}
    created = {
        "adapter": "workflow",
        "participants": [["agent", i] for i in ids],
        "names": names,
        "graph": review_graph().to_dict(),
    }
    box = graph_tools(created, "agt_v")
    assert box.names == ("request_revision", "approve", HANDOFF_TOOL)
    assert graph_tools(created, "agt_w").names == (HANDOFF_TOOL,)
    assert graph_tools({**created, "adapter": "discussion"}, "agt_v").names == ()
    # a trailing tag is a call; a tag in the middle, or of a tool not offered, is text
    assert box.take_tags("Looks [approve] fine. [nope]") == "Looks [approve] fine. [nope]"
    assert box.calls == []
    assert box.take_tags("Fine.\n[approve: all good]  ") == "Fine."
    assert box.calls[0]["result"] == {"kind": "finish", "summary": "all good", "reason": "finished"}
    box.reset()
    # a small model going on after its tag: the first offered tag ending a line ends the reply
    assert box.take_tags("Fine. [approve]\nUser: and now?") == "Fine."
    assert [c["name"] for c in box.calls] == ["approve"]
    # a second decision in the same turn is not recorded
    assert "already decided" in box.call("request_revision", "more")
    assert len(box.calls) == 1
    box.reset()
    assert "not a participant" in box.call(HANDOFF_TOOL, "x", target="nobody")
    assert box.take_tags("Over to you. [handoff: writer, needs polish]") == "Over to you."
    assert box.calls == [
        {
            "name": "handoff",
            "args": {"target": "writer", "reason": "needs polish"},
            "result": {"kind": "handoff", "target": "writer", "reason": "needs polish"},
        }
    ]
    assert ToolBox((), (), lambda _: None).names == ()


# ------------------------------------------------------------------------------ remote runner


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A live server without the in-process runner (only the remote runner answers)."""
    srv = LiveServer(tmp_path / "remote.db", run_routines=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_remote_runner_speaks_only_on_its_turn(quiet_server: LiveServer) -> None:
    """A discussion opened over REST (ann, alpha, beta): ann's message triggers both agents in
    the remote runner, but only alpha — whose turn it is by ``GET /threads/{id}`` — calls its
    model; alpha's reply then gives beta its turn."""
    alpha, beta = Scripted("Alpha speaks."), Scripted("Beta speaks.")
    org = Org(quiet_server, "Acme")
    try:
        ann = org.user("Ann")
        bots = {
            role: org.agent(role, role, model=model(script))
            for role, script in (("alpha", alpha), ("beta", beta))
        }
        for bot in bots.values():
            org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
        team = org.team("Team", ("user", ann["id"]), *(("agent", b["id"]) for b in bots.values()))
        people = [
            {"kind": "user", "id": ann["id"]},
            *({"kind": "agent", "id": b["id"]} for b in bots.values()),
        ]
        thread = org.ok(
            "POST",
            f"/teams/{team['id']}/threads",
            json={
                "title": "Remote talk",
                "adapter": "discussion",
                "participants": people,
                "invitees": [],
            },
        )
        tid = thread["id"]
        assert thread["expected_speaker"] == ann["id"]

        async def run() -> None:
            async with AsyncClient(quiet_server.url, org.key) as client:
                remote = RemoteRunner(client, relist_seconds=0.3, poll_wait=1.0)
                async with anyio.create_task_group() as tg:
                    await tg.start(remote.run)
                    await client.threads.post(tid, "Kick-off", user_id=ann["id"])
                    # jobs: ann's message (x2), alpha's and beta's
                    await until(lambda: remote.replies >= 2 and remote.jobs_done >= 4)
                    await anyio.sleep(0.5)  # nothing more may happen
                    tg.cancel_scope.cancel()

        anyio.run(run)
        msgs = all_envelopes(org.http, tid, messages_only=True)
        assert [m["sender"]["name"] for m in msgs] == ["Ann", "alpha", "beta"]
        assert (alpha.turns, beta.turns) == (1, 1)
        assert msgs[2]["causation_id"] == msgs[1]["id"]
        assert org.ok("GET", f"/threads/{tid}")["expected_speaker"] == ann["id"]
    finally:
        org.http.close()


def test_consulting_opened_over_rest_runs_by_itself(tmp_path: Path) -> None:
    """End to end through the REST surface: a consulting thread between two agents opened by
    the org; the respondent acks by itself (its rule admits it), the ack activates the thread,
    the asker (triggered by it) asks, the respondent answers, the thread closes."""
    asker, expert = Scripted("Which cipher suite?"), Scripted("Use TLS_AES_128_GCM_SHA256.")
    srv = LiveServer(tmp_path / "rest.db")
    srv.start()
    org = Org(srv, "Acme")
    try:
        bots = {
            role: org.agent(role, role, model=model(script))
            for role, script in (("asker", asker), ("expert", expert))
        }
        for bot in bots.values():
            org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
        team = org.team("Team", *(("agent", b["id"]) for b in bots.values()))
        thread = org.ok(
            "POST",
            f"/teams/{team['id']}/threads",
            json={
                "title": "Cipher question",
                "adapter": "consulting",
                "participants": [{"kind": "agent", "id": b["id"]} for b in bots.values()],
            },
        )
        tid = thread["id"]

        def closed() -> bool:
            return bool(org.ok("GET", f"/threads/{tid}")["status"] in ("closing", "closed"))

        deadline = time.monotonic() + 30
        while not closed() and time.monotonic() < deadline:
            time.sleep(0.05)
        msgs = all_envelopes(org.http, tid, messages_only=True)
        assert [m["sender"]["name"] for m in msgs] == ["asker", "expert"]
        assert (asker.turns, expert.turns) == (1, 1)
        assert org.ok("GET", f"/threads/{tid}")["close_reason"] == "consulting_complete"
    finally:
        org.http.close()
        srv.stop()
