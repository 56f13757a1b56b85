"""The per-thread WAL: ordering under concurrency, idempotency, the hash chain, restart, budget."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_network.errors import RunawayBudgetError, ThreadClosedError
from agent_network.hub import Hub
from agent_network.model.envelope import Sender, envelope_hash
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_MESSAGE,
    EV_THREAD_CLOSED,
    EV_THREAD_CREATED,
)
from agent_network.protocol.fold import fold
from agent_network.store.engine import create_engine, database_url, upgrade_schema
from conftest import (
    LiveServer,
    Org,
    TestDb,
    all_envelopes,
    assert_error,
    sql_execute,
    sqlite_only,
)

CLI = Path(sys.executable).parent / "agent-network"

pytestmark = pytest.mark.engines("sqlite", "postgresql")


def _thread(org: Org, *members: tuple[str, str], title: str = "T", **kw: Any) -> str:
    team = org.team("Team", *members)
    return str(org.ok("POST", f"/teams/{team['id']}/threads", json={"title": title, **kw})["id"])


# ------------------------------------------------------------------------------ concurrency


def test_100_concurrent_posters_get_contiguous_unique_seqs(server: LiveServer, make_org) -> None:
    a: Org = make_org("A")
    users = [a.user(f"U{i}") for i in range(5)]
    tid = _thread(a, *(("user", u["id"]) for u in users))

    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(
            base_url=f"{server.url}/api/v1",
            headers={"Authorization": f"Bearer {a.key}"},
            limits=limits,
            timeout=60,
        ) as c:
            go = asyncio.Event()

            async def one(i: int) -> httpx.Response:
                await go.wait()
                body = {"content": f"msg-{i:03d}", "user_id": users[i % 5]["id"]}
                return await c.post(f"/threads/{tid}/messages", json=body)

            tasks = [asyncio.create_task(one(i)) for i in range(100)]
            await asyncio.sleep(0.05)
            go.set()
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [201] * 100, [
        r.text for r in responses if r.status_code != 201
    ]
    by_content = {r.json()["content"]: r.json()["seq"] for r in responses}
    assert len(by_content) == 100
    assert sorted(by_content.values()) == list(range(2, 102))

    envs = all_envelopes(a.http, tid)
    assert [e["seq"] for e in envs] == list(range(1, 102))
    contents = [e["content"] for e in envs[1:]]
    assert sorted(contents) == sorted(f"msg-{i:03d}" for i in range(100))
    assert len({e["id"] for e in envs}) == 101
    # what each poster was told is exactly what is stored
    assert {e["content"]: e["seq"] for e in envs[1:]} == by_content
    for prev, cur in itertools.pairwise(envs):
        assert cur["prev_hash"] == prev["hash"]
    assert a.ok("GET", f"/threads/{tid}")["last_seq"] == 101
    assert a.ok("GET", f"/threads/{tid}/verify")["ok"] is True


def test_concurrent_posts_with_one_idempotency_key_store_one_copy(
    server: LiveServer, make_org
) -> None:
    a: Org = make_org("A")
    u = a.user("U")
    tid = _thread(a, ("user", u["id"]))

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=f"{server.url}/api/v1",
            headers={"Authorization": f"Bearer {a.key}"},
            timeout=60,
        ) as c:
            body = {"content": "once", "user_id": u["id"], "idempotency_key": "k-1"}
            return list(
                await asyncio.gather(
                    *(c.post(f"/threads/{tid}/messages", json=body) for _ in range(30))
                )
            )

    responses = asyncio.run(post_all())
    assert {r.status_code for r in responses} == {201}
    assert len({(r.json()["id"], r.json()["seq"]) for r in responses}) == 1
    msgs = all_envelopes(a.http, tid, messages_only=True)
    assert [m["content"] for m in msgs] == ["once"]


# ------------------------------------------------------------------------------ idempotency


def test_idempotency_key_returns_the_original_also_after_restart(
    server: LiveServer, make_org
) -> None:
    a: Org = make_org("A")
    u, bot = a.user("U"), a.agent("Bot", "bot")
    tid = _thread(a, ("user", u["id"]), ("agent", bot["id"]))
    tid2 = _thread(a, ("user", u["id"]), title="other")
    url = f"/threads/{tid}/messages"
    first = a.ok("POST", url, json={"content": "hello", "user_id": u["id"], "idempotency_key": "K"})
    assert first["idempotency_key"] == "K" and first["seq"] == 2
    again = a.ok("POST", url, json={"content": "hello", "user_id": u["id"], "idempotency_key": "K"})
    assert again == first
    a.ok("POST", url, json={"content": "between", "user_id": u["id"]})
    # a different content from the same sender under the same key still returns the original
    same_sender = a.ok(
        "POST", url, json={"content": "changed", "user_id": u["id"], "idempotency_key": "K"}
    )
    assert same_sender == first
    # keys are scoped per sender: another sender's "K" is a different key
    other = a.ok(
        "POST", url, json={"content": "changed", "agent_id": bot["id"], "idempotency_key": "K"}
    )
    assert other["id"] != first["id"] and other["idempotency_key"] == "K"
    # keys are per thread
    elsewhere = a.ok(
        "POST",
        f"/threads/{tid2}/messages",
        json={"content": "x", "user_id": u["id"], "idempotency_key": "K"},
    )
    assert elsewhere["thread_id"] == tid2 and elsewhere["id"] != first["id"]

    server.restart()
    after = a.ok("POST", url, json={"content": "hello", "user_id": u["id"], "idempotency_key": "K"})
    assert after == first
    msgs = all_envelopes(a.http, tid, messages_only=True)
    assert [(m["content"], m["seq"]) for m in msgs] == [
        ("hello", 2),
        ("between", 3),
        ("changed", 4),
    ]
    assert a.ok("GET", f"/threads/{tid}")["last_seq"] == 4
    # a new key after restart appends after the old head, chained to it
    new = a.ok("POST", url, json={"content": "new", "user_id": u["id"], "idempotency_key": "K2"})
    assert new["seq"] == 5 and new["prev_hash"] == msgs[-1]["hash"]
    assert a.ok("GET", f"/threads/{tid}/verify")["ok"] is True


# ------------------------------------------------------------------------------- tampering


@pytest.fixture
def chain(server: LiveServer, make_org) -> Iterator[tuple[Org, str]]:
    """A thread with seq 1..6 (thread.created + five messages)."""
    a: Org = make_org("A")
    u = a.user("U")
    tid = _thread(a, ("user", u["id"]))
    for i in range(5):
        a.ok("POST", f"/threads/{tid}/messages", json={"content": f"m{i}", "user_id": u["id"]})
    assert a.ok("GET", f"/threads/{tid}/verify") == {
        "thread_id": tid,
        "ok": True,
        "checked": 6,
        "first_bad_seq": None,
        "reason": None,
    }
    yield a, tid


def _tamper(server: LiveServer, sql: str, **params: Any) -> None:
    server.stop()
    assert sql_execute(server.db, sql, **params) == 1, sql
    server.start()


def _cli_verify(db: TestDb, tid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "thread", "verify", tid, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_catches_changed_data(server: LiveServer, chain: tuple[Org, str]) -> None:
    a, tid = chain
    ok = _cli_verify(server.db, tid)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 envelopes" in ok.stdout

    _tamper(
        server,
        "UPDATE envelopes SET data = :data WHERE thread_id = :tid AND seq = 4",
        data=json.dumps({"content": "I never said that"}),
        tid=tid,
    )
    report = a.ok("GET", f"/threads/{tid}/verify")
    assert report["ok"] is False
    assert report["first_bad_seq"] == 4
    assert "hash" in report["reason"]

    res = _cli_verify(server.db, tid)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "seq 4" in res.stdout
    # an unknown thread is an error too
    assert _cli_verify(server.db, "thr_000000000000000000000000").returncode == 1


def test_verify_catches_a_deleted_row(server: LiveServer, chain: tuple[Org, str]) -> None:
    a, tid = chain
    _tamper(server, "DELETE FROM envelopes WHERE thread_id = :tid AND seq = 3", tid=tid)
    report = a.ok("GET", f"/threads/{tid}/verify")
    assert report["ok"] is False
    # the break is where seq 3 went missing (reported at 3, or at 4 where the gap is seen)
    assert report["first_bad_seq"] in (3, 4)
    assert "3" in report["reason"]
    assert _cli_verify(server.db, tid).returncode == 1


def test_verify_catches_a_changed_prev_hash(server: LiveServer, chain: tuple[Org, str]) -> None:
    a, tid = chain
    _tamper(
        server,
        "UPDATE envelopes SET prev_hash = :prev WHERE thread_id = :tid AND seq = 5",
        prev="f" * 64,
        tid=tid,
    )
    report = a.ok("GET", f"/threads/{tid}/verify")
    assert (report["ok"], report["first_bad_seq"]) == (False, 5)
    assert "prev_hash" in report["reason"]
    assert _cli_verify(server.db, tid).returncode == 1


def test_verify_catches_a_rewrite_with_a_recomputed_hash(
    server: LiveServer, chain: tuple[Org, str]
) -> None:
    """A forger who rewrites seq 3 *and* its hash breaks the link to seq 4."""
    a, tid = chain
    env = all_envelopes(a.http, tid)[2]
    assert env["seq"] == 3
    fields = {
        k: env[k]
        for k in (
            "thread_id",
            "seq",
            "id",
            "type",
            "idempotency_key",
            "causation_id",
            "created_at",
            "prev_hash",
        )
    }
    fields.update(
        data={"content": "forged"},
        sender_kind=env["sender"]["kind"],
        sender_id=env["sender"]["id"],
        sender_org_id=env["sender"]["org_id"],
        audience=None,
    )
    forged_hash = envelope_hash(**fields)
    _tamper(
        server,
        "UPDATE envelopes SET data = :data, hash = :hash WHERE thread_id = :tid AND seq = 3",
        data=json.dumps({"content": "forged"}),
        hash=forged_hash,
        tid=tid,
    )
    report = a.ok("GET", f"/threads/{tid}/verify")
    assert (report["ok"], report["first_bad_seq"]) == (False, 4)
    assert _cli_verify(server.db, tid).returncode == 1


# --------------------------------------------------------------------------------- restart


def test_restart_gives_identical_state(server: LiveServer, make_org) -> None:
    a, b = make_org("A"), make_org("B")
    ua, bot = a.user("Ann"), a.agent("Bot", "bot")
    ub = b.user("Bea")
    t1 = _thread(a, ("user", ua["id"]), ("agent", bot["id"]))
    for i in range(3):
        a.ok("POST", f"/threads/{t1}/messages", json={"content": f"a{i}", "user_id": ua["id"]})
        a.ok("POST", f"/threads/{t1}/messages", json={"content": f"b{i}", "agent_id": bot["id"]})
    a.ok("POST", f"/threads/{t1}/messages", json={"content": "c", "agent_id": bot["id"]})
    a.ok("PATCH", f"/threads/{t1}", json={"agent_budget": 7})
    # a shared, closed network thread
    net = a.ok("POST", "/networks", json={"name": "N"})
    code = a.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    b.ok("POST", "/networks/join", json={"code": code, "user_ids": [ub["id"]]})
    t2 = b.ok("POST", f"/networks/{net['id']}/threads", json={"title": "shared"})["id"]
    b.ok("POST", f"/threads/{t2}/messages", json={"content": 'ünïcødé ✓ "q"', "user_id": ub["id"]})
    a.ok("POST", f"/networks/{net['id']}/close")

    def snapshot() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for org in (a, b):
            out[f"{org.name}:threads"] = org.ok("GET", "/threads")
            for t in (t1, t2):
                r = org.http.get(f"/threads/{t}")
                body = r.json()
                if r.status_code != 200:  # the request id differs per request by design
                    body["error"].pop("request_id", None)
                out[f"{org.name}:{t}"] = (r.status_code, body)
                if r.status_code == 200:
                    out[f"{org.name}:{t}:envs"] = all_envelopes(org.http, t)
                    out[f"{org.name}:{t}:verify"] = org.ok("GET", f"/threads/{t}/verify")
        return out

    before = snapshot()
    assert before["A:" + t1][1]["consecutive_agent_messages"] == 2
    assert before["A:" + t1][1]["agent_budget"] == 7
    assert before["B:" + t2][1]["status"] == "closed"
    assert len(before["A:" + t1 + ":envs"]) == 9
    server.restart()
    assert snapshot() == before
    server.restart()
    assert snapshot() == before
    # and the restarted hub continues the same chain with the same budget rules
    r = a.http.post(f"/threads/{t1}/messages", json={"content": "d", "agent_id": bot["id"]})
    assert r.status_code == 201 and r.json()["seq"] == 10
    assert r.json()["prev_hash"] == before["A:" + t1 + ":envs"][-1]["hash"]
    assert_error(
        b.http.post(f"/threads/{t2}/messages", json={"content": "x", "user_id": ub["id"]}),
        409,
        "thread_closed",
    )


# ------------------------------------------------------------------------------ hub direct


@pytest.fixture(scope="module")
def hub_db(module_db: TestDb) -> TestDb:
    return module_db


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("msg"),
            st.sampled_from(["user", "agent"]),
            st.integers(0, 2),
            st.text(min_size=1, max_size=40),
            st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])),
        ),
        st.tuples(st.just("budget"), st.integers(0, 6)),
        st.tuples(st.just("close")),
    ),
    max_size=30,
)

_counter = iter(range(10**9))


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(0, 5), ops=OPS)
def test_hub_state_equals_fold_of_the_log_in_a_fresh_hub(
    hub_db: TestDb, budget: int, ops: list[tuple[Any, ...]]
) -> None:
    tid = f"thr_hyp{next(_counter):017d}"
    org = "org_hyp"
    system = Sender("system", "key_hyp", org)

    async def run() -> None:
        engine = create_engine(database_url(hub_db))
        # reference model
        last_seq, messages, consecutive, cur_budget, closed = 1, 0, 0, budget, False
        keys: dict[str, int] = {}
        async with Hub.open(engine) as hub:
            created = await hub.append(
                tid,
                type=EV_THREAD_CREATED,
                data={"title": "t", "team_id": "team_x", "adapter": "open", "agent_budget": budget},
                sender=system,
            )
            assert created.seq == 1
            for op in ops:
                if op[0] == "msg":
                    _, kind, who, content, key = op
                    sender = Sender(kind, f"{kind[:3]}_{who}", org)
                    call = hub.append(
                        tid,
                        type=EV_MESSAGE,
                        data={"content": content},
                        sender=sender,
                        idempotency_key=key,
                    )
                    if key is not None and key in keys:
                        env = await call
                        assert env.seq == keys[key]
                        continue
                    if closed:
                        with pytest.raises(ThreadClosedError):
                            await call
                        continue
                    if kind == "agent" and consecutive >= cur_budget:
                        with pytest.raises(RunawayBudgetError):
                            await call
                        continue
                    env = await call
                    last_seq += 1
                    messages += 1
                    consecutive = consecutive + 1 if kind == "agent" else 0
                    assert env.seq == last_seq
                    if key is not None:
                        keys[key] = env.seq
                elif op[0] == "budget":
                    call = hub.append(
                        tid, type=EV_BUDGET_SET, data={"agent_budget": op[1]}, sender=system
                    )
                    if closed:
                        with pytest.raises(ThreadClosedError):
                            await call
                        continue
                    await call
                    last_seq += 1
                    cur_budget = op[1]
                else:
                    call = hub.append(tid, type=EV_THREAD_CLOSED, data={}, sender=system)
                    if closed:
                        with pytest.raises(ThreadClosedError):
                            await call
                        continue
                    await call
                    last_seq += 1
                    closed = True
            live = await hub.state(tid)
            assert (live.last_seq, live.messages, live.consecutive_agent) == (
                last_seq,
                messages,
                consecutive,
            )
            assert (live.agent_budget, live.status) == (cur_budget, "closed" if closed else "open")
        await engine.dispose()

        engine2 = create_engine(database_url(hub_db))
        async with Hub.open(engine2) as fresh:
            envs = await fresh.read(tid)
            assert [e.seq for e in envs] == list(range(1, last_seq + 1))
            assert fold(tid, envs) == live
            assert await fresh.state(tid) == live
            report = await fresh.verify(tid)
            assert report.ok and report.checked == last_seq
        await engine2.dispose()

    anyio.run(run)


# ------------------------------------------------------------------------------ the budget


def test_runaway_budget_refuses_the_fifth_agent_message(make_org) -> None:
    a: Org = make_org("A")
    u, bot, bot2 = a.user("Ann"), a.agent("Bot", "bot"), a.agent("Bot 2", "bot2")
    tid = _thread(a, ("user", u["id"]), ("agent", bot["id"]), ("agent", bot2["id"]))
    other = _thread(a, ("agent", bot["id"]), title="other")
    url = f"/threads/{tid}/messages"
    for i in range(4):
        sender = bot if i % 2 == 0 else bot2
        r = a.http.post(url, json={"content": f"agent {i}", "agent_id": sender["id"]})
        assert r.status_code == 201, r.text
    assert a.ok("GET", f"/threads/{tid}")["consecutive_agent_messages"] == 4
    err = assert_error(
        a.http.post(url, json={"content": "fifth", "agent_id": bot["id"]}),
        429,
        "agent_budget_exhausted",
    )
    assert "budget" in err["message"]
    assert_error(
        a.http.post(url, json={"content": "fifth b", "agent_id": bot2["id"]}),
        429,
        "agent_budget_exhausted",
    )
    assert a.ok("GET", f"/threads/{tid}")["last_seq"] == 5
    # the budget is per thread
    assert (
        a.http.post(
            f"/threads/{other}/messages", json={"content": "fine", "agent_id": bot["id"]}
        ).status_code
        == 201
    )

    refused = a.ok("GET", "/audit", params={"outcome": "refused"})
    assert len(refused) == 2
    for rec, who in zip(refused, (bot, bot2), strict=True):
        assert rec["action"] == "envelope.message"
        assert rec["resource_kind"] == "thread" and rec["resource_id"] == tid
        # the org key acted (principal); the agent it posted as is the sender
        assert rec["principal_kind"] == "org" and rec["data"]["sender_id"] == who["id"]
        assert rec["reason"].startswith("agent_budget_exhausted")
        assert rec["org_id"] == a.id
    assert a.ok("GET", "/audit", params={"outcome": "refused", "resource_id": other}) == []

    # a person speaking resets the budget
    a.ok("POST", url, json={"content": "carry on", "user_id": u["id"]})
    assert a.ok("GET", f"/threads/{tid}")["consecutive_agent_messages"] == 0
    r = a.http.post(url, json={"content": "thanks", "agent_id": bot["id"]})
    assert r.status_code == 201 and r.json()["seq"] == 7
    assert a.ok("GET", f"/threads/{tid}")["consecutive_agent_messages"] == 1
    contents = [m["content"] for m in all_envelopes(a.http, tid, messages_only=True)]
    assert contents == ["agent 0", "agent 1", "agent 2", "agent 3", "carry on", "thanks"]


def test_budget_zero_refuses_every_agent_message(make_org) -> None:
    a: Org = make_org("A")
    u, bot = a.user("Ann"), a.agent("Bot", "bot")
    tid = _thread(a, ("user", u["id"]), ("agent", bot["id"]), agent_budget=0)
    url = f"/threads/{tid}/messages"
    assert_error(
        a.http.post(url, json={"content": "x", "agent_id": bot["id"]}),
        429,
        "agent_budget_exhausted",
    )
    a.ok("POST", url, json={"content": "human", "user_id": u["id"]})
    assert_error(
        a.http.post(url, json={"content": "x", "agent_id": bot["id"]}),
        429,
        "agent_budget_exhausted",
    )
    a.ok("PATCH", f"/threads/{tid}", json={"agent_budget": 1})
    assert a.http.post(url, json={"content": "ok", "agent_id": bot["id"]}).status_code == 201
    assert_error(
        a.http.post(url, json={"content": "x", "agent_id": bot["id"]}),
        429,
        "agent_budget_exhausted",
    )


@sqlite_only("checkpoints of SQLite's own WAL file by the SQLite WAL writer")
def test_checkpoints_run_off_the_commit_path_and_reach_the_database_file(tmp_path: Path) -> None:
    """The writer never checkpoints inside a commit (``wal_autocheckpoint=0``); its checkpointer
    thread copies the WAL into the database file while commits go on, and a last time at close:
    afterwards the database file alone (no WAL beside it) holds every committed row."""
    from agent_network.store import wal_writer
    from agent_network.store.wal_writer import SqliteWalWriter

    db = tmp_path / "ckpt.db"
    asyncio.run(upgrade_schema(create_engine(database_url(db))))
    commits = 5 * wal_writer.CHECKPOINT_EVERY + 7

    def insert(i: int) -> Any:
        def fn(session: Any) -> None:
            session.insert_audit(
                [
                    {
                        "org_id": "org_ckpt",
                        "principal_kind": "user",
                        "principal_id": "usr_ckpt",
                        "action": "test.row",
                        "resource_kind": "thread",
                        "resource_id": f"thr_{i}",
                        "outcome": "accepted",
                        "reason": None,
                        "data": {"i": i},
                        "created_at": "2026-01-01T00:00:00.000000Z",
                    }
                ]
            )
            assert session.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0

        return fn

    wal = Path(f"{db}-wal")

    def wal_size() -> int:
        return wal.stat().st_size

    async def run() -> tuple[int, int, int]:
        writer = SqliteWalWriter(str(db))
        await writer.start()
        try:
            await writer.transaction(insert(0))
            one_commit = wal_size()  # the WAL header and the frames of one commit
            numbers = iter(range(1, commits))

            async def committer() -> None:  # 8 of them keep the writer busy at all times
                for i in numbers:
                    await writer.transaction(insert(i))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(committer)
            with anyio.fail_after(30):
                # a counter set by the checkpointer thread: poll it
                while writer.checkpoints == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            size = wal_size()
        finally:
            await writer.aclose()
        return writer.checkpoints, one_commit, size

    checkpoints, one_commit, size = asyncio.run(run())
    assert checkpoints >= 1
    # the WAL restarted from its beginning after checkpoints instead of holding every commit
    assert size < 0.5 * one_commit * commits, (size, one_commit, commits)
    alone = tmp_path / "copy" / "ckpt.db"
    alone.parent.mkdir()
    alone.write_bytes(db.read_bytes())  # the database file only, not ckpt.db-wal
    conn = sqlite3.connect(alone)
    try:
        ids = {
            r[0]
            for r in conn.execute(
                "SELECT resource_id FROM audit_log WHERE org_id = ?", ("org_ckpt",)
            )
        }
    finally:
        conn.close()
    assert ids == {f"thr_{i}" for i in range(commits)}


def test_envelope_ids_sort_in_the_order_they_were_appended(db: TestDb) -> None:
    """Envelope ids begin with their millisecond, so the unique index on them grows at its end
    (a random id put every commit on a random index page: p99 post latency doubled once the
    database held ~150k envelopes). Still 80 random bits each, and within the column's 40."""
    engine = create_engine(database_url(db))
    org = "org_ids"
    system = Sender("system", "key_ids", org)

    async def run() -> list[str]:
        await upgrade_schema(engine)
        ids: list[str] = []
        async with Hub.open(engine, sweep_interval=None) as hub:
            for t in range(3):
                created = await hub.append(
                    f"thr_ids{t}",
                    type=EV_THREAD_CREATED,
                    data={"title": "t", "team_id": "team_x", "adapter": "open"},
                    sender=system,
                )
                ids.append(created.id)
                await anyio.sleep(0.002)
            for i in range(30):
                env = await hub.append(
                    f"thr_ids{i % 3}",
                    type=EV_MESSAGE,
                    data={"content": f"m{i}"},
                    sender=Sender("user", "usr_ids", org),
                )
                ids.append(env.id)
                await anyio.sleep(0.002)  # the next one is at least one millisecond later
        await engine.dispose()
        return ids

    ids = asyncio.run(run())
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("env_") and len(i) == 36 and len(i) <= 40 for i in ids)
    assert len({i[-20:] for i in ids}) == len(ids)  # the random part differs too
