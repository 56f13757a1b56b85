"""Remote runners: the claim API, one reply key on every path, runner processes, and triage
routines and ``inbox_cap`` run remotely (``POST /runners/triage``, ``dropped`` claims).

Runners here are real processes (``python -m agent_network runner``) against a live server on
127.0.0.1 over a real SQLite file; the claims table is read straight from that file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from conftest import LiveServer, Org, all_envelopes, assert_error

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A live server without the in-process runner (only remote runners answer)."""
    srv = LiveServer(tmp_path / "an.db", run_routines=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def claims(db: Path) -> list[tuple[str, str, int, str, float, int]]:
    """Every row of runner_claims: (agent_id, thread_id, trigger_seq, runner_id, expires, done)."""
    with sqlite3.connect(db, timeout=10) as conn:
        return list(
            conn.execute(
                "SELECT agent_id, thread_id, trigger_seq, runner_id, expires_at, done "
                "FROM runner_claims ORDER BY trigger_seq, agent_id"
            )
        )


class RunnerProc:
    """``python -m agent_network runner`` as a child process, output in files."""

    def __init__(
        self,
        tmp: Path,
        url: str,
        token: str,
        runner_id: str,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.runner_id = runner_id
        self.out = tmp / f"runner-{runner_id}.out"
        self.err = tmp / f"runner-{runner_id}.err"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
            **(env or {}),
        }
        env.setdefault("RUNNER_SLOW_SECONDS", "0.5")
        args = [sys.executable, "-m", "agent_network", "runner", "--url", url, "--token", token]
        args += ["--runner-id", runner_id, "--relist", "0.5", "--poll-wait", "2", *extra]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)

    def wait_running(self) -> None:
        wait_until(
            f"runner {self.runner_id} to start ({self.err})",
            lambda: self.proc.poll() is not None or "running against" in self.out.read_text(),
        )
        assert self.proc.poll() is None, self.err.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[Callable[..., RunnerProc]]:
    started: list[RunnerProc] = []

    def start(
        url: str, token: str, runner_id: str, *extra: str, env: dict[str, str] | None = None
    ) -> RunnerProc:
        proc = RunnerProc(tmp_path, url, token, runner_id, *extra, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def setup_pair(org: Org) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Ann and two agents that answer only Ann (so they never answer each other), both with a
    participate routine, in one team thread with a budget that never runs out."""
    ann = org.user("Ann")
    bots = [org.agent("Planner", "planner"), org.agent("Checker", "checker")]
    for bot in bots:
        org.ok("PUT", f"/agents/{bot['id']}/rule", json={"inbound_from": ["Ann"]})
        org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
    team = org.team("Team", ("user", ann["id"]), *(("agent", b["id"]) for b in bots))
    thread = org.ok(
        "POST", f"/teams/{team['id']}/threads", json={"title": "W", "agent_budget": 1000}
    )
    return ann, bots, str(thread["id"])


def post(org: Org, tid: str, user_id: str, text: str) -> dict[str, Any]:
    body = {"content": text, "user_id": user_id, "idempotency_key": text}
    return dict(org.ok("POST", f"/threads/{tid}/messages", json=body))


def replies_by_trigger(org: Org, tid: str) -> dict[str, list[dict[str, Any]]]:
    """Agent messages of the thread grouped by the envelope they answer."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in all_envelopes(org.http, tid, messages_only=True):
        if m["sender"]["kind"] == "agent":
            out.setdefault(m["causation_id"], []).append(m)
    return out


def all_answered(org: Org, tid: str, triggers: list[dict[str, Any]], bots: list[Any]) -> bool:
    got = replies_by_trigger(org, tid)
    want = {b["id"] for b in bots}
    return all({m["sender"]["id"] for m in got.get(t["id"], [])} >= want for t in triggers)


def assert_one_reply_each(
    org: Org, tid: str, triggers: list[dict[str, Any]], bots: list[Any], content: str
) -> None:
    got = replies_by_trigger(org, tid)
    ids = {t["id"] for t in triggers}
    assert set(got) <= ids, "an agent answered something that is not Ann's message"
    for t in triggers:
        senders = Counter(m["sender"]["id"] for m in got[t["id"]])
        assert senders == Counter({b["id"]: 1 for b in bots}), (t["content"], senders)
        for m in got[t["id"]]:
            assert m["content"] == content
            assert m["idempotency_key"] == f"reply:{m['sender']['id']}:{t['id']}"
            assert m["seq"] > t["seq"]


# ----------------------------------------------------------------------------- claim API


def test_claim_lifecycle_grant_hold_renew_complete_done_take_over(
    quiet_server: LiveServer,
) -> None:
    org = Org(quiet_server, "Acme")
    ann, bots, tid = setup_pair(org)
    trig = post(org, tid, ann["id"], "first")
    target = {"agent_id": bots[0]["id"], "thread_id": tid, "trigger_seq": trig["seq"]}

    first = org.ok("POST", "/claims", json={**target, "runner_id": "r1", "lease_seconds": 30})
    assert first["granted"] is True and first["trigger_id"] == trig["id"]
    assert first["expires_at"] > time.time() + 20

    r = org.http.post("/claims", json={**target, "runner_id": "r2", "lease_seconds": 30})
    err = assert_error(r, 409, "claim_held")
    assert r.json()["error"]["details"]["runner_id"] == "r1"
    assert 0 < float(r.headers["Retry-After"]) <= 30
    assert_error(
        org.http.post("/claims/complete", json={**target, "runner_id": "r2"}), 409, "claim_held"
    )
    assert "r1" in err["message"]

    renewed = org.ok("POST", "/claims", json={**target, "runner_id": "r1", "lease_seconds": 60})
    assert renewed["expires_at"] > first["expires_at"]

    done = org.ok("POST", "/claims/complete", json={**target, "runner_id": "r1"})
    assert done["done"] is True
    assert org.ok("POST", "/claims/complete", json={**target, "runner_id": "r1"})["done"] is True
    for runner in ("r1", "r2"):
        r = org.http.post("/claims", json={**target, "runner_id": runner})
        assert_error(r, 409, "claim_done")
    assert org.ok("GET", "/claims/done", params={"agent_id": bots[0]["id"], "thread_id": tid}) == {
        "agent_id": bots[0]["id"],
        "thread_id": tid,
        "done": [trig["seq"]],
    }

    # a lease that runs out is taken over by another runner
    other = {**target, "agent_id": bots[1]["id"]}
    org.ok("POST", "/claims", json={**other, "runner_id": "crashed", "lease_seconds": 0.2})
    wait_until(
        "the lease to run out",
        lambda: org.http.post("/claims", json={**other, "runner_id": "r2"}).status_code == 201,
        timeout=10,
    )
    row = [c for c in claims(quiet_server.db) if c[0] == bots[1]["id"]]
    assert [(c[3], c[5]) for c in row] == [("r2", 0)]
    # the crashed runner, back, can neither renew nor complete a claim taken over
    assert_error(
        org.http.post("/claims", json={**other, "runner_id": "crashed"}), 409, "claim_held"
    )
    assert_error(
        org.http.post("/claims/complete", json={**other, "runner_id": "crashed"}), 409, "claim_held"
    )


def test_claim_scope_and_validation(quiet_server: LiveServer) -> None:
    acme, globex = Org(quiet_server, "Acme"), Org(quiet_server, "Globex")
    ann, bots, tid = setup_pair(acme)
    trig = post(acme, tid, ann["id"], "hello")
    g_bot = globex.agent("G", "g")
    g_ann = globex.user("G Ann")
    g_team = globex.team("GT", ("agent", g_bot["id"]), ("user", g_ann["id"]))
    g_tid = globex.ok("POST", f"/teams/{g_team['id']}/threads", json={"title": "G"})["id"]
    g_trig = post(globex, g_tid, g_ann["id"], "g hello")
    mine = {
        "agent_id": bots[0]["id"],
        "thread_id": tid,
        "trigger_seq": trig["seq"],
        "runner_id": "x",
    }

    # another org's agent, thread or both: 404 exactly like a missing id
    for body in (
        mine,
        {**mine, "agent_id": g_bot["id"]},
        {**mine, "thread_id": g_tid, "trigger_seq": g_trig["seq"]},
    ):
        assert_error(globex.http.post("/claims", json=body), 404, "not_found")
        assert_error(globex.http.post("/claims/complete", json=body), 404, "not_found")
    assert_error(
        acme.http.post("/claims", json={**mine, "agent_id": g_bot["id"]}), 404, "not_found"
    )
    assert_error(
        acme.http.post("/claims", json={**mine, "thread_id": g_tid, "trigger_seq": g_trig["seq"]}),
        404,
        "not_found",
    )
    r = globex.http.get("/claims/done", params={"agent_id": bots[0]["id"], "thread_id": tid})
    assert_error(r, 404, "not_found")
    assert globex.ok("GET", "/runners/assignments") == []

    # an agent token claims for its own agent only; a user token for none
    token = acme.ok(
        "POST", "/credentials", json={"kind": "agent_token", "subject_id": bots[0]["id"]}
    )
    utoken = acme.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": ann["id"]})
    with (
        quiet_server.client(token["secret"]) as agent_http,
        quiet_server.client(utoken["secret"]) as uh,
    ):
        r = agent_http.post("/claims", json={**mine, "lease_seconds": 5})
        assert r.status_code == 201, r.text
        assert agent_http.post("/claims/complete", json=mine).status_code == 200
        assert_error(
            agent_http.post("/claims", json={**mine, "agent_id": bots[1]["id"]}), 404, "not_found"
        )
        assert_error(uh.post("/claims", json=mine), 404, "not_found")
        assert uh.get("/runners/assignments").json() == []
        assigned = agent_http.get("/runners/assignments").json()
        assert [a["agent"]["id"] for a in assigned] == [bots[0]["id"]]
        assert [t["thread_id"] for t in assigned[0]["threads"]] == [tid]
    assert {a["agent"]["id"] for a in acme.ok("GET", "/runners/assignments")} == {
        b["id"] for b in bots
    }
    assert acme.ok("GET", "/runners/assignments")[0]["agent"]["org_name"] == "Acme"

    # a read-only key may not claim
    ro = acme.ok("POST", "/credentials", json={"kind": "org_key", "scopes": ["read"]})
    with quiet_server.client(ro["secret"]) as ro_http:
        assert_error(ro_http.post("/claims", json=mine), 403, "permission_denied")

    # triggers must be messages of somebody else; leases and runner ids are bounded
    own = acme.ok(
        "POST", f"/threads/{tid}/messages", json={"content": "mine", "agent_id": bots[0]["id"]}
    )
    for bad in (
        {**mine, "trigger_seq": 1},  # thread.created
        {**mine, "trigger_seq": own["seq"]},  # the agent's own message
        {**mine, "trigger_seq": 10_000},
        {**mine, "lease_seconds": 0},
        {**mine, "lease_seconds": 10_000},
        {**mine, "runner_id": ""},
        {**mine, "runner_id": "x" * 101},
        {**mine, "surprise": 1},
    ):
        assert_error(acme.http.post("/claims", json=bad), 422, "invalid_request")
    # an agent not in the thread
    lone = acme.agent("Lone", "lone")
    r = acme.http.post("/claims", json={**mine, "agent_id": lone["id"]})
    assert_error(r, 403, "permission_denied")
    assert [(c[0], c[2], c[3], c[5]) for c in claims(quiet_server.db)] == [
        (bots[0]["id"], trig["seq"], "x", 1)
    ]


def test_claim_is_done_when_the_rule_refuses_the_sender(quiet_server: LiveServer) -> None:
    org = Org(quiet_server, "Acme")
    _ann, bots, tid = setup_pair(org)
    own = org.ok(
        "POST",
        f"/threads/{tid}/messages",
        json={"content": "I am a bot", "agent_id": bots[0]["id"]},
    )
    body = {
        "agent_id": bots[1]["id"],
        "thread_id": tid,
        "trigger_seq": own["seq"],
        "runner_id": "r",
    }
    err = assert_error(org.http.post("/claims", json=body), 409, "claim_done")
    assert "inbound_from" in err["message"]
    assert [c[5] for c in claims(quiet_server.db)] == [1]
    audit = org.ok("GET", "/audit", params={"action": "rule.refused"})
    assert [(a["resource_id"], a["principal_id"]) for a in audit] == [(tid, bots[1]["id"])]


# ------------------------------------------------------------------ one key on every path


def test_rest_reply_and_in_process_reply_store_one_envelope(tmp_path: Path) -> None:
    from agent_network.runtime.models import register_model

    release = threading.Event()

    async def held(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert await asyncio.to_thread(release.wait, 30)
        return ModelResponse(parts=[TextPart("In-process answer.")])

    register_model("held-model", FunctionModel(held))
    srv = LiveServer(tmp_path / "an.db")
    srv.start()
    try:
        org = Org(srv, "Acme")
        ann = org.user("Ann")
        bot = org.agent("Bot", "bot", model="held-model")
        other = org.agent("Other", "other")
        org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
        team = org.team("T", ("user", ann["id"]), ("agent", bot["id"]), ("agent", other["id"]))
        tid = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
        trig = post(org, tid, ann["id"], "Question?")
        # the in-process runner holds the claim and sits in the model call
        wait_until("the in-process claim", lambda: claims(srv.db))
        assert claims(srv.db)[0][3].startswith("inproc:")

        key = f"reply:{bot['id']}:{trig['id']}"
        body = {"content": "Remote answer.", "agent_id": bot["id"], "idempotency_key": key}
        remote = org.ok(
            "POST", f"/threads/{tid}/messages", json={**body, "causation_id": trig["id"]}
        )
        assert remote["causation_id"] == trig["id"] and remote["idempotency_key"] == key
        again = org.ok(
            "POST", f"/threads/{tid}/messages", json={**body, "causation_id": trig["id"]}
        )
        assert again["id"] == remote["id"]
        # the key without the matching causation is an ordinary, sender-scoped key
        plain = org.ok("POST", f"/threads/{tid}/messages", json=body)
        assert plain["id"] != remote["id"] and plain["causation_id"] is None
        # another agent cannot take the bot's reply key
        squat = org.ok(
            "POST",
            f"/threads/{tid}/messages",
            json={**body, "agent_id": other["id"], "causation_id": trig["id"]},
        )
        assert squat["id"] != remote["id"]
        # causation must name an envelope of this thread
        for bad in ("env_nope", "x" * 41):
            r = org.http.post(f"/threads/{tid}/messages", json={**body, "causation_id": bad})
            assert_error(r, 422, "invalid_request")
        release.set()
        wait_until("the claim to be done", lambda: claims(srv.db)[0][5] == 1, timeout=30)
        srv.wait_runner_idle()
        bot_replies = [
            m
            for m in all_envelopes(org.http, tid, messages_only=True)
            if m["sender"]["id"] == bot["id"] and m["causation_id"] == trig["id"]
        ]
        assert [m["id"] for m in bot_replies] == [remote["id"]]
        assert bot_replies[0]["content"] == "Remote answer."
    finally:
        release.set()
        srv.stop()
        register_model("held-model", None)


# ----------------------------------------------------------------- runner processes


def test_two_runner_processes_one_reply_each_take_over_after_kill9_and_catch_up(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    ann, bots, tid = setup_pair(org)
    extra = ("--lease", "2", "--model", "slow", "--import", "runner_helpers")
    a = runners(quiet_server.url, org.key, "A", *extra)
    b = runners(quiet_server.url, org.key, "B", *extra)
    a.wait_running()
    b.wait_running()

    triggers = [post(org, tid, ann["id"], f"question {i}") for i in range(6)]

    def a_holds_open_claim() -> bool:
        """Freeze A; keep it frozen if it holds an unfinished claim, else let it go on."""
        a.kill(signal.SIGSTOP)
        if any(c[3] == "A" and not c[5] for c in claims(quiet_server.db)):
            return True
        a.kill(signal.SIGCONT)
        time.sleep(0.05)
        return False

    wait_until("runner A to hold a claim", a_holds_open_claim)
    a.kill(signal.SIGKILL)
    a.proc.wait(timeout=10)
    orphans = [c[:3] for c in claims(quiet_server.db) if c[3] == "A" and not c[5]]
    assert orphans
    triggers += [post(org, tid, ann["id"], f"question {i}") for i in range(6, 9)]

    wait_until("B to answer everything", lambda: all_answered(org, tid, triggers, bots))
    assert_one_reply_each(org, tid, triggers, bots, "Noted.")

    def orphans_finished() -> bool:
        final = {c[:3]: c for c in claims(quiet_server.db)}
        return all(final[o][5] == 1 for o in orphans)

    wait_until("the orphaned claims to be completed", orphans_finished)
    final = {c[:3]: c for c in claims(quiet_server.db)}
    for orphan in orphans:  # B took over what A held when it died
        assert final[orphan][3] == "B", final[orphan]

    # SIGTERM stops B cleanly; a new runner catches up on what was posted while none ran
    b.kill(signal.SIGTERM)
    assert b.proc.wait(timeout=20) == 0, b.err.read_text()
    assert "stopping" in b.out.read_text()
    missed = [post(org, tid, ann["id"], f"question {i}") for i in range(9, 12)]
    c = runners(quiet_server.url, org.key, "C", "--lease", "2", "--model", "test")
    c.wait_running()
    triggers += missed
    wait_until("C to catch up", lambda: all_answered(org, tid, triggers, bots))
    time.sleep(0.5)  # let any (wrong) duplicate land before counting
    got = replies_by_trigger(org, tid)
    for t in missed:
        assert sorted(m["content"] for m in got[t["id"]]) == ["Acknowledged."] * 2
    for t in triggers[:9]:
        assert len(got[t["id"]]) == 2
    assert org.ok("GET", f"/threads/{tid}/verify")["ok"] is True
    wait_until("every claim done", lambda: all(c[5] == 1 for c in claims(quiet_server.db)))


def test_in_process_and_remote_runner_share_the_work(
    server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(server, "Acme")
    ann, bots, tid = setup_pair(org)
    remote = runners(server.url, org.key, "R", "--lease", "2", "--model", "test")
    remote.wait_running()
    triggers = [post(org, tid, ann["id"], f"question {i}") for i in range(8)]
    wait_until("every reply", lambda: all_answered(org, tid, triggers, bots))
    server.wait_runner_idle()
    time.sleep(0.5)  # let any (wrong) duplicate land before counting
    assert_one_reply_each(org, tid, triggers, bots, "Acknowledged.")
    holders = {c[3].split(":")[0] for c in claims(server.db)}
    assert holders <= {"inproc", "R"}
    wait_until("every claim done", lambda: all(c[5] == 1 for c in claims(server.db)))


def test_runner_refuses_to_start_without_a_valid_credential(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    bad = runners(quiet_server.url, "an_org_not-a-key", "bad")
    assert bad.proc.wait(timeout=30) == 1
    assert "unauthenticated" in bad.err.read_text()


def test_runner_with_an_agent_token_answers_for_its_agent_only(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    ann, bots, tid = setup_pair(org)
    org.ok("POST", "/knowledge", json={"documents": [{"name": "n", "content": "Some notes."}]})
    token = org.ok(
        "POST", "/credentials", json={"kind": "agent_token", "subject_id": bots[0]["id"]}
    )
    solo = runners(quiet_server.url, token["secret"], "solo", "--lease", "2", "--model", "test")
    solo.wait_running()
    triggers = [post(org, tid, ann["id"], f"question {i}") for i in range(3)]
    wait_until("the agent's replies", lambda: all_answered(org, tid, triggers, bots[:1]))
    time.sleep(0.5)  # let any (wrong) extra reply land before counting
    assert_one_reply_each(org, tid, triggers, bots[:1], "Acknowledged.")
    assert solo.proc.poll() is None  # knowledge it may not read is skipped, not fatal


# ------------------------------------------------------------- triage and inbox_cap


def triage_desk(org: Org, *, cap: int | None = None) -> dict[str, Any]:
    """Ann; the Triage agent (a triage routine, no participate routine); Billing and Technical
    agents with participate routines; a restricted intake thread (Ann, Triage) and a
    restricted route thread per specialist (Triage, the specialist)."""
    ann = org.user("Ann")
    triage = org.agent("Triage", "triage")
    if cap is not None:
        org.ok("PUT", f"/agents/{triage['id']}/rule", json={"inbox_cap": cap})
    team_members = [("user", ann["id"]), ("agent", triage["id"])]
    specialists: dict[str, dict[str, Any]] = {}
    for label in ("billing", "technical"):
        specialists[label] = org.agent(f"{label.title()} Agent", label)
        team_members.append(("agent", specialists[label]["id"]))
    team = org.team("Support", *team_members)
    routes: dict[str, str] = {}
    for label, agent in specialists.items():
        org.ok("POST", f"/agents/{agent['id']}/routines", json={"name": "participate"})
        routes[label] = org.ok(
            "POST",
            f"/teams/{team['id']}/threads",
            json={
                "title": f"{label.title()} desk",
                "visibility": "restricted",
                "participants": [
                    {"kind": "agent", "id": triage["id"]},
                    {"kind": "agent", "id": agent["id"]},
                ],
            },
        )["id"]
    intake = org.ok(
        "POST",
        f"/teams/{team['id']}/threads",
        json={
            "title": "Support intake",
            "visibility": "restricted",
            "participants": [
                {"kind": "user", "id": ann["id"]},
                {"kind": "agent", "id": triage["id"]},
            ],
        },
    )["id"]
    config = {
        "intake": intake,
        "routes": {
            "billing": {"thread_id": routes["billing"], "keywords": ["invoice", "refund"]},
            "technical": {"thread_id": routes["technical"], "keywords": ["error", "upload"]},
        },
    }
    routine = org.ok(
        "POST",
        f"/agents/{triage['id']}/routines",
        json={
            "name": "triage",
            "preset_name": "triage",
            "event_type": "thread.message_added",
            "config": config,
        },
    )
    return {
        "ann": ann,
        "triage": triage,
        "specialists": specialists,
        "routes": routes,
        "intake": intake,
        "routine": routine,
    }


def ask_desk(org: Org, d: dict[str, Any], text: str) -> dict[str, Any]:
    body = {"content": text, "user_id": d["ann"]["id"], "idempotency_key": text}
    return dict(org.ok("POST", f"/threads/{d['intake']}/messages", json=body))


def thread_messages(org: Org, tid: str) -> list[dict[str, Any]]:
    return all_envelopes(org.http, tid, messages_only=True)


def test_assignments_list_triage_routines_and_their_intake_threads(
    quiet_server: LiveServer,
) -> None:
    org = Org(quiet_server, "Acme")
    d = triage_desk(org, cap=3)
    found = {a["agent"]["id"]: a for a in org.ok("GET", "/runners/assignments")}
    seat = found[d["triage"]["id"]]
    assert seat["agent"]["inbox_cap"] == 3
    assert [(t["thread_id"], t["preset"]) for t in seat["threads"]] == [(d["intake"], "triage")]
    assert [r["routine_id"] for r in seat["triage"]] == [d["routine"]["id"]]
    assert seat["triage"][0]["config"]["routes"]["billing"]["thread_id"] == d["routes"]["billing"]
    billing = found[d["specialists"]["billing"]["id"]]
    assert billing["agent"]["inbox_cap"] is None
    assert [(t["thread_id"], t["preset"]) for t in billing["threads"]] == [
        (d["routes"]["billing"], "participate")
    ]
    assert billing["triage"] == []


def test_triage_endpoint_needs_a_live_claim_and_a_request(quiet_server: LiveServer) -> None:
    org = Org(quiet_server, "Acme")
    d = triage_desk(org)
    request = ask_desk(org, d, "Where is my invoice?")
    target = {
        "agent_id": d["triage"]["id"],
        "thread_id": d["intake"],
        "trigger_seq": request["seq"],
        "runner_id": "r1",
    }
    # no claim yet (also for the agent's own token, which may route), then another runner's
    assert_error(org.http.post("/runners/triage", json=target), 409, "claim_required")
    token = org.ok(
        "POST", "/credentials", json={"kind": "agent_token", "subject_id": d["triage"]["id"]}
    )
    with quiet_server.client(token["secret"]) as agent_http:
        r = agent_http.post("/runners/triage", json=target)
        assert_error(r, 409, "claim_required")
    org.ok("POST", "/claims", json={**target, "runner_id": "r2", "lease_seconds": 30})
    assert_error(org.http.post("/runners/triage", json=target), 409, "claim_held")
    assert_error(
        org.http.post("/runners/triage", json={**target, "answer": "x" * 2001}),
        422,
        "invalid_request",
    )
    assert thread_messages(org, d["routes"]["billing"]) == []  # nothing half-done

    # the claim holder routes it; its model's answer names no label, so the keyword decides;
    # the server forwards the request and replies in intake
    routed = org.ok("POST", "/runners/triage", json={**target, "runner_id": "r2", "answer": "b"})
    assert routed["routed"] is True and routed["label"] == "billing"
    forward, *_ = thread_messages(org, d["routes"]["billing"])
    assert forward["id"] == routed["forward_id"]
    assert forward["idempotency_key"] == f"triage:{d['triage']['id']}:{request['id']}"
    assert forward["data"]["triage"]["by"] == "keywords"
    reply = [m for m in thread_messages(org, d["intake"]) if m["id"] == routed["reply_id"]]
    assert [m["content"] for m in reply] == ["Routed to billing: Billing desk"]
    # again (a retry): the same forward and reply, nothing new
    again = org.ok("POST", "/runners/triage", json={**target, "runner_id": "r2"})
    assert (again["forward_id"], again["reply_id"]) == (routed["forward_id"], routed["reply_id"])
    intake_agents = [m for m in thread_messages(org, d["intake"]) if m["sender"]["kind"] == "agent"]
    assert len(intake_agents) == 1

    # the triage agent's own reply is no request; done triggers are refused
    org.ok("POST", "/claims/complete", json={**target, "runner_id": "r2"})
    assert_error(
        org.http.post("/runners/triage", json={**target, "runner_id": "r2"}), 409, "claim_done"
    )
    own = {**target, "trigger_seq": reply[0]["seq"]}
    r = org.http.post("/claims", json=own)
    assert r.status_code in (409, 422), r.text  # the agent's own message triggers nothing
    assert_error(
        org.http.post("/claims/complete", json={**target, "dropped": "boredom"}),
        422,
        "invalid_request",
    )


def test_a_runner_process_routes_requests_and_the_specialists_answer(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    d = triage_desk(org)
    extra = ("--lease", "5", "--model", "labeler", "--import", "runner_helpers")
    first = ask_desk(org, d, "My upload failed and I want my money back")  # before the runner
    runner = runners(quiet_server.url, org.key, "R", *extra)
    runner.wait_running()
    second = ask_desk(org, d, "Please send the invoice again")
    requests = [first, second]

    def routed() -> bool:
        intake = thread_messages(org, d["intake"])
        replies = [m for m in intake if m["sender"]["kind"] == "agent"]
        billing = thread_messages(org, d["routes"]["billing"])
        answers = [m for m in billing if m["content"] == "Noted."]
        return len(replies) == 2 and len(answers) == 2

    wait_until("both requests routed and answered", routed)
    time.sleep(0.5)  # let any (wrong) duplicate land before counting
    intake = thread_messages(org, d["intake"])
    replies = {m["causation_id"]: m for m in intake if m["sender"]["kind"] == "agent"}
    assert set(replies) == {r["id"] for r in requests}
    for r in requests:
        reply = replies[r["id"]]
        assert reply["sender"]["id"] == d["triage"]["id"]
        assert reply["content"] == "Routed to billing: Billing desk"
        assert reply["idempotency_key"] == f"reply:{d['triage']['id']}:{r['id']}"
        assert reply["data"]["triage"]["kind"] == "reply"
    billing = thread_messages(org, d["routes"]["billing"])
    forwards = [m for m in billing if m["sender"]["id"] == d["triage"]["id"]]
    assert sorted(f["causation_id"] for f in forwards) == sorted(r["id"] for r in requests)
    # the model's label wins over the keywords ("upload" is a technical keyword)
    assert [f["data"]["triage"]["by"] for f in forwards] == ["model", "model"]
    assert "Forwarded from Ann in Support intake: My upload failed and I want my money back" in [
        f["content"] for f in forwards
    ]
    answers = [m for m in billing if m["sender"]["id"] == d["specialists"]["billing"]["id"]]
    assert sorted(a["causation_id"] for a in answers) == sorted(f["id"] for f in forwards)
    assert thread_messages(org, d["routes"]["technical"]) == []
    # the triage agent never answered its own forwards or replies; every claim is done
    triage_claims = [c for c in claims(quiet_server.db) if c[0] == d["triage"]["id"]]
    assert sorted(c[2] for c in triage_claims) == sorted(r["seq"] for r in requests)
    wait_until("every claim done", lambda: all(c[5] == 1 for c in claims(quiet_server.db)))
    assert "runner.triaged" in runner.out.read_text() + runner.err.read_text()


def test_a_runner_drops_triggers_beyond_the_inbox_cap(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    ann = org.user("Ann")
    bot = org.agent("Bot", "bot")
    org.ok("PUT", f"/agents/{bot['id']}/rule", json={"inbox_cap": 1})
    org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
    team = org.team("T", ("user", ann["id"]), ("agent", bot["id"]))
    tid = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "W"})["id"]
    extra = ("--lease", "10", "--model", "slow", "--import", "runner_helpers")
    runner = runners(quiet_server.url, org.key, "R", *extra, env={"RUNNER_SLOW_SECONDS": "4"})
    runner.wait_running()
    sent = [
        org.ok(
            "POST",
            f"/threads/{tid}/messages",
            json={"content": f"q{i}", "user_id": ann["id"], "idempotency_key": f"q{i}"},
        )
        for i in range(3)
    ]

    def settled() -> bool:
        done = [c for c in claims(quiet_server.db) if c[5] == 1]
        return len(done) == 3

    wait_until("every trigger answered or dropped", settled)
    time.sleep(0.5)
    replies = [m for m in thread_messages(org, tid) if m["sender"]["kind"] == "agent"]
    dropped = org.ok("GET", "/audit", params={"action": "rule.refused"})
    # the first is answered while the other two wait beyond the cap of 1
    assert [m["causation_id"] for m in replies] == [sent[0]["id"]]
    assert sorted(a["data"]["trigger_id"] for a in dropped) == sorted(s["id"] for s in sent[1:])
    for a in dropped:
        assert a["principal_id"] == bot["id"] and "inbox_cap 1" in a["reason"]
        assert a["data"]["runner_id"] == "R"


def test_failures_only_the_runner_sees_are_audited(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    ann, bots, tid = setup_pair(org)
    runner = runners(
        quiet_server.url, org.key, "R", "--lease", "5", "--model", "broken", "--import",
        "runner_helpers",
    )  # fmt: skip
    runner.wait_running()
    trig = post(org, tid, ann["id"], "anyone there?")

    def failures() -> list[dict[str, Any]]:
        return [
            a
            for a in org.ok("GET", "/audit", params={"action": "routine.failed"})
            if a["data"].get("trigger_id") == trig["id"]
        ]

    found = wait_until("both agents' failures audited", lambda: len(failures()) == 2 and failures())
    assert {a["principal_id"] for a in found} == {b["id"] for b in bots}
    for a in found:
        assert "RuntimeError" in a["reason"] and "backend is down" in a["reason"]
        assert a["data"]["runner_id"] == "R" and "(runner 'R')" in a["reason"]
    assert replies_by_trigger(org, tid) == {}
    assert all(c[5] == 1 for c in claims(quiet_server.db))  # done: nobody retries it

    # an empty reply is reported the same way, audited as routine.skipped (runner R stopped
    # first, so that the claim below is runner X's and not a race with R)
    runner.close()
    second = post(org, tid, ann["id"], "still there?")
    body = {"agent_id": bots[0]["id"], "thread_id": tid, "trigger_seq": second["seq"]}
    org.ok("POST", "/claims/complete", json={**body, "runner_id": "X", "dropped": "empty_reply"})
    (skipped,) = [
        a
        for a in org.ok("GET", "/audit", params={"action": "routine.skipped"})
        if a["data"].get("trigger_id") == second["id"]
    ]
    assert "empty" in skipped["reason"] and skipped["principal_id"] == bots[0]["id"]
    too_long = {**body, "runner_id": "X", "dropped": "failed", "detail": "x" * 501}
    r = org.http.post("/claims/complete", json=too_long)
    assert_error(r, 422, "invalid_request")
