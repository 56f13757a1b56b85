"""After a crash every agent answers each person's message exactly once, within seconds
(issue 13, point 0b).

- A runner killed while answering comes back under the same runner id and takes its claims back
  at once (remote runner process; ``agent-network serve`` with its in-process runner; the
  in-process runner over a database holding a dead predecessor's claim).
- Leases are short (10 s by default) and renewed: another runner takes a dead runner's claims
  over within one lease.
- A spent runaway budget does not starve an agent's answer to a person's message posted before
  it was spent; the loop protection stays (agents still stop).

Real processes (``python -m agent_network runner`` / ``serve``) against a live server over a
real SQLite file; the model blocks (``runner_helpers``' ``slow`` model with a long
``RUNNER_SLOW_SECONDS``) so that the kill lands while the agents answer. Waits are bounded by
outcome (at most :data:`WITHIN` seconds): the old 30-60 s leases make them fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_network.errors import RunawayBudgetError
from agent_network.hub import Hub
from agent_network.model.envelope import Sender
from agent_network.protocol.events import EV_BUDGET_SET, EV_MESSAGE, EV_THREAD_CREATED
from agent_network.protocol.lifecycle import budget_spent, reply_key
from agent_network.protocol.state import ThreadState
from agent_network.runtime.identity import RunnerIdInUseError, take_runner_id
from agent_network.runtime.thread_view import thread_may_speak
from agent_network.store.engine import create_engine, database_url, upgrade_schema
from conftest import LiveServer, Org, all_envelopes, assert_error, free_port
from test_remote_runner import claims, wait_until  # helpers, no tests

TESTS = Path(__file__).resolve().parent
WITHIN = 20.0  # seconds: every answer must come well before an old 30-60 s lease ran out


def open_claims_on(db: Path, tid: str, seq: int) -> dict[str, str]:
    """agent id -> runner id of the claims on trigger ``seq`` of ``tid`` that are not done."""
    return {c[0]: c[3] for c in claims(db) if c[1] == tid and c[2] == seq and not c[5]}


class Proc:
    """A child process (output in files), killed by id only."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.out = tmp / f"{name}.out"
        self.err = tmp / f"{name}.err"
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start child processes with the tests on their path, the slow model's delay and a lock
    directory of this test's own (runner ids of other tests never mix in); all are stopped
    after the test."""
    started: list[Proc] = []

    def start(name: str, args: list[str], *, slow: float, **env: str) -> Proc:
        full = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
            "XDG_RUNTIME_DIR": str(tmp_path),
            "RUNNER_SLOW_SECONDS": str(slow),
            **env,
        }
        full.pop("AGENT_NETWORK_CLAIM_LEASE", None)
        full.update(env)
        proc = Proc(tmp_path, f"{name}-{len(started)}", args, full)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def runner_args(url: str, token: str, *extra: str) -> list[str]:
    """``agent-network runner`` answering with the ``slow`` model, default runner id."""
    args = [sys.executable, "-m", "agent_network", "runner", "--url", url, "--token", token]
    args += ["--relist", "0.5", "--poll-wait", "2", "--model", "slow"]
    return [*args, "--import", "runner_helpers", *extra]


def wait_running(proc: Proc) -> str:
    """Wait until a runner process says it runs; returns its runner id."""
    line = wait_until(
        f"{proc.name} to start ({proc.err})",
        lambda: (
            proc.proc.poll() is not None
            or next((ln for ln in proc.out.read_text().splitlines() if "running against" in ln), "")
        ),
    )
    assert proc.proc.poll() is None, proc.err.read_text()
    return str(line).split()[1]


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A live server without the in-process runner (only remote runners answer)."""
    srv = LiveServer(tmp_path / "an.db", run_routines=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def two_agents(
    org: Org, *, budget: int = 4, routines: tuple[int, ...] = (0, 1)
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Ann and two agents (those at ``routines`` get a participate routine) in one team thread
    with ``budget``; the agents answer Ann and each other (no inbound rule)."""
    ann = org.user("Ann")
    bots = [org.agent("Planner", "planner"), org.agent("Checker", "checker")]
    for i in routines:
        org.ok("POST", f"/agents/{bots[i]['id']}/routines", json={"name": "participate"})
    team = org.team("Team", ("user", ann["id"]), *(("agent", b["id"]) for b in bots))
    thread = org.ok(
        "POST", f"/teams/{team['id']}/threads", json={"title": "W", "agent_budget": budget}
    )
    return ann, bots, str(thread["id"])


def post(org: Org, tid: str, user_id: str, text: str) -> dict[str, Any]:
    body = {"content": text, "user_id": user_id, "idempotency_key": text}
    return dict(org.ok("POST", f"/threads/{tid}/messages", json=body))


def answers_to(http: httpx.Client, tid: str, trigger_id: str) -> Counter[str]:
    """How many messages each agent posted with ``trigger_id`` as causation."""
    return Counter(
        m["sender"]["id"]
        for m in all_envelopes(http, tid, messages_only=True)
        if m["sender"]["kind"] == "agent" and m["causation_id"] == trigger_id
    )


def assert_answered_once(http: httpx.Client, tid: str, trigger: dict[str, Any], bots: Any) -> None:
    """Every agent answered ``trigger`` exactly once (after a pause for a wrong duplicate)."""
    time.sleep(1.0)
    want = Counter({b["id"]: 1 for b in bots})
    assert answers_to(http, tid, trigger["id"]) == want


def agent_count(http: httpx.Client, tid: str) -> int:
    return sum(
        1 for m in all_envelopes(http, tid, messages_only=True) if m["sender"]["kind"] == "agent"
    )


def assert_agents_stop(http: httpx.Client, tid: str, bound: int) -> None:
    """The agents' exchange ends (nothing new for 2 s) with at most ``bound`` agent messages."""
    last = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = agent_count(http, tid)
        if now == last:
            break
        last = now
        time.sleep(2.0)
    else:
        raise AssertionError("the agents did not stop")
    assert 0 < last <= bound, last


# ------------------------------------------------------------------ remote runner processes


def test_remote_runner_killed_mid_answer_takes_its_claims_back_on_restart(
    quiet_server: LiveServer, spawn: Callable[..., Proc]
) -> None:
    """Lease 30 s (the old default) on purpose: only taking the claims back answers in time."""
    org = Org(quiet_server, "Acme")
    ann, bots, tid = two_agents(org)
    first = spawn("runner", runner_args(quiet_server.url, org.key, "--lease", "30"), slow=120)
    runner_id = wait_running(first)
    trigger = post(org, tid, ann["id"], "Where do we stand?")
    held = wait_until(
        "both agents to be answering",
        lambda: len(open_claims_on(quiet_server.db, tid, trigger["seq"])) == 2,
    )
    assert held
    first.kill9()  # in the middle of both answers: the model blocks for 120 s

    again = spawn("runner", runner_args(quiet_server.url, org.key, "--lease", "30"), slow=0.2)
    restarted_id = wait_running(again)
    wait_until(
        "every agent to answer the person's message",
        lambda: set(answers_to(org.http, tid, trigger["id"])) == {b["id"] for b in bots},
        timeout=WITHIN,
    )
    assert restarted_id == runner_id  # same host, user, server and credential: same id
    assert_answered_once(org.http, tid, trigger, bots)
    done = {c[0]: c for c in claims(quiet_server.db) if c[2] == trigger["seq"]}
    assert all(c[3] == runner_id and c[5] == 1 for c in done.values()), done
    # the agents answered each other too, and stopped at the budget (4) plus at most one answer
    # to Ann per agent
    assert_agents_stop(org.http, tid, 4 + len(bots))
    assert org.ok("GET", f"/threads/{tid}/verify")["ok"] is True


def test_another_runner_takes_a_dead_runners_claims_over_within_the_short_lease(
    quiet_server: LiveServer, spawn: Callable[..., Proc]
) -> None:
    """A runner on "another host" (another runner id) waits only for the default lease (10 s),
    renewed every third of it while the dead runner still ran."""
    org = Org(quiet_server, "Acme")
    ann, bots, tid = two_agents(org, budget=1000, routines=(0,))
    first = spawn("runner", runner_args(quiet_server.url, org.key), slow=120)
    dead_id = wait_running(first)
    trigger = post(org, tid, ann["id"], "Anything new?")
    seq = trigger["seq"]
    wait_until("the agent to be answering", lambda: open_claims_on(quiet_server.db, tid, seq))
    [(_, _, _, holder, expires, _)] = [c for c in claims(quiet_server.db) if c[2] == seq]
    assert holder == dead_id and expires - time.time() <= 10.5  # a short lease...
    time.sleep(4.0)
    [(_, _, _, _, renewed, _)] = [c for c in claims(quiet_server.db) if c[2] == seq]
    assert renewed > expires  # ...renewed (every third of it) while the agent answers
    first.kill9()

    other = spawn(
        "other", runner_args(quiet_server.url, org.key, "--runner-id", "elsewhere"), slow=0.2
    )
    assert wait_running(other) == "elsewhere"
    wait_until(
        "the other runner to answer",
        lambda: answers_to(org.http, tid, trigger["id"]),
        timeout=WITHIN,
    )
    assert_answered_once(org.http, tid, trigger, bots[:1])
    [(_, _, _, holder, _, done)] = [c for c in claims(quiet_server.db) if c[2] == seq]
    assert (holder, done) == ("elsewhere", 1)


def test_crashed_agents_answer_arrives_although_the_other_agent_spent_the_budget(
    quiet_server: LiveServer, spawn: Callable[..., Proc]
) -> None:
    """Budget 4: while Checker's runner is dead, Planner posts 4 messages (the budget). The
    restarted runner still answers Ann's message, once; Planner's messages get no answer and a
    5th agent message is refused: the loop protection holds."""
    org = Org(quiet_server, "Acme")
    ann, bots, tid = two_agents(org, budget=4, routines=(1,))
    planner, checker = bots
    first = spawn("runner", runner_args(quiet_server.url, org.key), slow=120)
    wait_running(first)
    trigger = post(org, tid, ann["id"], "Please check the numbers.")
    wait_until("Checker to be answering", lambda: open_claims_on(quiet_server.db, tid, 2))
    first.kill9()

    url = f"/threads/{tid}/messages"
    for i in range(4):
        org.ok("POST", url, json={"content": f"Planner note {i}.", "agent_id": planner["id"]})
    assert_error(
        org.http.post(url, json={"content": "one more", "agent_id": planner["id"]}),
        429,
        "agent_budget_exhausted",
    )

    again = spawn("runner", runner_args(quiet_server.url, org.key), slow=0.2)
    wait_running(again)
    wait_until(
        "Checker to answer Ann's message",
        lambda: answers_to(org.http, tid, trigger["id"]),
        timeout=WITHIN,
    )
    assert_answered_once(org.http, tid, trigger, [checker])
    wait_until("every claim done", lambda: all(c[5] for c in claims(quiet_server.db)))
    msgs = all_envelopes(org.http, tid, messages_only=True)
    from_checker = [m for m in msgs if m["sender"]["id"] == checker["id"]]
    assert [m["causation_id"] for m in from_checker] == [trigger["id"]]  # no answer to Planner
    assert org.ok("GET", f"/threads/{tid}")["consecutive_agent_messages"] == 5
    assert_error(
        org.http.post(url, json={"content": "again", "agent_id": planner["id"]}),
        429,
        "agent_budget_exhausted",
    )


def test_a_runner_stopped_cleanly_releases_its_claims_at_once(
    quiet_server: LiveServer, spawn: Callable[..., Proc]
) -> None:
    """SIGTERM while answering: the remote runner releases its claims (``POST /claims/release``)
    as the in-process runner does, so another runner answers at once (lease 30 s)."""
    org = Org(quiet_server, "Acme")
    ann, bots, tid = two_agents(org, budget=1000, routines=(0,))
    first = spawn("runner", runner_args(quiet_server.url, org.key, "--lease", "30"), slow=120)
    first_id = wait_running(first)
    trigger = post(org, tid, ann["id"], "Anything new?")
    seq = trigger["seq"]
    wait_until("the agent to be answering", lambda: open_claims_on(quiet_server.db, tid, seq))
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=30) == 0, first.err.read_text()
    [(_, _, _, holder, expires, done)] = [c for c in claims(quiet_server.db) if c[2] == seq]
    assert (holder, done) == (first_id, 0) and expires <= time.time()
    other = spawn(
        "other", runner_args(quiet_server.url, org.key, "--runner-id", "elsewhere"), slow=0.2
    )
    wait_running(other)
    wait_until("the other runner to answer", lambda: answers_to(org.http, tid, trigger["id"]), 10)
    assert_answered_once(org.http, tid, trigger, bots[:1])


def test_claims_release_ends_a_runners_leases_on_the_callers_agents_only(
    quiet_server: LiveServer,
) -> None:
    acme, globex = Org(quiet_server, "Acme"), Org(quiet_server, "Globex")
    ann, bots, tid = two_agents(acme, budget=1000, routines=())
    trigger = post(acme, tid, ann["id"], "hello")
    target = {"thread_id": tid, "trigger_seq": trigger["seq"], "runner_id": "r1"}
    for bot in bots:
        acme.ok("POST", "/claims", json={**target, "agent_id": bot["id"], "lease_seconds": 300})
    token = acme.ok(
        "POST", "/credentials", json={"kind": "agent_token", "subject_id": bots[0]["id"]}
    )
    utoken = acme.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": ann["id"]})
    ro = acme.ok("POST", "/credentials", json={"kind": "org_key", "scopes": ["read"]})
    with (
        quiet_server.client(token["secret"]) as agent_http,
        quiet_server.client(utoken["secret"]) as user_http,
        quiet_server.client(ro["secret"]) as ro_http,
    ):
        release = {"runner_id": "r1"}
        assert_error(user_http.post("/claims/release", json=release), 403, "permission_denied")
        assert_error(ro_http.post("/claims/release", json=release), 403, "permission_denied")
        for bad in ({"runner_id": ""}, {"runner_id": "x" * 101}, {}):
            assert_error(acme.http.post("/claims/release", json=bad), 422, "invalid_request")
        assert globex.ok("POST", "/claims/release", json=release) == {
            "runner_id": "r1",
            "released": 0,
        }
        assert len(open_claims_on(quiet_server.db, tid, trigger["seq"])) == 2
        r = agent_http.post("/claims/release", json=release)
        assert r.status_code == 200 and r.json()["released"] == 1, r.text
    # the agent token's agent is free for another runner now; the other agent is still held
    other = {**target, "runner_id": "r2"}
    acme.ok("POST", "/claims", json={**other, "agent_id": bots[0]["id"]})
    assert_error(
        acme.http.post("/claims", json={**other, "agent_id": bots[1]["id"]}), 409, "claim_held"
    )
    assert acme.ok("POST", "/claims/release", json=release)["released"] == 1
    acme.ok("POST", "/claims", json={**other, "agent_id": bots[1]["id"]})


# ------------------------------------------------------------------ the in-process runner


def serve_args(db: Path, port: int) -> list[str]:
    """``agent-network serve`` with the ``slow`` model registered (runner_helpers)."""
    code = (
        "import sys, runner_helpers; from agent_network.cli import app; "
        "sys.argv = ['agent-network', *sys.argv[1:]]; app()"
    )
    args = [sys.executable, "-c", code, "serve", "--db", str(db), "--port", str(port)]
    return [*args, "--model", "slow"]


def wait_healthy(proc: Proc, url: str) -> None:
    def healthy() -> bool:
        assert proc.proc.poll() is None, proc.err.read_text() + proc.out.read_text()
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until("the server to come up", healthy)


def test_server_killed_mid_answer_its_runner_takes_its_claims_back_on_restart(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    """``agent-network serve`` (in-process runner, lease 30 s) is killed while both agents
    answer; the restarted server's runner answers within seconds, under the same runner id."""
    db, port = tmp_path / "an.db", free_port()
    url = f"http://127.0.0.1:{port}"

    async def bootstrap() -> str:
        from agent_network.services import create_admin_key

        engine = create_engine(database_url(db))
        await upgrade_schema(engine)
        key = await create_admin_key(engine)
        await engine.dispose()
        return key

    admin = anyio.run(bootstrap)
    lease = {"AGENT_NETWORK_CLAIM_LEASE": "30"}
    server = spawn("serve", serve_args(db, port), slow=120, **lease)
    wait_healthy(server, url)
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:
        r = http.post("/orgs", json={"name": "Acme"}, headers={"Authorization": f"Bearer {admin}"})
        key = r.json()["secret"]
        http.headers["Authorization"] = f"Bearer {key}"

        def ok(method: str, path: str, **kw: Any) -> Any:
            r = http.request(method, path, **kw)
            assert r.status_code < 300, r.text
            return r.json()

        ann = ok("POST", "/users", json={"name": "Ann"})
        bots = [ok("POST", "/agents", json={"name": n, "lookup_key": n}) for n in ("p", "c")]
        for bot in bots:
            ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
        team = ok("POST", "/teams", json={"name": "T"})["id"]
        for kind, mid in [("user", ann["id"])] + [("agent", b["id"]) for b in bots]:
            ok("POST", f"/teams/{team}/members", json={f"{kind}_id": mid})
        tid = ok("POST", f"/teams/{team}/threads", json={"title": "W"})["id"]
        trigger = ok(
            "POST", f"/threads/{tid}/messages", json={"content": "Go", "user_id": ann["id"]}
        )

        def both_held() -> dict[str, str] | None:
            held = open_claims_on(db, tid, trigger["seq"])
            return held if len(held) == 2 else None

        held = wait_until("both agents to be answering", both_held)
        [runner_id] = set(held.values())
        assert runner_id.startswith("inproc:")
        server.kill9()

        again = spawn("serve", serve_args(db, port), slow=0.2, **lease)
        wait_healthy(again, url)
        wait_until(
            "every agent to answer the person's message",
            lambda: set(answers_to(http, tid, trigger["id"])) == {b["id"] for b in bots},
            timeout=WITHIN,
        )
        assert_answered_once(http, tid, trigger, bots)
        done = [c for c in claims(db) if c[2] == trigger["seq"]]
        assert {(c[3], c[5]) for c in done} == {(runner_id, 1)}
        assert_agents_stop(http, tid, 4 + len(bots))


def test_in_process_runner_takes_back_a_claim_its_dead_predecessor_left(tmp_path: Path) -> None:
    """The runner of a server over a database where its own id (same host, user, database)
    holds a live claim left by a crash answers at once; a claim of another runner id is left to
    its lease."""
    db = tmp_path / "an.db"
    first = LiveServer(db)
    first.start()
    try:
        runner_id = first.app.state.runner.runner_id
    finally:
        first.stop()
    quiet = LiveServer(db, run_routines=False)
    quiet.start()
    try:
        org = Org(quiet, "Acme")
        ann, bots, tid = two_agents(org, budget=2)  # an answer, an answer to it, then quiet
        trigger = post(org, tid, ann["id"], "Status?")
        org.http.close()
    finally:
        quiet.stop()
    # a crash while answering: each agent's claim is live for 5 more minutes
    with sqlite3.connect(db) as conn:
        for bot, holder in ((bots[0], runner_id), (bots[1], "inproc:otherhost:0000:0")):
            conn.execute(
                "INSERT INTO runner_claims (agent_id, thread_id, trigger_seq, runner_id, "
                "expires_at, done) VALUES (?, ?, ?, ?, ?, 0)",
                (bot["id"], tid, trigger["seq"], holder, time.time() + 300),
            )
    again = LiveServer(db)
    again.start()
    try:
        http = again.client(org.key)
        wait_until(
            "the runner to answer for its own dead claim",
            lambda: answers_to(http, tid, trigger["id"]).get(bots[0]["id"]),
            timeout=WITHIN,
        )
        assert again.app.state.runner.runner_id == runner_id
        time.sleep(1.0)
        # the other runner's claim is still its own until the lease runs out
        assert answers_to(http, tid, trigger["id"]) == Counter({bots[0]["id"]: 1})
        assert open_claims_on(db, tid, trigger["seq"]) == {bots[1]["id"]: "inproc:otherhost:0000:0"}
        http.close()
    finally:
        again.stop()


# ------------------------------------------------------------------------- runner ids


def test_runner_ids_are_stable_per_scope_and_never_shared_by_two_live_holders(
    tmp_path: Path,
) -> None:
    one = take_runner_id("remote", "http://a\0key", directory=tmp_path)
    two = take_runner_id("remote", "http://a\0key", directory=tmp_path)
    other = take_runner_id("remote", "http://b\0key", directory=tmp_path)
    assert one.locked and two.locked and other.locked
    assert one.runner_id.endswith(":0") and two.runner_id.endswith(":1")
    assert one.runner_id.rsplit(":", 1)[0] == two.runner_id.rsplit(":", 1)[0]
    assert other.runner_id.endswith(":0") and other.runner_id != one.runner_id
    assert "key" not in one.runner_id and len(one.runner_id) <= 100
    one.release()
    back = take_runner_id("remote", "http://a\0key", directory=tmp_path)
    assert back.runner_id == one.runner_id  # the freed id goes to the next runner started
    mine = take_runner_id("remote", "http://a\0key", runner_id="mine", directory=tmp_path)
    with pytest.raises(RunnerIdInUseError) as err:
        take_runner_id("remote", "http://a\0key", runner_id="mine", directory=tmp_path)
    assert err.value.status == 409 and "mine" in err.value.message
    for seat in (two, other, back, mine):
        seat.release()


def test_a_killed_processs_runner_id_goes_to_the_next_runner(tmp_path: Path) -> None:
    """The lock dies with its process (kill -9 too), so a restart gets the same id."""
    code = (
        "import sys, time; from pathlib import Path; "
        "from agent_network.runtime.identity import take_runner_id; "
        "seat = take_runner_id('remote', 'http://x\\0k', directory=Path(sys.argv[1])); "
        "print(seat.runner_id, flush=True); time.sleep(300)"
    )
    out = tmp_path / "out"
    with out.open("wb") as sink:
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=sink)
    try:
        held = wait_until("the child to take an id", lambda: out.read_text().strip())
        taken = take_runner_id("remote", "http://x\0k", directory=tmp_path)
        assert taken.runner_id != held  # the live child keeps its id
        taken.release()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    after = take_runner_id("remote", "http://x\0k", directory=tmp_path)
    assert after.runner_id == held
    after.release()


# ---------------------------------------------------------------------------- the budget


def test_answers_to_a_persons_message_pass_a_spent_budget_once_per_agent(
    quiet_server: LiveServer,
) -> None:
    org = Org(quiet_server, "Acme")
    ann, (a, b), tid = two_agents(org, budget=2, routines=())
    url = f"/threads/{tid}/messages"
    person = post(org, tid, ann["id"], "Question")

    def reply(agent: dict[str, Any], cause: str, key: str | None = None) -> httpx.Response:
        body = {"content": "x", "agent_id": agent["id"], "causation_id": cause}
        body["idempotency_key"] = key or reply_key(agent["id"], cause)
        return org.http.post(url, json=body)

    first = org.ok("POST", url, json={"content": "a1", "agent_id": a["id"]})
    org.ok("POST", url, json={"content": "a2", "agent_id": a["id"]})  # budget of 2 spent
    # an answer to another agent's message, or under another key, is refused
    assert_error(reply(b, first["id"]), 429, "agent_budget_exhausted")
    assert_error(reply(b, person["id"], "my-own-key"), 429, "agent_budget_exhausted")
    # B's answer to Ann passes, once: the same post again returns the stored one
    late = reply(b, person["id"])
    assert late.status_code == 201, late.text
    again = reply(b, person["id"])
    assert again.status_code in (200, 201) and again.json()["id"] == late.json()["id"]
    # A may still answer Ann once too; nothing else passes
    assert reply(a, person["id"]).status_code == 201
    assert_error(reply(a, late.json()["id"]), 429, "agent_budget_exhausted")
    view = org.ok("GET", f"/threads/{tid}")
    assert view["consecutive_agent_messages"] == 4
    # a budget of 0 keeps every agent silent, answers to people included
    org.ok("PATCH", f"/threads/{tid}", json={"agent_budget": 0})
    person2 = post(org, tid, ann["id"], "Second question")
    assert_error(reply(a, person2["id"]), 429, "agent_budget_exhausted")


def test_runner_checks_admit_an_answer_to_a_person_past_a_spent_budget() -> None:
    spent = ThreadState("thr_x", last_seq=9, agent_budget=4, consecutive_agent=4)
    assert budget_spent(spent) and not budget_spent(spent, answers_person=True)
    zero = ThreadState("thr_x", last_seq=9, agent_budget=0, consecutive_agent=0)
    assert budget_spent(zero, answers_person=True)
    view = {"status": "open", "agent_budget": 4, "consecutive_agent_messages": 4}
    assert not thread_may_speak(view, "agt_1")
    assert thread_may_speak(view, "agt_1", answers_person=True)
    assert not thread_may_speak({**view, "agent_budget": 0}, "agt_1", answers_person=True)
    assert not thread_may_speak({**view, "status": "closed"}, "agt_1", answers_person=True)


@pytest.fixture(scope="module")
def hub_db(migrated_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file of this module's own (a copy of the session's template)."""
    path = tmp_path_factory.mktemp("hub") / "hub.db"
    shutil.copyfile(migrated_template, path)
    return path


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("person")),
        st.tuples(st.just("agent"), st.integers(0, 2)),  # a plain agent message
        # agent i answers the j-th stored message (from the end) under its reply key
        st.tuples(st.just("answer"), st.integers(0, 2), st.integers(0, 6)),
        st.tuples(st.just("budget"), st.integers(0, 5)),
    ),
    max_size=40,
)
_counter = iter(range(10**9))


@settings(max_examples=30, deadline=None)
@given(budget=st.integers(0, 5), ops=OPS)
def test_budget_admits_each_agents_answer_to_a_person_once_and_still_bounds_the_agents(
    hub_db: Path, budget: int, ops: list[tuple[Any, ...]]
) -> None:
    """Against a reference model: a plain agent message passes only while fewer than
    ``agent_budget`` agent messages followed the latest person's message; an agent's answer
    under its reply key to a person's message passes whenever the budget is not 0 (at most once
    per agent and message: the key), an answer to an agent's message like a plain one. So the
    agent messages after a person's message never exceed budget + one answer per agent and
    person's message."""
    tid = f"thr_b{next(_counter):018d}"
    org = "org_hyp"
    system = Sender("system", "key_hyp", org)

    async def run() -> None:
        engine = create_engine(database_url(hub_db))
        stored: list[tuple[str, str]] = []  # (envelope id, sender kind) of the messages
        answered: set[tuple[int, str]] = set()  # (agent, envelope id) answers stored
        consecutive, cur_budget, since_person, answers_since, peak = 0, budget, 0, 0, budget
        async with Hub.open(engine) as hub:
            await hub.append(
                tid,
                type=EV_THREAD_CREATED,
                data={"title": "t", "team_id": "team_x", "adapter": "open", "agent_budget": budget},
                sender=system,
            )
            for op in ops:
                if op[0] == "budget":
                    await hub.append(
                        tid, type=EV_BUDGET_SET, data={"agent_budget": op[1]}, sender=system
                    )
                    cur_budget = op[1]
                    peak = max(peak, cur_budget)
                    continue
                if op[0] == "person":
                    env = await hub.append(
                        tid, type=EV_MESSAGE, data={"content": "p"}, sender=Sender("user", "u", org)
                    )
                    stored.append((env.id, "user"))
                    consecutive, since_person, answers_since, peak = 0, 0, 0, cur_budget
                    continue
                agent = Sender("agent", f"agt_{op[1]}", org)
                cause: tuple[str, str] | None = None
                if op[0] == "answer" and stored:
                    cause = stored[-1 - min(op[2], len(stored) - 1)]
                kw: dict[str, Any] = {}
                if cause is not None:
                    kw = {
                        "causation_id": cause[0],
                        "idempotency_key": reply_key(agent.id, cause[0]),
                    }
                call = hub.append(tid, type=EV_MESSAGE, data={"content": "a"}, sender=agent, **kw)
                if cause is not None and (op[1], cause[0]) in answered:
                    await call  # the stored answer again
                    continue
                to_person = cause is not None and cause[1] == "user"
                if consecutive >= cur_budget and not (to_person and cur_budget > 0):
                    with pytest.raises(RunawayBudgetError):
                        await call
                    continue
                env = await call
                stored.append((env.id, "agent"))
                if cause is not None:
                    answered.add((op[1], cause[0]))
                consecutive += 1
                since_person += 1
                answers_since += int(to_person)
                # the loop bound: other agent messages within the budget (the highest it had
                # since the latest person's message), answers to people on top
                assert since_person - answers_since <= peak
            state = await hub.state(tid)
            assert state.consecutive_agent == consecutive
        await engine.dispose()

    anyio.run(run)
