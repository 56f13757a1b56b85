"""The remote runner inside protocol threads: triggers that are not messages (the ``thread.ack``
that activates a thread whose first speaker is an agent, a ``context.set``), the claim API's
trigger rule, workflow tools from ``GET /threads/{id}/tools`` end to end, and catch-up after the
fact — one reply per (agent, trigger) on every path.

A real server (uvicorn on 127.0.0.1 over a real SQLite file) without the in-process runner, so
only the :class:`RemoteRunner` under test (in the test process, talking REST) answers. Models are
pydantic-ai ``FunctionModel``s that count their turns and record prompts and offered tools.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
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

from agent_network.client import AsyncClient, Envelope, Sender
from agent_network.protocol import AgentTarget, FromSpeaker, ToolSpec, Transition, TransitionGraph
from agent_network.runtime.remote import AgentCard, RemoteJob, RemoteRunner, may_trigger
from agent_network.runtime.thread_view import HANDOFF_TOOL
from conftest import LiveServer, Org, all_envelopes, assert_error, function_model

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A live server without the in-process runner (only the remote runner answers)."""
    srv = LiveServer(tmp_path / "remote.db", run_routines=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def org(quiet_server: LiveServer) -> Iterator[Org]:
    acme = Org(quiet_server, "Acme")
    try:
        yield acme
    finally:
        acme.http.close()


# ------------------------------------------------------------------------------ scripted models


@dataclass
class Step:
    """One turn: the text, and optionally a pydantic-ai tool call made first."""

    text: str
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


class Scripted:
    """A FunctionModel body playing ``steps`` turn by turn (the last one repeats); counts its
    turns (requests that do not carry a tool result) and records prompts and offered tools."""

    def __init__(self, *steps: Step | str) -> None:
        self.steps = [s if isinstance(s, Step) else Step(s) for s in steps]
        self.turns = 0
        self.prompts: list[str] = []
        self.tools: list[list[str]] = []
        self._after_tool = ""

    def step(self, n: int) -> Step:
        return self.steps[min(n, len(self.steps)) - 1]

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart(self._after_tool)])
        self.turns += 1
        self.prompts.append(
            "\n".join(
                str(getattr(part, "content", ""))
                for m in messages
                for part in m.parts
                if isinstance(getattr(part, "content", None), str)
            )
        )
        self.tools.append(sorted(t.name for t in info.function_tools))
        step = self.step(self.turns)
        if step.tool is not None:
            self._after_tool = step.text
            return ModelResponse(parts=[ToolCallPart(step.tool, step.args)])
        return ModelResponse(parts=[TextPart(step.text)])


def model(script: Callable[[list[ModelMessage], AgentInfo], Awaitable[ModelResponse]]) -> str:
    return function_model("remote-proto", script)


# ------------------------------------------------------------------------------ helpers


def agents(org: Org, scripts: dict[str, Scripted | None]) -> dict[str, dict[str, Any]]:
    """One agent per role (name and lookup key = the role), its model the role's script (None:
    the ``test`` model), each with a participate routine."""
    out = {}
    for role, script in scripts.items():
        extra = {"model": model(script)} if script is not None else {}
        bot = org.agent(role, role, **extra)
        org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
        out[role] = bot
    return out


def open_thread(org: Org, team_id: str, **body: Any) -> dict[str, Any]:
    return dict(org.ok("POST", f"/teams/{team_id}/threads", json={"title": "Work", **body}))


def envelopes(org: Org, tid: str) -> list[dict[str, Any]]:
    return list(all_envelopes(org.http, tid))


def messages(org: Org, tid: str) -> list[dict[str, Any]]:
    return [e for e in envelopes(org, tid) if e["type"] == "message"]


def one_reply_per_trigger(msgs: list[dict[str, Any]]) -> None:
    """No agent answered one envelope twice, and every agent reply carries the reply key."""
    replies = [m for m in msgs if m["sender"]["kind"] == "agent"]
    pairs = Counter((m["sender"]["id"], m["causation_id"]) for m in replies)
    assert pairs and max(pairs.values()) == 1, pairs
    for m in replies:
        assert m["idempotency_key"] == f"reply:{m['sender']['id']}:{m['causation_id']}"


def claim_done(db: Path, agent_id: str, tid: str, seq: int) -> bool:
    with sqlite3.connect(db, timeout=10) as conn:
        row = conn.execute(
            "SELECT done FROM runner_claims WHERE agent_id = ? AND thread_id = ? "
            "AND trigger_seq = ?",
            (agent_id, tid, seq),
        ).fetchone()
    return bool(row and row[0])


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 30) -> None:
    """Poll the async ``check`` until it is true; fail naming ``what`` after ``within`` s."""
    with anyio.move_on_after(within):
        while True:
            if await check():
                return
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def remote(srv: LiveServer, key: str, **kw: Any) -> AsyncIterator[tuple[RemoteRunner, Any]]:
    """A running RemoteRunner with its own AsyncClient; cancelled on exit."""
    async with AsyncClient(srv.url, key) as client:
        runner = RemoteRunner(client, relist_seconds=0.3, poll_wait=1.0, **kw)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            yield runner, client
            tg.cancel_scope.cancel()


async def thread_status(client: Any, tid: str) -> tuple[str, str | None]:
    t = await client.threads.get(tid)
    return str(t.status), t.close_reason


# ------------------------------------------------------------------------------ claim API


def test_claims_follow_the_turn_on_any_envelope_and_refuse_the_rest(
    quiet_server: LiveServer, org: Org
) -> None:
    """A workflow whose first speaker is an agent: the ack that activates it, and a context
    change while it is the agent's turn, may be claimed for that agent; anything else is refused
    with a reason (another agent, an envelope before activation, one that does not exist, the
    thread.created of an open thread, a message hidden from the agent). The agent's reply may
    name the ack as its causation, once."""
    ann = org.user("Ann")
    bots = agents(org, {"researcher": None, "writer": None})
    r_id, w_id = bots["researcher"]["id"], bots["writer"]["id"]
    team = org.team("Team", ("user", ann["id"]), ("agent", r_id), ("agent", w_id))
    graph = TransitionGraph(
        initial_speaker="researcher",
        transitions=[
            Transition(FromSpeaker("researcher"), AgentTarget("writer")),
            Transition(FromSpeaker("writer"), AgentTarget("Ann")),
        ],
    )
    thread = open_thread(
        org,
        team["id"],
        adapter="workflow",
        participants=[
            {"kind": "user", "id": ann["id"]},
            {"kind": "agent", "id": r_id},
            {"kind": "agent", "id": w_id},
        ],
        graph=graph.to_dict(),
    )
    tid = thread["id"]
    assert thread["status"] == "active" and thread["expected_speaker"] == r_id
    envs = envelopes(org, tid)
    assert [e["type"] for e in envs] == ["thread.created", "thread.ack", "thread.ack"]
    first_ack, activating = envs[1], envs[2]

    def claim(agent_id: str, seq: int, thread_id: str = tid) -> Any:
        body = {"agent_id": agent_id, "thread_id": thread_id, "trigger_seq": seq, "runner_id": "t"}
        return org.http.post("/claims", json=body)

    granted = claim(r_id, activating["seq"])
    assert granted.status_code == 201, granted.text
    assert granted.json()["trigger_id"] == activating["id"]
    for agent_id, seq, why in (
        (w_id, activating["seq"], "turn is"),  # not the writer's turn
        (r_id, first_ack["seq"], "invited"),  # the thread was not active yet after it
        (r_id, 1, "invited"),  # thread.created of a thread with invitees
        (r_id, 99, "not an envelope"),
    ):
        err = assert_error(claim(agent_id, seq), 422, "invalid_request")
        assert why in err["message"], (seq, err)
    # a context change while it is the researcher's turn triggers it again (the turn stays)
    ctx = org.ok(
        "POST",
        f"/threads/{tid}/context",
        json={"values": {"topic": "tls"}, "user_id": ann["id"]},
    )
    assert ctx["expected_speaker"] == r_id
    ctx_seq = envelopes(org, tid)[-1]["seq"]
    assert claim(r_id, ctx_seq).status_code == 201
    assert_error(claim(w_id, ctx_seq), 422, "invalid_request")

    # the reply names the ack as its causation; the reply key keeps it to one
    key = f"reply:{r_id}:{activating['id']}"
    body = {
        "content": "Facts: TLS encrypts.",
        "agent_id": r_id,
        "causation_id": activating["id"],
        "idempotency_key": key,
    }
    reply = org.ok("POST", f"/threads/{tid}/messages", json=body)
    again = org.ok("POST", f"/threads/{tid}/messages", json=body)
    assert again["id"] == reply["id"] and reply["idempotency_key"] == key
    assert reply["causation_id"] == activating["id"]
    # the researcher's own message gives the writer its turn, not the researcher
    assert claim(w_id, reply["seq"]).status_code == 201
    assert_error(claim(r_id, reply["seq"]), 422, "invalid_request")
    # completing the claim of a valid trigger works; claiming it again says done
    done = {"agent_id": r_id, "thread_id": tid, "trigger_seq": activating["seq"], "runner_id": "t"}
    assert org.ok("POST", "/claims/complete", json=done)["done"] is True
    assert_error(claim(r_id, activating["seq"]), 409, "claim_done")

    # an open thread: only messages of somebody else that the agent may see
    plain = open_thread(org, team["id"])["id"]
    hidden = org.ok(
        "POST",
        f"/threads/{plain}/messages",
        json={"content": "for the writer", "user_id": ann["id"], "audience": [w_id]},
    )
    err = assert_error(claim(r_id, 1, plain), 422, "invalid_request")
    assert "only messages" in err["message"]
    err = assert_error(claim(r_id, hidden["seq"], plain), 422, "invalid_request")
    assert "audience" in err["message"]
    assert claim(w_id, hidden["seq"], plain).status_code == 201
    # a seq that exists in the other thread only is not an envelope of this one
    assert_error(claim(r_id, hidden["seq"] + 5, plain), 422, "invalid_request")


# ------------------------------------------------------------------------------ workflow


def test_remote_workflow_plays_the_graph_with_its_tools_and_closes(
    quiet_server: LiveServer, org: Org
) -> None:
    """researcher -> writer -> reviewer; the reviewer sends the draft back once with the
    graph's ``request_revision`` tool (a pydantic-ai tool call: Handoff to the writer), then
    approves with the ``[approve: ...]`` text tag (Finish): the thread closes ``finished``. The
    researcher speaks first, triggered by the ack that activated the thread."""
    scripts = {
        "researcher": Scripted("Facts: TLS encrypts traffic."),
        "writer": Scripted("Draft 1 on TLS.", "Draft 2 on TLS, with an example."),
        "reviewer": Scripted(
            Step("Needs an example.", "request_revision", {"reason": "add an example"}),
            Step("Good now. [approve: TLS explained]"),
        ),
    }
    bots = agents(org, dict(scripts))
    ids = {role: b["id"] for role, b in bots.items()}
    team = org.team("Team", *(("agent", i) for i in ids.values()))
    graph = TransitionGraph(
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

    async def run() -> None:
        async with remote(quiet_server, org.key) as (runner, client):
            thread = await client.threads.create(
                "Explain TLS",
                team_id=team["id"],
                adapter="workflow",
                participants=[("agent", i) for i in ids.values()],
                graph=graph,
                agent_budget=10,
            )

            async def ended() -> bool:
                status, _ = await thread_status(client, thread.id)
                return runner.replies >= 5 and status in ("closing", "closed")

            await until(ended, "the workflow to end")
            assert runner.replies == 5
        closed.append(thread.id)

    closed: list[str] = []
    anyio.run(run)
    tid = closed[0]
    envs = envelopes(org, tid)
    msgs = [e for e in envs if e["type"] == "message"]
    role = {i: r for r, i in ids.items()}
    assert [role[m["sender"]["id"]] for m in msgs] == [
        "researcher",
        "writer",
        "reviewer",
        "writer",
        "reviewer",
    ]
    assert {r: s.turns for r, s in scripts.items()} == {"researcher": 1, "writer": 2, "reviewer": 2}
    # the researcher was started by the ack that activated the thread (the last one)
    acks = [e for e in envs if e["type"] == "thread.ack"]
    assert len(acks) == 2 and msgs[0]["causation_id"] == acks[-1]["id"]
    assert msgs[0]["seq"] > acks[-1]["seq"]
    # tools: the graph's go to the reviewer only (from GET /tools); everyone gets handoff
    assert scripts["reviewer"].tools[0] == sorted(["approve", "request_revision", HANDOFF_TOOL])
    assert scripts["writer"].tools[0] == [HANDOFF_TOOL]
    assert "[approve: summary]" in scripts["reviewer"].prompts[0]
    assert "This is a workflow thread with" in scripts["reviewer"].prompts[0]
    revision, approval = msgs[2], msgs[4]
    assert revision["data"]["tool_calls"] == [
        {
            "name": "request_revision",
            "args": {"reason": "add an example"},
            "result": {"kind": "handoff", "target": "writer", "reason": "add an example"},
        }
    ]
    assert msgs[3]["causation_id"] == revision["id"]  # the Handoff gave the writer its turn
    assert approval["content"] == "Good now."
    assert approval["data"]["tool_calls"][0]["result"] == {
        "kind": "finish",
        "summary": "TLS explained",
        "reason": "finished",
    }
    assert org.ok("GET", f"/threads/{tid}")["close_reason"] == "finished"
    one_reply_per_trigger(msgs)


# ------------------------------------------------------------------------------ activation


def test_consulting_started_by_the_ack_is_caught_up_once_by_a_remote_runner(
    quiet_server: LiveServer, org: Org
) -> None:
    """A consulting thread between two agents, opened while no runner runs: the respondent
    acks by itself, which makes the asker the expected speaker. A remote runner started
    afterwards catches up on that ack (no message at all in the thread yet), the asker asks,
    the expert answers, the thread closes ``consulting_complete``. A second, fresh runner over
    the finished thread calls no model and posts nothing."""
    asker, expert = Scripted("Which cipher suite?"), Scripted("Use TLS_AES_128_GCM_SHA256.")
    bots = agents(org, {"asker": asker, "expert": expert})
    team = org.team("Team", *(("agent", b["id"]) for b in bots.values()))
    thread = open_thread(
        org,
        team["id"],
        adapter="consulting",
        participants=[{"kind": "agent", "id": b["id"]} for b in bots.values()],
    )
    tid = thread["id"]
    assert (thread["status"], thread["expected_speaker"]) == ("active", bots["asker"]["id"])
    ack = envelopes(org, tid)[-1]
    assert ack["type"] == "thread.ack" and ack["sender"]["id"] == bots["expert"]["id"]
    assert messages(org, tid) == []

    async def run() -> None:
        async with remote(quiet_server, org.key) as (_runner, client):

            async def ended() -> bool:
                return (await thread_status(client, tid))[0] in ("closing", "closed")

            await until(ended, "the consultation to close")
        # a fresh runner: reads the whole history, finds every trigger answered or refused
        async with remote(quiet_server, org.key) as (again, _client):

            async def looked() -> bool:
                return again.jobs_done >= 2  # the last message, for each agent: refused

            await until(looked, "the second runner to look at the last message")
            assert again.replies == 0

    anyio.run(run)
    msgs = messages(org, tid)
    assert [m["sender"]["name"] for m in msgs] == ["asker", "expert"]
    assert msgs[0]["causation_id"] == ack["id"] and msgs[1]["causation_id"] == msgs[0]["id"]
    assert (asker.turns, expert.turns) == (1, 1)
    assert "You open the thread" in asker.prompts[0]  # no message before: it opens
    assert org.ok("GET", f"/threads/{tid}")["close_reason"] == "consulting_complete"
    one_reply_per_trigger(msgs)


def test_a_persons_ack_then_a_context_change_trigger_the_remote_agent(
    quiet_server: LiveServer, org: Org
) -> None:
    """A workflow opened by its agent planner with Ann invited: nothing happens until Ann acks
    over REST; her ack makes the planner the expected speaker and triggers it (it has nothing to
    say: empty replies, no message). Ann then sets ``go=true``: the context change triggers the
    planner again, which now writes, prompted with the context."""

    class Planner(Scripted):
        def step(self, n: int) -> Step:
            return Step("Plan ready." if "go=true" in self.prompts[-1] else "")

    planner = Planner()
    ann = org.user("Ann")
    bots = agents(org, {"planner": planner})
    p_id = bots["planner"]["id"]
    team = org.team("Team", ("user", ann["id"]), ("agent", p_id))
    graph = TransitionGraph(
        initial_speaker="planner",
        transitions=[Transition(FromSpeaker("planner"), AgentTarget("Ann"))],
    )
    thread = open_thread(
        org,
        team["id"],
        adapter="workflow",
        participants=[{"kind": "agent", "id": p_id}, {"kind": "user", "id": ann["id"]}],
        graph=graph.to_dict(),
    )
    tid = thread["id"]
    assert thread["status"] == "invited"

    async def run() -> None:
        async with remote(quiet_server, org.key) as (runner, client):
            await client.threads.ack(tid, user_id=ann["id"])
            ack = (await client.threads.envelopes(tid, after=0, limit=100)).items[-1]
            assert (ack.type, ack.sender.id) == ("thread.ack", ann["id"])

            async def ack_handled() -> bool:
                return claim_done(quiet_server.db, p_id, tid, ack.seq)

            await until(ack_handled, "the planner's job for Ann's ack")
            assert planner.turns >= 1 and runner.replies == 0
            await client.threads.set_context(tid, {"go": True}, user_id=ann["id"])

            async def spoke() -> bool:
                return runner.replies >= 1

            await until(spoke, "the planner to write")
        triggers.append(ack.id)

    triggers: list[str] = []
    anyio.run(run)
    envs = envelopes(org, tid)
    ctx = next(e for e in envs if e["type"] == "context.set")
    msgs = [e for e in envs if e["type"] == "message"]
    assert [(m["sender"]["id"], m["content"]) for m in msgs] == [(p_id, "Plan ready.")]
    assert msgs[0]["causation_id"] == ctx["id"]
    assert "Workflow context: go=true" in planner.prompts[-1]
    assert "This is a workflow thread with Ann; it is your turn to speak." in planner.prompts[-1]
    # the ack's prompts had no context yet: the planner said nothing then
    assert all("go=true" not in p for p in planner.prompts[:-1])
    assert org.ok("GET", f"/threads/{tid}")["expected_speaker"] == ann["id"]
    one_reply_per_trigger(msgs)


# ------------------------------------------------------------------------------ pure helpers


def env(seq: int, type_: str, sender: str, audience: list[str] | None = None) -> Envelope:
    return Envelope(
        id=f"env_{seq}",
        thread_id="thr_x",
        seq=seq,
        type=type_,
        sender=Sender(kind="agent" if sender.startswith("agt") else "user", id=sender, name=""),
        audience=audience,
        created_at=datetime.now(UTC),
    )


def test_local_trigger_filter() -> None:
    msg = env(2, "message", "usr_a")
    assert may_trigger(msg, "agt_b", protocol=False)
    assert not may_trigger(env(3, "message", "agt_b"), "agt_b", protocol=False)  # its own
    assert not may_trigger(env(1, "thread.ack", "usr_a"), "agt_b", protocol=False)
    # a protocol thread: any envelope may give the turn (the claim decides), incl. its own
    for kind in ("thread.created", "thread.ack", "context.set", "message"):
        assert may_trigger(env(4, kind, "agt_b"), "agt_b", protocol=True)
    for kind in ("thread.closing", "thread.closed", "thread.reject"):
        assert not may_trigger(env(5, kind, "usr_a"), "agt_b", protocol=True)
    # an audience that leaves the agent out never triggers it
    hidden = env(6, "message", "usr_a", ["agt_c"])
    assert not may_trigger(hidden, "agt_b", protocol=True)
    assert may_trigger(hidden, "agt_c", protocol=False)


def test_protocol_triggers_older_than_the_latest_message_are_dropped() -> None:
    agent = AgentCard("agt_b", "b", "org", "Org", "", None)
    jobs = [
        RemoteJob(agent, "thr_x", "t", env(2, "thread.ack", "usr_a"), (), True),
        RemoteJob(agent, "thr_x", "t", env(3, "message", "usr_a"), (), True),
        RemoteJob(agent, "thr_x", "t", env(4, "context.set", "usr_a"), (), True),
        RemoteJob(agent, "thr_x", "t", env(1, "message", "usr_a"), (), False),
    ]
    kept = RemoteRunner._latest(jobs, last_message=3)
    assert [j.trigger.seq for j in kept] == [3, 4, 1]  # open-thread jobs are never dropped
