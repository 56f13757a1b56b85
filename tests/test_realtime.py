"""The WebSocket endpoint /api/v1/ws (docs/protocol.md) against a real uvicorn on 127.0.0.1.

Clients are the ``websockets`` library's sync client (not the SDK), servers are the LiveServer of
conftest.py over a real SQLite file or PostgreSQL database (``engine``); REST calls go through
httpx.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from agent_network.api import create_app
from agent_network.api.realtime import Connection, Follow, RealtimeProtocol
from agent_network.api.server import GracefulServer
from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.events import EV_MESSAGE, EV_THREAD_CREATED
from agent_network.services import ServiceContext, Services
from agent_network.services.principal import Principal
from agent_network.services.scope import audience_admits
from agent_network.store.engine import create_engine, database_url, upgrade_schema
from conftest import (
    LiveServer,
    Org,
    TestDb,
    all_envelopes,
    assert_error,
    open_network,
    settings_for,
    sqlite_only,
)

pytestmark = pytest.mark.engines("sqlite", "postgresql")

_TRANSPORT = (
    "WebSocket transport (outbox, heartbeat, shutdown, expiry timer) on a server of its own: no "
    "database-specific path"
)

TIMEOUT = 20.0  # seconds any single expected frame may take (generous for a loaded CI box)


# ----------------------------------------------------------------------------- client helper


class WS:
    """A sync WebSocket client speaking protocol v1, with a few expectations built in."""

    def __init__(
        self, srv: LiveServer, key: str | None, *, authorization: str | None = None, **kw: Any
    ) -> None:
        """Connect with ``Authorization: Bearer <key>`` (no header if ``key`` is None), or with
        the raw ``authorization`` header value."""
        if authorization is None and key is not None:
            authorization = f"Bearer {key}"
        headers = {"Authorization": authorization} if authorization is not None else None
        url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
        self._stack = contextlib.ExitStack()
        self.conn: ClientConnection = self._stack.enter_context(
            connect(url, additional_headers=headers, **kw)
        )
        self.refs = itertools.count(1)

    def __enter__(self) -> WS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def send(self, **frame: Any) -> str:
        ref = frame.setdefault("ref", f"r{next(self.refs)}")
        self.conn.send(json.dumps(frame))
        return str(ref)

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame other than a server ping."""
        while True:
            frame = json.loads(self.conn.recv(timeout=timeout))
            assert isinstance(frame, dict)
            if frame["type"] != "ping":
                return frame

    def expect(self, type_: str, ref: str | None = None) -> dict[str, Any]:
        frame = self.recv()
        assert frame["type"] == type_, frame
        if ref is not None:
            assert frame["ref"] == ref, frame
        return frame

    def welcome(self) -> dict[str, Any]:
        return self.expect("welcome")

    def join(self, thread_id: str, **kw: Any) -> dict[str, Any]:
        return self.expect("joined", self.send(type="join", thread_id=thread_id, **kw))

    def envelopes(self, thread_id: str, until_seq: int) -> list[dict[str, Any]]:
        """Envelope frames of ``thread_id`` up to and including seq ``until_seq``."""
        out: list[dict[str, Any]] = []
        while not out or out[-1]["seq"] < until_seq:
            frame = self.recv()
            assert frame["type"] == "envelope", frame
            assert frame["thread_id"] == thread_id
            out.append(frame["envelope"])
        return out

    def quiet(self) -> None:
        """Assert nothing but the reply to a ping arrives now (a round trip flushes the pipe)."""
        ref = self.send(type="ping")
        self.expect("pong", ref)

    def closed_with(self) -> tuple[list[dict[str, Any]], int | None]:
        """Read until the server closes: (frames received, close code)."""
        frames = []
        try:
            while True:
                frames.append(json.loads(self.conn.recv(timeout=TIMEOUT)))
        except ConnectionClosed as exc:
            return frames, exc.rcvd.code if exc.rcvd is not None else None


def seqs(envs: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in envs]


def last_seq(org: Org, thread_id: str) -> int:
    return int(org.ok("GET", f"/threads/{thread_id}")["last_seq"])


def post(org: Org, thread_id: str, content: str, **sender: str) -> dict[str, Any]:
    return dict(
        org.ok("POST", f"/threads/{thread_id}/messages", json={"content": content, **sender})
    )


class Setup:
    """An org with a user in a team, a thread in it, and a user token for that user."""

    def __init__(self, srv: LiveServer, name: str) -> None:
        self.srv = srv
        self.org = Org(srv, name)
        self.user = self.org.user(f"{name} user")
        self.team = self.org.team(f"{name} team", ("user", self.user["id"]))
        self.thread = self.new_thread()
        token = self.org.ok(
            "POST", "/credentials", json={"kind": "user_token", "subject_id": self.user["id"]}
        )
        self.token: str = token["secret"]

    def new_thread(self) -> str:
        t = self.org.ok("POST", f"/teams/{self.team['id']}/threads", json={"title": "rt"})
        return str(t["id"])

    def post(self, content: str, thread_id: str | None = None) -> dict[str, Any]:
        return post(self.org, thread_id or self.thread, content, user_id=self.user["id"])

    def ws(self, key: str | None = None, **kw: Any) -> WS:
        return WS(self.srv, key or self.org.key, **kw)


_names = itertools.count(1)


@pytest.fixture
def acme(module_server: LiveServer) -> Iterator[Setup]:
    s = Setup(module_server, f"Acme{next(_names)}")
    yield s
    s.org.http.close()


# ----------------------------------------------------------------------------- auth


def test_auth_by_header_and_by_first_frame(module_server: LiveServer, acme: Setup) -> None:
    with acme.ws() as ws:
        welcome = ws.welcome()
        assert welcome["protocol"] == 1
        assert welcome["principal"] == {
            "kind": "org",
            "org_id": acme.org.id,
            "subject_id": acme.org.id,
        }
        assert welcome["heartbeat"] == 20.0
    with WS(module_server, None) as ws:
        ws.conn.send(json.dumps({"type": "auth", "token": acme.token}))
        assert ws.welcome()["principal"] == {
            "kind": "user",
            "org_id": acme.org.id,
            "subject_id": acme.user["id"],
        }
        ws.join(acme.thread)  # and it works


@pytest.mark.parametrize("how", ["header", "frame", "other_first_frame", "other_scheme"])
def test_wrong_credential_is_closed_with_4401(module_server: LiveServer, how: str) -> None:
    bad = "an_org_" + "x" * 43
    if how == "header":
        ws = WS(module_server, bad)
    elif how == "other_scheme":
        ws = WS(module_server, None, authorization=f"Basic {bad}")
    else:
        ws = WS(module_server, None)
        first = {"type": "auth", "token": bad} if how == "frame" else {"type": "join"}
        ws.conn.send(json.dumps(first))
    with ws:
        frames, code = ws.closed_with()
    assert code == 4401
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["error"]["code"] == "unauthenticated"
    assert frames[0]["error"]["message"]


# ----------------------------------------------------------------------------- join / replay / live


def test_replay_then_live_has_no_gap_and_no_duplicate_under_a_post_storm(
    module_server: LiveServer, acme: Setup
) -> None:
    for i in range(5):
        acme.post(f"before {i}")
    per_poster, posters = 40, 3
    joined: list[tuple[int, WS]] = []
    errors: list[BaseException] = []

    def poster(n: int) -> None:
        try:
            with module_server.client(acme.org.key) as http:
                for i in range(per_poster):
                    r = http.post(
                        f"/threads/{acme.thread}/messages",
                        json={"content": f"p{n}-{i}", "user_id": acme.user["id"]},
                    )
                    assert r.status_code == 201, r.text
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=poster, args=(n,)) for n in range(posters)]
    for t in threads:
        t.start()
    try:
        # join mid-stream, from several positions, while the posters keep going
        for after in (0, 3, None, 6, None):
            now = last_seq(acme.org, acme.thread)
            start = now if after is None else after
            ws = acme.ws()
            ws.welcome()
            assert ws.join(acme.thread, after=start)["after"] == start
            joined.append((start, ws))
            time.sleep(0.05)
    finally:
        for t in threads:
            t.join()
    assert not errors, errors
    final = last_seq(acme.org, acme.thread)
    assert final == 1 + 5 + posters * per_poster
    rest = {e["seq"]: e for e in all_envelopes(acme.org.http, acme.thread)}
    for start, ws in joined:
        with ws:
            got = ws.envelopes(acme.thread, final)
            assert seqs(got) == list(range(start + 1, final + 1))
            # the same JSON shape as the REST envelope items, byte for byte
            assert got == [rest[s] for s in seqs(got)]
            ws.quiet()


def pipeline_posts(ws: WS, thread_id: str, user_ids: list[str], n: int, tag: str) -> None:
    """Send ``n`` post frames (senders taken in turn from ``user_ids``) without waiting, then
    wait for every ``posted`` reply."""
    refs = {
        ws.send(
            type="post",
            thread_id=thread_id,
            content=f"{tag} {i}",
            user_id=user_ids[i % len(user_ids)],
        )
        for i in range(n)
    }
    while refs:
        frame = ws.recv()
        assert frame["type"] == "posted", frame
        refs.remove(frame["ref"])


def test_joins_racing_a_pipelined_storm_read_exactly_after_plus_one_to_last(
    acme: Setup,
) -> None:
    """Readers join a long thread from several positions while a WS poster pipelines posts
    into it and read concurrently, so replay pages, kept-aside live frames and the switch to
    live all interleave with commits."""
    history, storm = 600, 400
    final = 1 + history + storm
    # senders whose first message comes during the storm: the fan-out looks their names up
    fresh = [acme.org.user(f"storm {i}")["id"] for i in range(4)]
    for user_id in fresh:
        acme.org.ok("POST", f"/teams/{acme.team['id']}/members", json={"user_id": user_id})
    with acme.ws() as poster:
        poster.welcome()
        pipeline_posts(poster, acme.thread, [acme.user["id"]], history, "history")
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def reader(after: int) -> None:
            try:
                with acme.ws() as ws:
                    ws.welcome()
                    ws.join(acme.thread, after=after)
                    results[after] = seqs(ws.envelopes(acme.thread, final))
                    ws.quiet()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        readers = []
        storm_thread = threading.Thread(
            target=pipeline_posts, args=(poster, acme.thread, fresh, storm, "storm")
        )
        storm_thread.start()
        for after in (0, 550, 120, 599, 400, 10, 590, 300):
            readers.append(threading.Thread(target=reader, args=(after,)))
            readers[-1].start()
            time.sleep(0.03)
        storm_thread.join()
        for t in readers:
            t.join()
    assert not errors, errors
    assert last_seq(acme.org, acme.thread) == final
    for after, got in results.items():
        assert got == list(range(after + 1, final + 1)), after
    assert len(results) == 8


def test_join_from_the_end_gets_only_new_envelopes_and_leave_stops_them(acme: Setup) -> None:
    acme.post("old")
    with acme.ws() as ws:
        ws.welcome()
        now = last_seq(acme.org, acme.thread)
        joined = ws.join(acme.thread, after=now)
        assert joined == {**joined, "after": now, "last_seq": now, "thread_id": acme.thread}
        ws.quiet()  # no replay
        acme.post("new")
        assert seqs(ws.envelopes(acme.thread, now + 1)) == [now + 1]
        ref = ws.send(type="leave", thread_id=acme.thread)
        assert ws.expect("left", ref)["thread_id"] == acme.thread
        acme.post("after leaving")
        ws.quiet()


def test_bad_frames_get_typed_errors_and_the_connection_stays_open(acme: Setup) -> None:
    with acme.ws() as ws:
        ws.welcome()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "subscribe", "thread_id": acme.thread}, "invalid_request"),
            ({"type": "join"}, "invalid_request"),
            ({"type": "join", "thread_id": acme.thread, "after": -1}, "invalid_request"),
            ({"type": "join", "thread_id": acme.thread, "after": "1"}, "invalid_request"),
            ({"type": "join", "thread_id": acme.thread, "after": 10**6}, "invalid_request"),
            ({"type": "join", "thread_id": "thr_missing"}, "not_found"),
            ({"type": "post", "thread_id": acme.thread, "content": ""}, "invalid_request"),
            ({"type": "ack", "thread_id": acme.thread, "seq": 1}, "invalid_request"),
            ({"type": "auth", "token": acme.token}, "invalid_request"),
        ]
        for frame, code in cases:
            ref = ws.send(**frame)
            err = ws.expect("error", ref)
            assert err["error"]["code"] == code, (frame, err)
            assert err["error"]["message"]
        ws.quiet()
        ws.join(acme.thread)  # still fully usable


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"no": "type"}', b"\x00binary"])
def test_a_frame_that_is_no_json_object_with_a_type_closes_with_4000(
    acme: Setup, raw: str | bytes
) -> None:
    with acme.ws() as ws:
        ws.welcome()
        ws.conn.send(raw)
        frames, code = ws.closed_with()
    assert code == 4000
    assert [(f["type"], f["error"]["code"]) for f in frames] == [("error", "invalid_request")]


# ----------------------------------------------------------------------------- post


def test_post_with_an_idempotency_key_twice_stores_one_envelope(acme: Setup) -> None:
    with acme.ws() as ws:
        ws.welcome()
        now = last_seq(acme.org, acme.thread)
        ws.join(acme.thread, after=now)
        frame = {
            "type": "post",
            "thread_id": acme.thread,
            "content": "exactly once",
            "user_id": acme.user["id"],
            "idempotency_key": "k-1",
        }
        ref = ws.send(**frame)
        # the live envelope and the reply may come in either order
        got = sorted((ws.recv(), ws.recv()), key=lambda f: str(f["type"]))
        assert [f["type"] for f in got] == ["envelope", "posted"]
        live, first = got[0]["envelope"], got[1]["envelope"]
        assert got[1]["ref"] == ref
        second = ws.expect("posted", ws.send(**frame))["envelope"]
        assert first == second == live
        assert first["idempotency_key"] == "k-1"
        assert first["sender"]["id"] == acme.user["id"]
        ws.quiet()  # the repeat was not appended, so nothing more is delivered
    stored = [
        e for e in all_envelopes(acme.org.http, acme.thread) if e["content"] == "exactly once"
    ]
    assert [e["id"] for e in stored] == [first["id"]]
    assert last_seq(acme.org, acme.thread) == now + 1


def test_post_permissions_match_rest(module_server: LiveServer, acme: Setup) -> None:
    other = acme.org.user("Other person")
    read_only = acme.org.ok("POST", "/credentials", json={"kind": "org_key", "scopes": ["read"]})
    cases = [
        # (key, body, expected code)
        (acme.token, {"content": "as someone else", "user_id": other["id"]}, "permission_denied"),
        (read_only["secret"], {"content": "ro", "user_id": acme.user["id"]}, "permission_denied"),
        (acme.org.key, {"content": "no sender"}, "invalid_request"),
        (acme.org.key, {"content": "not a member", "user_id": other["id"]}, "permission_denied"),
    ]
    for key, body, code in cases:
        with module_server.client(key) as http:
            rest = http.post(f"/threads/{acme.thread}/messages", json=body)
        assert_error(rest, rest.status_code, code)
        with acme.ws(key) as ws:
            ws.welcome()
            err = ws.expect("error", ws.send(type="post", thread_id=acme.thread, **body))
            assert err["error"]["code"] == code, (body, err)
            assert err["thread_id"] == acme.thread
    # the token posts as its own user without naming anyone
    with acme.ws(acme.token) as ws:
        ws.welcome()
        env = ws.expect("posted", ws.send(type="post", thread_id=acme.thread, content="me"))
        assert env["envelope"]["sender"]["id"] == acme.user["id"]


def test_another_org_cannot_join_a_thread_same_answer_as_a_missing_id(
    module_server: LiveServer, acme: Setup
) -> None:
    intruder = Setup(module_server, f"Intruder{next(_names)}")
    with intruder.ws() as ws:
        ws.welcome()
        errors = []
        for thread_id in (acme.thread, "thr_" + "0" * 24):
            err = ws.expect("error", ws.send(type="join", thread_id=thread_id))
            errors.append(err)
            assert err["error"] == {
                "code": "not_found",
                "message": f"thread {thread_id!r} not found",
            }
        # nor post, ack or type into it
        for frame in (
            {"type": "post", "content": "x", "user_id": intruder.user["id"]},
            {"type": "ack", "seq": 1, "cursor": "c"},
            {"type": "typing", "user_id": intruder.user["id"]},
        ):
            err = ws.expect("error", ws.send(thread_id=acme.thread, **frame))
            assert err["error"]["code"] == "not_found", (frame, err)
        ws.quiet()
    intruder.org.http.close()


# ----------------------------------------------------------------------------- ack / cursors


def test_ack_then_reconnect_with_the_cursor_replays_exactly_the_unacked(acme: Setup) -> None:
    for i in range(6):
        acme.post(f"m{i}")
    with acme.ws(acme.token) as ws:
        ws.welcome()
        assert ws.join(acme.thread, cursor="inbox")["after"] == 0  # a new cursor starts at 0
        got = ws.envelopes(acme.thread, 7)
        assert seqs(got) == list(range(1, 8))
        ref = ws.send(type="ack", thread_id=acme.thread, seq=5, cursor="inbox")
        assert ws.expect("acked", ref)["seq"] == 5
        # never backwards
        ref = ws.send(type="ack", thread_id=acme.thread, seq=2, cursor="inbox")
        assert ws.expect("acked", ref)["seq"] == 5
    acme.post("while away")
    with acme.ws(acme.token) as ws:
        ws.welcome()
        joined = ws.join(acme.thread, cursor="inbox")
        assert (joined["after"], joined["last_seq"]) == (5, 8)
        assert seqs(ws.envelopes(acme.thread, 8)) == [6, 7, 8]
        ws.quiet()
        # another consumer name of the same user is independent; an explicit after wins
        assert ws.join(acme.thread, cursor="audit")["after"] == 0
        assert seqs(ws.envelopes(acme.thread, 8)) == list(range(1, 9))
        assert ws.join(acme.thread, cursor="inbox", after=7)["after"] == 7
        assert seqs(ws.envelopes(acme.thread, 8)) == [8]
    # cursors belong to the subscriber: the org key's "inbox" is another cursor
    with acme.ws() as ws:
        ws.welcome()
        assert ws.join(acme.thread, cursor="inbox")["after"] == 0


# ----------------------------------------------------------------------------- typing


def test_typing_reaches_the_other_connection_and_never_the_wal(acme: Setup) -> None:
    with acme.ws(acme.token) as typist, acme.ws() as watcher:
        typist.welcome()
        watcher.welcome()
        now = last_seq(acme.org, acme.thread)
        typist.join(acme.thread, after=now)
        watcher.join(acme.thread, after=now)
        typist.send(type="typing", thread_id=acme.thread)
        frame = watcher.expect("typing")
        assert frame == {
            "type": "typing",
            "thread_id": acme.thread,
            "sender": {
                "kind": "user",
                "id": acme.user["id"],
                "org_id": acme.org.id,
                "name": acme.user["name"],
            },
        }
        typist.quiet()  # the typist does not get its own indicator
        watcher.quiet()
    assert last_seq(acme.org, acme.thread) == now
    assert all(
        e["type"] in (EV_THREAD_CREATED, EV_MESSAGE)
        for e in all_envelopes(acme.org.http, acme.thread)
    )


# ----------------------------------------------------------------------------- access changes


def test_visa_revocation_while_joined_stops_delivery_to_the_removed_org(
    module_server: LiveServer,
) -> None:
    host, guest = (
        Setup(module_server, f"Host{next(_names)}"),
        Setup(module_server, f"Guest{next(_names)}"),
    )
    net = open_network(
        host.org, {guest.org: [("user", guest.user["id"])]}, ("user", host.user["id"])
    )
    thread = host.org.ok("POST", f"/networks/{net['id']}/threads", json={"title": "shared"})["id"]
    with host.ws() as h, guest.ws(guest.token) as g:
        h.welcome()
        g.welcome()
        h.join(thread)
        g.join(thread)
        first = post(host.org, thread, "hello guests", user_id=host.user["id"])
        assert seqs(h.envelopes(thread, first["seq"]))[-1] == first["seq"]
        assert seqs(g.envelopes(thread, first["seq"]))[-1] == first["seq"]
        visa = next(
            v
            for v in host.org.ok("GET", f"/networks/{net['id']}/visas")
            if v["org_id"] == guest.org.id
        )
        host.org.ok("DELETE", f"/networks/{net['id']}/visas/{visa['id']}")
        secret = post(host.org, thread, "guests are gone", user_id=host.user["id"])
        assert seqs(h.envelopes(thread, secret["seq"])) == [secret["seq"]]
        err = g.expect("error")
        assert (err["thread_id"], err["error"]["code"]) == (thread, "not_found")
        g.quiet()  # and never the envelope
        post(host.org, thread, "still gone", user_id=host.user["id"])
        g.quiet()
        err = g.expect("error", g.send(type="join", thread_id=thread))
        assert err["error"]["code"] == "not_found"
    host.org.http.close()
    guest.org.http.close()


def test_revoked_credential_is_disconnected(acme: Setup) -> None:
    token = acme.org.ok(
        "POST", "/credentials", json={"kind": "user_token", "subject_id": acme.user["id"]}
    )
    with acme.ws(token["secret"]) as ws:
        ws.welcome()
        now = last_seq(acme.org, acme.thread)
        ws.join(acme.thread, after=now)
        acme.org.ok("DELETE", f"/credentials/{token['credential']['id']}")
        acme.post("after revocation")
        frames, code = ws.closed_with()
    assert code == 4401
    assert frames == [{"type": "disconnect", "reason": "revoked", "resume": {acme.thread: now}}]


# ----------------------------------------------------------------------------- slow consumers


@pytest.fixture(scope="module")
def small_buffer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("rt-small") / "an.db", ws_buffer=16)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _stalled_socket(srv: LiveServer) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer, so the kernel cannot absorb a backlog
    for a client that does not read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    return sock


@sqlite_only(_TRANSPORT)
def test_a_stalled_consumer_is_disconnected_lagged_and_others_get_everything(
    small_buffer_server: LiveServer,
) -> None:
    srv = small_buffer_server
    s = Setup(srv, f"Slow{next(_names)}")
    realtime = srv.app.state.realtime
    realtime.lag_close_timeout = 60.0  # the stalled client reads only at the end of the test
    lagged_before = realtime.lagged_connections
    start = last_seq(s.org, s.thread)
    stalled = s.ws(sock=_stalled_socket(srv), max_queue=1, compression=None)
    healthy = s.ws()
    with stalled, healthy:
        stalled.welcome()
        healthy.welcome()
        stalled.join(s.thread, after=start)
        healthy.join(s.thread, after=start)
        # incompressible 20 kB messages until the stalled one overflows its 16-frame outbox
        posted = 0
        deadline = time.monotonic() + 60
        while realtime.lagged_connections == lagged_before:
            assert time.monotonic() < deadline, "the stalled consumer was never disconnected"
            s.post(f"{posted} " + bytes(range(256)).hex() * 40)
            posted += 1
        for _ in range(5):  # the healthy consumer keeps getting live envelopes after that
            s.post(f"{posted} after")
            posted += 1
        final = start + posted
        got = healthy.envelopes(s.thread, final)
        assert seqs(got) == list(range(start + 1, final + 1))
        healthy.quiet()
        # now the stalled client reads: what was written before the disconnect, then the
        # disconnect frame whose resume is exactly the last envelope it got, then close 4008
        frames, code = stalled.closed_with()
    assert code == 4008
    envs = [f["envelope"]["seq"] for f in frames if f["type"] == "envelope"]
    assert envs == list(range(start + 1, start + 1 + len(envs)))
    assert len(envs) < posted
    assert frames[-1] == {
        "type": "disconnect",
        "reason": "lagged",
        "resume": {s.thread: envs[-1] if envs else start},
    }
    s.org.http.close()


# ----------------------------------------------------------------------------- heartbeat, shutdown


@pytest.fixture(scope="module")
def fast_heartbeat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("rt-hb") / "an.db", ws_heartbeat=0.2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@sqlite_only(_TRANSPORT)
def test_heartbeat_pings_arrive_and_a_silent_client_is_closed(
    fast_heartbeat_server: LiveServer,
) -> None:
    s = Setup(fast_heartbeat_server, f"Beat{next(_names)}")
    with s.ws() as ws:
        assert ws.welcome()["heartbeat"] == 0.2
        pings = 0
        while pings < 5:  # a client that answers stays connected through several heartbeats
            frame = json.loads(ws.conn.recv(timeout=TIMEOUT))
            assert frame == {"type": "ping"}
            ws.conn.send(json.dumps({"type": "pong"}))
            pings += 1
    with s.ws() as ws:
        ws.welcome()
        frames, code = ws.closed_with()  # sends nothing: closed after 3 silent heartbeats
    assert code == 4009
    assert {"type": "ping"} in frames
    assert frames[-1] == {"type": "disconnect", "reason": "idle", "resume": {}}
    s.org.http.close()


class GracefulLiveServer(LiveServer):
    """LiveServer on :class:`GracefulServer` (the realtime-aware shutdown)."""

    def start(self) -> None:
        settings = Settings(database=str(self.db), model="test", **self.settings)
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = GracefulServer(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)


@sqlite_only(_TRANSPORT)
def test_server_shutdown_sends_disconnect_shutdown_and_closes_1001(tmp_path: Path) -> None:
    srv = GracefulLiveServer(tmp_path / "an.db")
    srv.start()
    try:
        s = Setup(srv, "Closing")
        s.post("one")
        with s.ws() as ws:
            ws.welcome()
            ws.join(s.thread)
            assert seqs(ws.envelopes(s.thread, 2)) == [1, 2]
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            frames, code = ws.closed_with()
            stopper.join()
        s.org.http.close()
    finally:
        srv.stop()
    assert code == 1001
    assert frames == [{"type": "disconnect", "reason": "shutdown", "resume": {s.thread: 2}}]


# ----------------------------------------------------------------------------- ordering property

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("post_rest"), st.integers(1, 4)),
        st.tuples(st.just("post_ws"), st.integers(1, 4)),
        st.tuples(st.just("rejoin"), st.floats(0, 1)),
        st.tuples(st.just("reconnect"), st.booleans()),
        st.tuples(st.just("read"), st.integers(0, 6)),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_every_join_sees_exactly_after_plus_one_to_last_in_order(
    module_server: LiveServer, acme: Setup, ops: list[tuple[str, Any]]
) -> None:
    """Random interleavings of posts (REST and WS), partial reads, re-joins from random
    positions and reconnects (resuming from the last seq seen): each join's stream is exactly
    ``after+1 .. last``, in order, once."""
    thread = acme.new_thread()
    ws = acme.ws()
    ws.welcome()
    after = 0
    ws.join(thread, after=0)
    seen: list[int] = []  # seqs received since the current join
    total = 1
    try:
        for op, arg in ops:
            if op == "post_rest":
                for i in range(arg):
                    acme.post(f"rest {i}", thread)
                total += arg
            elif op == "post_ws":
                refs = [
                    ws.send(
                        type="post", thread_id=thread, content=f"ws {i}", user_id=acme.user["id"]
                    )
                    for i in range(arg)
                ]
                total += arg
                posted: set[str] = set()
                while len(posted) < arg:  # envelopes may interleave with the replies
                    frame = ws.recv()
                    if frame["type"] == "posted":
                        posted.add(frame["ref"])
                    else:
                        assert frame["type"] == "envelope", frame
                        seen.append(frame["envelope"]["seq"])
                assert posted == set(refs)
            elif op == "read":
                want = min(arg, total - after - len(seen))
                for _ in range(want):
                    frame = ws.expect("envelope")
                    seen.append(frame["envelope"]["seq"])
            elif op == "rejoin":
                new_after = int(arg * total)
                ref = ws.send(type="join", thread_id=thread, after=new_after)
                while (frame := ws.recv())["type"] == "envelope":
                    seen.append(frame["envelope"]["seq"])  # still the previous join's stream
                assert (frame["type"], frame["ref"]) == ("joined", ref), frame
                assert seen == list(range(after + 1, after + 1 + len(seen)))
                after, seen = new_after, []
            else:  # reconnect, resuming from the last seq seen (or from scratch)
                assert seen == list(range(after + 1, after + 1 + len(seen)))
                after = (seen[-1] if seen else after) if arg else 0
                ws.close()
                ws = acme.ws()
                ws.welcome()
                ws.join(thread, after=after)
                seen = []
        while len(seen) < total - after:
            frame = ws.expect("envelope")
            seen.append(frame["envelope"]["seq"])
        assert seen == list(range(after + 1, total + 1))
        ws.quiet()
    finally:
        ws.close()


# ----------------------------------------------------------------------------- pure parts


def _env(sender: str, sender_org: str, audience: list[str] | None, seq: int = 2) -> Envelope:
    return Envelope(
        "thr_x",
        seq,
        "env_x",
        EV_MESSAGE,
        {"content": "c"},
        "user",
        sender,
        sender_org,
        audience,
        None,
        None,
        "2026-01-01T00:00:00Z",
        "0" * 64,
        "1" * 64,
    )


def test_audience_admits() -> None:
    org_key = Principal("org", "org_a", "cred_1", "org_a")
    token = Principal("user", "org_a", "cred_2", "usr_me")
    other_token = Principal("user", "org_a", "cred_3", "usr_other")
    admin = Principal("admin", None, "adk_1")
    everyone = _env("usr_x", "org_b", None)
    assert all(audience_admits(v, everyone) for v in (org_key, token, admin))
    to_me = _env("usr_x", "org_b", ["usr_me"])
    assert audience_admits(token, to_me)
    assert not audience_admits(other_token, to_me)
    assert audience_admits(Sender("user", "usr_me", "org_a"), to_me)
    assert not audience_admits(Sender("agent", "agt_y", "org_a"), to_me)
    assert not audience_admits(org_key, to_me)
    assert audience_admits(org_key, to_me, acts_for={"usr_me", "agt_1"})
    assert audience_admits(org_key, _env("usr_x", "org_b", ["org_a"]))
    assert not audience_admits(admin, to_me)
    # the sender always sees its own, and an org key everything its org sent
    mine = _env("usr_other", "org_a", ["usr_me"])
    assert audience_admits(other_token, mine)
    assert audience_admits(org_key, mine)
    assert audience_admits(Sender("user", "usr_other", "org_a"), mine)


def test_hub_subscriptions_follow_a_changing_thread_set(db: TestDb) -> None:
    async def run() -> None:
        engine = create_engine(database_url(db))
        await upgrade_schema(engine)
        system = Sender("system", "org_h", "org_h")
        async with Hub.open(engine) as hub:
            for t in ("thr_a", "thr_b"):
                await hub.append(
                    t,
                    type=EV_THREAD_CREATED,
                    data={"title": t, "team_id": "team_x", "adapter": "open", "agent_budget": 4},
                    sender=system,
                )
            every = hub.subscribe()
            some = hub.subscribe(set())
            some.add_thread("thr_b")

            async def say(t: str) -> None:
                await hub.append(t, type=EV_MESSAGE, data={"content": t}, sender=system)

            await say("thr_a")
            await say("thr_b")
            some.add_thread("thr_a")
            some.discard_thread("thr_b")
            await say("thr_b")
            await say("thr_a")
            got_some = [(e.thread_id, e.seq) for e in await some.receive_batch()]
            got_every = [(e.thread_id, e.seq) for e in await every.receive_batch()]
            assert got_some == [("thr_b", 2), ("thr_a", 3)]
            assert got_every == [("thr_a", 2), ("thr_b", 2), ("thr_b", 3), ("thr_a", 3)]
            assert some.thread_ids == frozenset({"thr_a"})
            some.close()
            assert some.closed and "thr_a" not in hub._by_thread
            # a subscriber that falls behind its buffer is dropped, others are not
            tiny = hub.subscribe({"thr_a"}, buffer=1)
            await say("thr_a")
            await say("thr_a")
            assert tiny.lagged and tiny.closed
            assert not every.closed
            assert await tiny.receive_batch() == []
        await engine.dispose()

    anyio.run(run)


def test_live_frames_are_deduplicated_and_a_gap_goes_back_to_the_wal(db: TestDb) -> None:
    """The live hand-off rules of one follow, driven directly (real hub and SQLite; only the
    socket is a list): ``seq <=`` the last handled is dropped, the next seq is queued, a gap
    or an access change sends the follow back to catching up, with the frame kept aside."""

    class ListTransport:
        async def send(self, text: str) -> None: ...

        async def receive(self) -> str | bytes | None:
            return None

        async def close(self, code: int, reason: str = "") -> None: ...

    async def run() -> None:
        engine = create_engine(database_url(db))
        await upgrade_schema(engine)
        async with Hub.open(engine) as hub:
            ctx = ServiceContext(engine, hub, Settings(database=str(db), **settings_for(db)))
            services = Services.create(ctx)
            principal = Principal("org", "org_a", "cred_a", "org_a")
            realtime = RealtimeProtocol(ctx, threads=services.threads, orgs=services.orgs)
            conn = Connection(realtime, ListTransport(), principal)
            f = Follow(conn, "thr_x", after=0, seq=5, live=True)
            conn.follows["thr_x"] = f

            def offer(seq: int) -> None:
                conn.offer(f, _env("usr_x", "org_a", None, seq=seq), f"frame {seq}")

            for seq in (3, 5):
                offer(seq)
            assert len(conn.outbox) == 0 and f.seq == 5
            offer(6)
            assert await conn.outbox.get() == ("frame 6", "thr_x", 6)
            offer(8)  # 7 is missing: read it from the WAL, keep 8 aside
            assert not f.live and f.pending == [(8, "frame 8")] and len(conn.outbox) == 0
            assert conn._catchup == {"thr_x": f}
            f.live, f.pending = True, []
            await ctx.access_removed()  # access changed: nothing more before a re-check
            offer(7)
            assert not f.live and f.pending == [(7, "frame 7")] and len(conn.outbox) == 0
        await engine.dispose()

    anyio.run(run)


@sqlite_only(_TRANSPORT)
def test_an_expired_credential_is_disconnected_unless_renewed(
    fast_heartbeat_server: LiveServer,
) -> None:
    s = Setup(fast_heartbeat_server, f"Expiry{next(_names)}")
    body = {"kind": "user_token", "subject_id": s.user["id"], "expires_in": 1.5}
    renewed = s.org.ok("POST", "/credentials", json=body)
    expiring = s.org.ok("POST", "/credentials", json=body)
    with s.ws(renewed["secret"]) as kept, s.ws(expiring["secret"]) as dropped:
        for ws in (kept, dropped):
            ws.welcome()
            ws.join(s.thread, after=last_seq(s.org, s.thread))
        cid = renewed["credential"]["id"]
        s.org.ok("POST", f"/credentials/{cid}/renew", json={"expires_in": 60})
        deadline = time.monotonic() + 2.0  # both past the first expiry
        while time.monotonic() < deadline:  # stay heard (heartbeats every 0.2 s)
            for ws in (kept, dropped):
                with contextlib.suppress(ConnectionClosed):
                    ws.conn.send(json.dumps({"type": "pong"}))
            time.sleep(0.1)
        frames, code = dropped.closed_with()
        assert code == 4401
        assert frames[-1]["type"] == "disconnect" and frames[-1]["reason"] == "expired"
        posted = s.post("still here")
        (env,) = kept.envelopes(s.thread, posted["seq"])  # the renewed one goes on
        assert env["id"] == posted["id"]
        kept.quiet()
    s.org.http.close()
