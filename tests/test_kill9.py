"""kill -9 of the server, again and again, under load: nothing acknowledged is lost or doubled.

Real processes only: the server (``python -m agent_network serve``) on a free port over one
SQLite file or PostgreSQL database (``engine``: PostgreSQL keeps running while the server
process is killed), three poster processes (``tests/runner_helpers.py post``) that post with
idempotency keys and retry until acknowledged, and two remote runner processes answering with
claims. The server is SIGKILLed at seeded-random moments and restarted on the same database
until the posters are done (at least three times). Then: every acknowledged post is stored
exactly once (by id and by key) where it was acknowledged, every thread's seqs are 1..n, every
hash chain verifies, every post got exactly one reply per agent, and the runners survived.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent_network.services import create_admin_key
from agent_network.store.engine import create_engine, database_url, upgrade_schema
from conftest import TestDb, all_envelopes, free_port, settings_for, sql_rows

pytestmark = pytest.mark.engines("sqlite", "postgresql")

TESTS = Path(__file__).resolve().parent
SEED = 20251121
POSTERS = 3
POSTS_EACH = 20
UPTIME = (0.3, 1.2)
"""Seconds a server lives between kills (uniform in this range), on both engines."""
MIN_KILLS = 3
MAX_KILLS = 8


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **extra,
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
        "AGENT_NETWORK_RUN_ROUTINES": "false",
        "RUNNER_SLOW_SECONDS": "0.05",
    }


class ServerProc:
    """``python -m agent_network serve`` on a fixed port and database, restartable."""

    def __init__(self, tmp: Path, db: TestDb) -> None:
        self.db = db
        # a PostgreSQL database has no file for the secret key to sit beside
        self.env = _env(
            **{f"AGENT_NETWORK_{k.upper()}": str(v) for k, v in settings_for(db).items()}
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        args = [sys.executable, "-m", "agent_network", "serve", "--db", str(self.db)]
        args += ["--port", str(self.port), "--model", "test"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=self.env)
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes to clean up (SIGTERM, then SIGKILL) after the test."""
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for p in children:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in children:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


async def _bootstrap(db: TestDb) -> str:
    engine = create_engine(database_url(db))
    await upgrade_schema(engine)
    key = await create_admin_key(engine)
    await engine.dispose()
    return key


def _setup(url: str, admin_key: str) -> tuple[str, str, list[str], list[str]]:
    """An org with Ann, two agents answering only Ann, two threads: (org key, Ann's id, agent
    ids, thread ids)."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:

        def ok(method: str, path: str, key: str, **kw: Any) -> Any:
            r = http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)
            assert r.status_code < 300, r.text
            return r.json()

        key = ok("POST", "/orgs", admin_key, json={"name": "Acme"})["secret"]
        ann = ok("POST", "/users", key, json={"name": "Ann"})["id"]
        bots = []
        for name in ("Planner", "Checker"):
            bot = ok("POST", "/agents", key, json={"name": name, "lookup_key": name.lower()})
            ok("PUT", f"/agents/{bot['id']}/rule", key, json={"inbound_from": ["Ann"]})
            ok("POST", f"/agents/{bot['id']}/routines", key, json={"name": "participate"})
            bots.append(bot["id"])
        team = ok("POST", "/teams", key, json={"name": "T"})["id"]
        for kind, mid in [("user", ann)] + [("agent", b) for b in bots]:
            ok("POST", f"/teams/{team}/members", key, json={f"{kind}_id": mid})
        threads = [
            ok("POST", f"/teams/{team}/threads", key, json={"title": t, "agent_budget": 1000})["id"]
            for t in ("one", "two")
        ]
    return key, ann, bots, threads


def test_kill9_server_under_load_loses_and_doubles_nothing(
    tmp_path: Path, db: TestDb, procs: list[subprocess.Popen[bytes]]
) -> None:
    server = ServerProc(tmp_path, db)
    admin_key = anyio.run(_bootstrap, server.db)
    server.start()
    try:
        _run(server, admin_key, tmp_path, procs)
    finally:
        server.stop()


def _run(
    server: ServerProc,
    admin_key: str,
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    posts_each = POSTS_EACH
    uptime = UPTIME
    key, ann, bots, threads = _setup(server.url, admin_key)
    runner_args = ["--url", server.url, "--token", key, "--lease", "1.5", "--relist", "0.5"]
    runner_args += ["--poll-wait", "2", "--workers", "4", "--model", "slow"]
    runner_args += ["--import", "runner_helpers"]
    runners = []
    for rid in ("R1", "R2"):
        out = (tmp / f"{rid}.log").open("wb")
        runners.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent_network", "runner", "--runner-id", rid, *runner_args],
                stdout=out,
                stderr=out,
                env=_env(),
            )
        )
    procs.extend(runners)
    outs = [tmp / f"poster-{i}.jsonl" for i in range(POSTERS)]
    posters = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "runner_helpers.py"),
                "post",
                server.url,
                key,
                ",".join(threads),
                ann,
                f"p{i}",
                str(posts_each),
                str(outs[i]),
                str(SEED + i),
            ],
            env=_env(),
            stderr=(tmp / f"poster-{i}.err").open("wb"),
        )
        for i in range(POSTERS)
    ]
    procs.extend(posters)

    # SIGKILL the server at random moments until the posters are done (3 times at least)
    deadline = time.monotonic() + 60
    while not any(_lines(o) for o in outs):  # the posters are under way
        assert time.monotonic() < deadline, "no poster got going"
        time.sleep(0.05)
    rng = random.Random(SEED)
    acked_at_kill: list[int] = []
    while len(acked_at_kill) < MIN_KILLS or any(p.poll() is None for p in posters):
        assert len(acked_at_kill) < MAX_KILLS, "posters did not finish"
        time.sleep(rng.uniform(*uptime))
        server.kill9()
        acked_at_kill.append(sum(len(_lines(o)) for o in outs))
        server.start()
    for i, p in enumerate(posters):
        assert p.wait(timeout=60) == 0, (tmp / f"poster-{i}.err").read_text()
    print(f"\nkills: {len(acked_at_kill)}, acknowledged posts at each kill: {acked_at_kill}")
    assert acked_at_kill[0] < POSTERS * posts_each, "the first kill came after all posts"

    acked = [rec for o in outs for rec in _lines(o)]
    assert len(acked) == POSTERS * posts_each
    assert len({r["key"] for r in acked}) == len(acked)

    with httpx.Client(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:

        def replies() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for tid in threads:
                for m in all_envelopes(http, tid, messages_only=True):
                    if m["sender"]["kind"] == "agent":
                        out.setdefault(m["causation_id"], []).append(m)
            return out

        deadline = time.monotonic() + 60
        while True:
            got = replies()
            if all(len(got.get(r["id"], [])) >= len(bots) for r in acked):
                break
            assert time.monotonic() < deadline, "not every acknowledged post was answered"
            time.sleep(0.2)
        time.sleep(1.0)  # let any (wrong) late duplicate land before counting

        by_id: dict[str, dict[str, Any]] = {}
        for tid in threads:
            envs = all_envelopes(http, tid)
            assert [e["seq"] for e in envs] == list(range(1, len(envs) + 1)), tid
            assert len({e["id"] for e in envs}) == len(envs)
            report = http.get(f"/threads/{tid}/verify").json()
            assert report["ok"] is True and report["checked"] == len(envs), report
            by_id.update({e["id"]: e for e in envs})
        ann_posts = [e for e in by_id.values() if e["sender"]["id"] == ann]
        keys = Counter(e["idempotency_key"] for e in ann_posts)
        # every acknowledged post: stored once, where and as it was acknowledged
        for rec in acked:
            env = by_id.get(rec["id"])
            assert env is not None, f"acknowledged post lost: {rec}"
            assert (env["thread_id"], env["seq"], env["content"]) == (
                rec["thread_id"],
                rec["seq"],
                rec["content"],
            )
            assert env["idempotency_key"] == rec["key"]
            assert keys[rec["key"]] == 1, f"post stored {keys[rec['key']]} times: {rec}"
        assert len(ann_posts) == len(acked), "a post was stored that no poster sent"
        # every post: exactly one reply per agent; agents answered nothing else
        got = replies()
        assert set(got) == {r["id"] for r in acked}
        for rec in acked:
            senders = Counter(m["sender"]["id"] for m in got[rec["id"]])
            assert senders == Counter(dict.fromkeys(bots, 1)), (rec, senders)
            for m in got[rec["id"]]:
                assert m["idempotency_key"] == f"reply:{m['sender']['id']}:{rec['id']}"
    # every claim ends done: work of runners cut off by a kill was taken over and finished
    deadline = time.monotonic() + 30
    while True:
        open_claims = sql_rows(server.db, "SELECT * FROM runner_claims WHERE NOT done")
        if not open_claims:
            break
        assert time.monotonic() < deadline, f"claims never completed: {open_claims}"
        time.sleep(0.1)
    for r in runners:
        assert r.poll() is None, "a runner died with the server"


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]  # a line still being written has no "\n" yet
    return [json.loads(line) for line in complete if line.strip()]
