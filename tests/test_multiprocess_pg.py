"""Three server processes (``agent-network serve``) on one PostgreSQL database.

Posters spread over all three servers post concurrently into the same threads (with idempotency
keys, retrying on another server when one does not answer, as a load balancer would); WebSocket
subscribers on every server follow the threads; each server runs its in-process runner and an
agent answers every post of Ann. Then: every acknowledged envelope is stored exactly once where
it was acknowledged, each thread's seqs are 1..n, every chain verifies on every server, every
subscriber saw every envelope of its threads once and in seq order, and every post got exactly
one reply. The second test SIGKILLs one server mid-load and starts it again.
"""

from __future__ import annotations

import json
import os
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
from websockets.asyncio.client import connect

from agent_network.services import create_admin_key
from agent_network.store.engine import create_engine, database_url
from conftest import free_port

TESTS = Path(__file__).resolve().parent
POSTERS = 6
POSTS_EACH = 10
WAIT = 60  # seconds a phase may take before the test is declared hung (not a timing assertion)


class Server:
    """``python -m agent_network serve`` on one PostgreSQL database and a fixed port."""

    def __init__(self, db: str, tmp: Path, name: str) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more options of ``serve``

    def start(self) -> None:
        args = [sys.executable, "-m", "agent_network", "serve", "--db", self.db]
        args += ["--port", str(self.port), "--model", "test", "--log-level", "warning"]
        args += self.extra
        env = {**os.environ, "AGENT_NETWORK_CLAIM_LEASE": "2"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)

    def wait_up(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server did not come up: {self.log.read_text()}")

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
def servers(pg_db: str, tmp_path: Path) -> Iterator[tuple[list[Server], str]]:
    """Three started servers on ``pg_db`` and the platform admin key."""

    async def bootstrap() -> str:
        engine = create_engine(database_url(pg_db))
        try:
            return await create_admin_key(engine)
        finally:
            await engine.dispose()

    admin_key = anyio.run(bootstrap)
    srvs = [Server(pg_db, tmp_path, f"server{i}") for i in range(3)]
    try:
        for s in srvs:
            s.start()
        for s in srvs:
            s.wait_up()
        yield srvs, admin_key
    finally:
        for s in srvs:
            s.stop()


def setup_org(url: str, admin_key: str) -> tuple[str, str, str, list[str]]:
    """An org with Ann and one agent answering Ann (participate routine on the test model), two
    threads: (org key, Ann's id, the agent's id, thread ids)."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:

        def ok(method: str, path: str, key: str, **kw: Any) -> Any:
            r = http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)
            assert r.status_code < 300, r.text
            return r.json()

        body = ok("POST", "/orgs", admin_key, json={"name": "Acme"})
        key = body.get("secret") or body["key"]
        ann = ok("POST", "/users", key, json={"name": "Ann"})["id"]
        bot = ok("POST", "/agents", key, json={"name": "Helper", "lookup_key": "helper"})["id"]
        ok("PUT", f"/agents/{bot}/rule", key, json={"inbound_from": ["Ann"]})
        ok("POST", f"/agents/{bot}/routines", key, json={"name": "participate"})
        team = ok("POST", "/teams", key, json={"name": "T"})["id"]
        for kind, mid in (("user", ann), ("agent", bot)):
            ok("POST", f"/teams/{team}/members", key, json={f"{kind}_id": mid})
        threads = [
            ok("POST", f"/teams/{team}/threads", key, json={"title": t, "agent_budget": 1000})["id"]
            for t in ("one", "two")
        ]
    return key, ann, bot, threads


class Subscriber:
    """A WebSocket connection to one server following ``threads`` from seq 0: every envelope
    frame, by thread, in arrival order."""

    def __init__(self, url: str, key: str, threads: list[str]) -> None:
        self.url = url.replace("http://", "ws://") + "/api/v1/ws"
        self.key = key
        self.threads = threads
        self.got: dict[str, list[dict[str, Any]]] = {t: [] for t in threads}

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with connect(self.url, additional_headers=headers) as ws:
            for n, tid in enumerate(self.threads):
                await ws.send(json.dumps({"type": "join", "thread_id": tid, "ref": f"j{n}"}))
            joined = 0
            started = False
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "joined":
                    joined += 1
                    if joined == len(self.threads) and not started:
                        started = True
                        task_status.started()
                elif frame["type"] == "envelope":
                    self.got[frame["thread_id"]].append(frame["envelope"])
                elif frame["type"] == "ping":  # a sign of life, or the server closes as idle
                    await ws.send(json.dumps({"type": "pong", "ref": frame.get("ref")}))
                elif frame["type"] not in ("welcome", "ping", "pong", "cursor", "typing"):
                    raise AssertionError(f"unexpected frame {frame}")


async def post_all(
    urls: list[str],
    key: str,
    ann: str,
    threads: list[str],
    poster: int,
    acked: list[dict[str, Any]],
    progress: list[anyio.Event],
) -> None:
    """Post ``POSTS_EACH`` messages as Ann, round robin over threads and servers, each with an
    idempotency key; on a transport error or a 5xx the same post goes to the next server.
    Appends each acknowledged post to ``acked`` and sets ``progress[0]``."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=10, headers=headers) as http:
        for n in range(POSTS_EACH):
            tid = threads[(poster + n) % len(threads)]
            body = {
                "content": f"p{poster}-{n}",
                "user_id": ann,
                "idempotency_key": f"p{poster}-{n}",
            }
            attempt = poster + n
            deadline = time.monotonic() + WAIT
            while True:
                url = urls[attempt % len(urls)]
                attempt += 1
                assert time.monotonic() < deadline, f"post {body} never acknowledged"
                try:
                    r = await http.post(f"{url}/api/v1/threads/{tid}/messages", json=body)
                except httpx.TransportError:
                    await anyio.sleep(0.05)
                    continue
                if r.status_code >= 500:
                    await anyio.sleep(0.05)
                    continue
                assert r.status_code == 201, r.text
                env = r.json()
                acked.append({**body, "id": env["id"], "seq": env["seq"], "thread_id": tid})
                progress[0].set()
                break
            await anyio.sleep(0.01)


def all_envelopes(url: str, key: str, tid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:
        while True:
            r = http.get(
                f"/threads/{tid}/envelopes",
                params={"after": after, "limit": 1000},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            out.extend(body["items"])
            if body["next_after"] == after:
                return out
            after = body["next_after"]


def check(
    urls: list[str],
    key: str,
    bot: str,
    threads: list[str],
    acked: list[dict[str, Any]],
    subscribers: list[Subscriber],
) -> None:
    """The assertions shared by both tests (module docstring)."""
    assert len(acked) == POSTERS * POSTS_EACH
    # every post gets its reply (the runners of all three servers share the triggers)
    deadline = time.monotonic() + WAIT
    while True:
        stored = {tid: all_envelopes(urls[0], key, tid) for tid in threads}
        replies = Counter(
            e["causation_id"]
            for envs in stored.values()
            for e in envs
            if e["sender"]["kind"] == "agent"
        )
        if all(replies[a["id"]] >= 1 for a in acked):
            break
        assert time.monotonic() < deadline, "not every acknowledged post was answered"
        time.sleep(0.2)
    time.sleep(1.0)  # let a (wrong) late duplicate reply land before counting
    stored = {tid: all_envelopes(urls[0], key, tid) for tid in threads}
    by_id = {e["id"]: e for envs in stored.values() for e in envs}
    for tid, envs in stored.items():
        assert [e["seq"] for e in envs] == list(range(1, len(envs) + 1)), tid
        assert len({e["id"] for e in envs}) == len(envs)
        for url in urls:
            with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as http:
                r = http.get(f"/threads/{tid}/verify", headers={"Authorization": f"Bearer {key}"})
                report = r.json()
            assert report["ok"] is True and report["checked"] >= len(envs), report
    keys = Counter(e["idempotency_key"] for e in by_id.values() if e["sender"]["kind"] == "user")
    for a in acked:  # stored once, where and as acknowledged
        env = by_id[a["id"]]
        assert (env["thread_id"], env["seq"], env["content"]) == (
            a["thread_id"],
            a["seq"],
            a["content"],
        )
        assert keys[a["idempotency_key"]] == 1, a
    assert sum(keys.values()) == len(acked), "a post was stored that no poster sent"
    replies = Counter(e["causation_id"] for e in by_id.values() if e["sender"]["kind"] == "agent")
    assert set(replies) == {a["id"] for a in acked}
    assert set(replies.values()) == {1}, "a post got more than one reply"
    assert all(e["sender"]["id"] == bot for e in by_id.values() if e["sender"]["kind"] == "agent")
    # every subscriber saw every envelope of every thread once, in seq order
    deadline = time.monotonic() + WAIT
    for sub in subscribers:
        for tid, envs in stored.items():
            while len(sub.got[tid]) < len(envs) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [e["seq"] for e in sub.got[tid]] == [e["seq"] for e in envs], (sub.url, tid)
            assert [e["hash"] for e in sub.got[tid]] == [e["hash"] for e in envs]


def run_load(
    srvs: list[Server], admin_key: str, *, kill: Server | None = None
) -> tuple[str, str, list[str], list[dict[str, Any]], list[Subscriber]]:
    key, ann, bot, threads = setup_org(srvs[0].url, admin_key)
    urls = [s.url for s in srvs]
    watched = [s for s in srvs if s is not kill]
    subscribers = [Subscriber(s.url, key, threads) for s in watched]
    acked: list[dict[str, Any]] = []
    killed_at: list[int] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for sub in subscribers:
                await tg.start(sub.run)

            progress = [anyio.Event()]

            async def poster(i: int) -> None:
                await post_all(urls, key, ann, threads, i, acked, progress)

            async def killer() -> None:
                assert kill is not None
                while len(acked) < POSTERS * POSTS_EACH // 4:
                    await progress[0].wait()
                    progress[0] = anyio.Event()
                killed_at.append(len(acked))
                await anyio.to_thread.run_sync(kill.kill9)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(kill.start)
                await anyio.to_thread.run_sync(kill.wait_up)

            async with anyio.create_task_group() as posters:
                for i in range(POSTERS):
                    posters.start_soon(poster, i)
                if kill is not None:
                    posters.start_soon(killer)
                await anyio.sleep(0.1)
            # subscribers keep reading while the checks run in a worker thread
            await anyio.to_thread.run_sync(
                lambda: check(urls, key, bot, threads, acked, subscribers)
            )
            tg.cancel_scope.cancel()

    anyio.run(main)
    if kill is not None:
        assert killed_at and killed_at[0] < POSTERS * POSTS_EACH, "the kill came after the load"
    return key, ann, threads, acked, subscribers


def test_three_servers_share_one_database(servers: tuple[list[Server], str]) -> None:
    srvs, admin_key = servers
    run_load(srvs, admin_key)


def test_a_server_killed_mid_load_loses_and_doubles_nothing(
    servers: tuple[list[Server], str],
) -> None:
    srvs, admin_key = servers
    run_load(srvs, admin_key, kill=srvs[2])
    assert srvs[2].proc is not None and srvs[2].proc.poll() is None  # it runs again


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(entry.name), (entry / "cmdline").read_text().replace("\0", " ")))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_serve_workers_runs_n_processes_on_one_port(pg_db: str, tmp_path: Path) -> None:
    server = Server(pg_db, tmp_path, "workers")
    server.extra = ["--workers", "2"]
    server.start()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        server.wait_up()
        deadline = time.monotonic() + WAIT
        while len(workers := [p for p, c in _children(pid) if "spawn_main" in c]) < 2:
            assert time.monotonic() < deadline, _children(pid)
            time.sleep(0.1)
        admin_key = server.log.read_text().split("keep it): ", 1)[1].split()[0]
        key, ann, _bot, threads = setup_org(server.url, admin_key)
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as http:
            for n in range(10):  # new connections: the kernel spreads them over both workers
                r = http.post(
                    f"/threads/{threads[0]}/messages",
                    json={"content": f"m{n}", "user_id": ann},
                    headers={"Authorization": f"Bearer {key}", "Connection": "close"},
                )
                assert r.status_code == 201, r.text
        envs = all_envelopes(server.url, key, threads[0])
        assert [e["seq"] for e in envs] == list(range(1, len(envs) + 1))
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.log.read_text()
    for worker in workers:  # every worker stopped with the parent
        assert not Path(f"/proc/{worker}").exists() or "Z" in _state(worker)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_serve_workers_on_sqlite_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "an.db"
    args = [sys.executable, "-m", "agent_network", "serve", "--db", str(db), "--workers", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "PostgreSQL" in done.stderr + done.stdout
    assert not db.exists()  # refused before anything was written
