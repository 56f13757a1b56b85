"""Revocation ends access at once (issue 13, point 0).

Real server, real sockets, real concurrency: long-polls pending while a visa, a membership or a
credential is revoked; posts racing a revocation from another thread; a WebSocket joined to the
thread. Once the revocation is acknowledged, nothing posted afterwards reaches the revoked
principal, and no write of theirs commits after it.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo
from websockets.sync.client import connect

from conftest import (
    LiveServer,
    Org,
    TestDb,
    function_model,
    is_postgres,
    settle,
    sql_rows,
    sync_url,
)

pytestmark = pytest.mark.engines("sqlite", "postgresql")


class _WriteLock:
    """Holds the database's write path from a test connection until :meth:`release`: SQLite's
    write lock (``BEGIN IMMEDIATE``), or on PostgreSQL an EXCLUSIVE lock on the tables every hub
    commit writes (``envelopes``, ``audit_log``; reads go on)."""

    def __init__(self, db: TestDb) -> None:
        import sqlalchemy

        self._engine = sqlalchemy.create_engine(sync_url(db), poolclass=sqlalchemy.pool.NullPool)
        self._conn = self._engine.connect()
        if is_postgres(db):
            self._conn.exec_driver_sql("BEGIN")
            self._conn.exec_driver_sql("LOCK TABLE envelopes, audit_log IN EXCLUSIVE MODE")
        else:
            self._conn.exec_driver_sql("BEGIN IMMEDIATE")

    def release(self) -> None:
        try:
            self._conn.exec_driver_sql("ROLLBACK")
        finally:
            self._conn.close()
            self._engine.dispose()


class Shared:
    """Host (with Hank) hosts a network thread; SubVendor joined with its user Sue and agent
    Bot, each with its own token."""

    def __init__(self, make_org: Callable[[str], Org], server: LiveServer) -> None:
        self.server = server
        self.host, self.sub = make_org("Host"), make_org("SubVendor")
        self.hank = self.host.user("Hank")
        self.sue = self.sub.user("Sue")
        self.bot = self.sub.agent("Bot", "bot")
        self.net = self.host.ok("POST", "/networks", json={"name": "Net"})
        nid = self.net["id"]
        self.host.ok("POST", f"/networks/{nid}/members", json={"user_id": self.hank["id"]})
        code = self.host.ok("POST", f"/networks/{nid}/invites", json={})["join_code"]
        joined = self.sub.ok(
            "POST",
            "/networks/join",
            json={"code": code, "user_ids": [self.sue["id"]], "agent_ids": [self.bot["id"]]},
        )
        self.visa = joined["visa_id"]
        self.thread = self.host.ok("POST", f"/networks/{nid}/threads", json={"title": "T"})["id"]
        self.tokens = {
            "user": self._token("user_token", self.sue["id"]),
            "agent": self._token("agent_token", self.bot["id"]),
            "org": self.sub.key,
        }

    def _token(self, kind: str, subject: str) -> dict[str, Any]:
        return dict(self.sub.ok("POST", "/credentials", json={"kind": kind, "subject_id": subject}))

    def secret(self, who: str) -> str:
        token = self.tokens[who]
        return token if isinstance(token, str) else str(token["secret"])

    def client(self, who: str) -> httpx.Client:
        return self.server.client(self.secret(who))

    def host_post(self, text: str) -> dict[str, Any]:
        body = {"content": text, "user_id": self.hank["id"]}
        return dict(self.host.ok("POST", f"/threads/{self.thread}/messages", json=body))

    def last_seq(self) -> int:
        return int(self.host.ok("GET", f"/threads/{self.thread}")["last_seq"])

    def revoke_visa(self) -> None:
        r = self.host.http.delete(f"/networks/{self.net['id']}/visas/{self.visa}")
        assert r.status_code == 204, r.text


REVOCATIONS: dict[str, Callable[[Shared, str], int]] = {}


def revocation(name: str) -> Callable[[Callable[[Shared, str], int]], Callable[[Shared, str], int]]:
    def register(fn: Callable[[Shared, str], int]) -> Callable[[Shared, str], int]:
        REVOCATIONS[name] = fn
        return fn

    return register


@revocation("visa")
def _visa(s: Shared, who: str) -> int:
    s.revoke_visa()
    return 404


@revocation("credential")
def _credential(s: Shared, who: str) -> int:
    token = s.tokens[who]
    if isinstance(token, str):  # the org key: revoke it through a second org key
        second = s.sub.ok("POST", "/credentials", json={"kind": "org_key"})
        creds = s.sub.ok("GET", "/credentials")
        new_id = second["credential"]["id"]
        (first,) = [c for c in creds if c["kind"] == "org_key" and c["id"] != new_id]
        r = s.server.client(second["secret"]).delete(f"/credentials/{first['id']}")
    else:
        r = s.sub.http.delete(f"/credentials/{token['credential']['id']}")
    assert r.status_code in (200, 204), r.text
    return 401


@revocation("member")
def _member(s: Shared, who: str) -> int:
    subject = {"user": s.sue, "agent": s.bot}[who]
    r = s.sub.http.delete(f"/networks/{s.net['id']}/members/{who}/{subject['id']}")
    assert r.status_code == 204, r.text
    return 404


@revocation("deleted")
def _deleted(s: Shared, who: str) -> int:
    if who == "user":
        r = s.sub.http.delete(f"/users/{s.sue['id']}")
    else:
        r = s.sub.http.delete(f"/agents/{s.bot['id']}")
    assert r.status_code == 204, r.text
    return 404  # out of the network first; a new request: 401 (the token's subject is gone)


CASES = [
    ("visa", "user", "messages"),
    ("visa", "agent", "envelopes"),
    ("visa", "org", "messages"),
    ("credential", "user", "messages"),
    ("credential", "agent", "envelopes"),
    ("credential", "org", "messages"),
    ("member", "user", "messages"),
    ("deleted", "user", "messages"),
    ("deleted", "agent", "envelopes"),
]


@pytest.mark.parametrize(("how", "who", "endpoint"), CASES)
def test_a_pending_long_poll_ends_with_the_revocation(
    server: LiveServer, make_org: Callable[[str], Org], how: str, who: str, endpoint: str
) -> None:
    s = Shared(make_org, server)
    after = s.last_seq()
    with s.client(who) as reader, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            reader.get,
            f"/threads/{s.thread}/{endpoint}",
            params={"after": after, "wait": 20},
            timeout=60,
        )
        time.sleep(0.5)  # the request is waiting
        assert not pending.done()
        expected = REVOCATIONS[how](s, who)
        time.sleep(0.3)
        secret = s.host_post("after the revocation")
        r = pending.result(timeout=30)
        assert r.status_code == expected, r.text
        assert "after the revocation" not in r.text and secret["id"] not in r.text
        # and a fresh read agrees
        fresh = 401 if how == "deleted" else expected
        assert reader.get(f"/threads/{s.thread}/{endpoint}").status_code == fresh


@pytest.mark.parametrize("seed", range(3))
def test_no_write_commits_after_the_revocation_is_acknowledged(
    server: LiveServer, make_org: Callable[[str], Org], seed: int
) -> None:
    """SubVendor's agent token posts in a loop (six threads) while the host revokes the visa
    after a random delay; every SubVendor envelope must have a seq at most the thread's
    last_seq read right after the DELETE answered."""
    rng = random.Random(seed)
    s = Shared(make_org, server)
    stop = threading.Event()
    statuses: list[int] = []

    def post_loop(n: int) -> None:
        with s.client("agent") as bot:
            i = 0
            while not stop.is_set():
                r = bot.post(f"/threads/{s.thread}/messages", json={"content": f"p{n}-{i}"})
                statuses.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=post_loop, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        # the loops are under way first (a first post on a loaded machine, or on PostgreSQL,
        # can take longer than the delay below)
        deadline = time.monotonic() + 30
        while 201 not in statuses and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2 + rng.random() * 0.5)
        s.revoke_visa()
        acked_seq = s.last_seq()
        time.sleep(0.3 + rng.random() * 0.3)  # the loops go on against the revoked visa
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    page = s.host.ok("GET", f"/threads/{s.thread}/messages", params={"limit": 1000})
    theirs = [m for m in page["items"] if m["sender"]["id"] == s.bot["id"]]
    assert theirs, "the loop posted nothing before the revocation"
    late = [m["seq"] for m in theirs if m["seq"] > acked_seq]
    assert late == [], f"SubVendor posts committed after the revocation: {late}"
    assert 201 in statuses and statuses[-1] == 404


def test_a_websocket_gets_nothing_posted_after_the_revocation(
    server: LiveServer, make_org: Callable[[str], Org]
) -> None:
    s = Shared(make_org, server)
    url = server.url.replace("http://", "ws://") + "/api/v1/ws"
    headers = {"Authorization": f"Bearer {s.secret('user')}"}
    with connect(url, additional_headers=headers) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"type": "join", "thread_id": s.thread, "after": s.last_seq()}))
        assert json.loads(ws.recv(timeout=10))["type"] == "joined"
        before = s.host_post("before")
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "envelope" and frame["envelope"]["id"] == before["id"]
        s.revoke_visa()
        after = s.host_post("after the revocation")
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                seen.append(json.loads(ws.recv(timeout=0.5)))
            except TimeoutError:
                continue
            except Exception:
                break  # the server may close the socket
        assert all(f.get("envelope", {}).get("id") != after["id"] for f in seen), seen
        assert "after the revocation" not in json.dumps(seen)


@pytest.mark.parametrize("round_", range(6))
def test_a_post_queued_behind_the_write_lock_never_commits_after_the_revocation(
    server: LiveServer, make_org: Callable[[str], Org], round_: int
) -> None:
    """The race made deterministic: a test connection holds the write lock (``_WriteLock``), so
    SubVendor's post (its checks passed) waits in the hub while the host's visa DELETE waits for
    the lock too; then the lock is released and either may write first. When the DELETE is
    acknowledged, a post that was accepted is already in the database. On SQLite, whose writers
    commit one at a time, SubVendor's own audit log orders the two as well: the accepted
    ``envelope.message`` must never come after ``network.visa_revoke``. Before the hub ordered
    revocations, the post committed after the revocation in most rounds. (On PostgreSQL the
    audit ids come from a sequence at insert time, not in commit order, so only the first
    check applies.)"""
    s = Shared(make_org, server)
    with s.client("agent") as bot:
        warm = bot.post(f"/threads/{s.thread}/messages", json={"content": "warm"})
        assert warm.status_code == 201  # the post's checks are cached: no read blocks below

        def revoke() -> tuple[int, int]:
            """The DELETE's status and how many of the bot's envelopes came after "warm" when
            the DELETE was acknowledged."""
            status = s.host.http.delete(f"/networks/{s.net['id']}/visas/{s.visa}").status_code
            [(n,)] = sql_rows(
                server.db,
                "SELECT count(*) FROM envelopes WHERE thread_id = :t AND seq > :seq",
                t=s.thread,
                seq=warm.json()["seq"],
            )
            return status, int(n)

        lock = _WriteLock(server.db)
        with ThreadPoolExecutor(2) as pool:
            try:
                posted = pool.submit(
                    bot.post, f"/threads/{s.thread}/messages", json={"content": "racing"}
                )
                # checked, queued; the committer waits for the lock, and SQLite's busy handler
                # backs off to 100 ms sleeps: the revocation, which starts waiting later with
                # short sleeps, usually takes the lock first once it is released
                time.sleep(1.0)
                revoked = pool.submit(revoke)
                time.sleep(0.1)  # the revocation waits for the lock too
            finally:
                lock.release()
            status, stored_at_ack = revoked.result(timeout=30)
            assert status == 204
            post = posted.result(timeout=30)
    assert post.status_code in (201, 404), post.text
    assert stored_at_ack == (1 if post.status_code == 201 else 0)
    if is_postgres(server.db):
        return
    log = s.sub.ok("GET", "/audit", params={"limit": 1000})
    order = [
        a["action"]
        for a in log
        if a["action"] == "network.visa_revoke"
        or (a["action"] == "envelope.message" and a["outcome"] == "accepted")
    ]
    assert "network.visa_revoke" in order
    after = order[order.index("network.visa_revoke") + 1 :]
    assert "envelope.message" not in after, f"a post committed after the revocation ({order})"
    if post.status_code == 201:
        assert order.count("envelope.message") == 2  # "warm", then "racing" before the revoke


def test_the_runner_shows_nothing_posted_after_the_revocation_to_the_revoked_agent(
    server: LiveServer, make_org: Callable[[str], Org]
) -> None:
    """SubVendor's agent answers in the shared thread through the in-process runner; after its
    visa is revoked, a message the host posts reaches neither its model nor the thread."""
    seen: list[str] = []

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append("\n".join(str(getattr(p, "content", "")) for m in messages for p in m.parts))
        return ModelResponse(parts=[TextPart("Noted.")])

    s = Shared(make_org, server)
    name = function_model("revoked", model)
    s.sub.ok("PATCH", f"/agents/{s.bot['id']}", json={"model": name})
    s.sub.ok("POST", f"/agents/{s.bot['id']}/routines", json={"name": "participate"})
    s.host_post("before the revocation")
    settle(server, s.host.http, s.thread)
    assert any("before the revocation" in text for text in seen)
    s.revoke_visa()
    after = s.host_post("after the revocation")
    settle(server, s.host.http, s.thread)
    server.wait_runner_idle()
    assert not any("after the revocation" in text for text in seen)
    page = s.host.ok("GET", f"/threads/{s.thread}/messages", params={"limit": 1000})
    assert not [
        m for m in page["items"] if m["sender"]["id"] == s.bot["id"] and m["seq"] > after["seq"]
    ]
