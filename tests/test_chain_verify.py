"""Every reader can check a thread's hash chain itself (issue 13, point 2).

A real server (uvicorn on 127.0.0.1, a real SQLite file or PostgreSQL database). A thread holds
keyed posts (idempotency keys, stored scoped as ``<sender>:<key>``) and envelopes restricted by
an audience. A reader
outside an audience gets a stub for the envelope it may not see (seq, hash, prev_hash only) over
REST, long-poll and the WebSocket, and ``verify_chain`` (the SDK's own hashing, no server code)
holds for every reader. Changing any stored column of an envelope in the database is caught on
the client; a verifier written from docs/security.md alone (hashlib + json) agrees with the
server, also on random content (hypothesis); ``agent-network threads verify`` (a real
subprocess) exits 0, then 1 after tampering.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import (
    AsyncClient,
    ChainReport,
    Envelope,
    EnvelopeStub,
    HubClient,
    Passport,
    verify_chain,
)
from conftest import LiveServer, Org, all_envelopes, sql_execute, sql_rows

pytestmark = pytest.mark.engines("sqlite", "postgresql")

CLI = Path(sys.executable).parent / "agent-network"
DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
STUB_KEYS = {"thread_id", "seq", "hash", "prev_hash", "stub"}


# ----------------------------------------------------------------------------- the scene


def token(org: Org, kind: str, subject_id: str) -> str:
    issued = org.ok(
        "POST", "/credentials", json={"kind": f"{kind}_token", "subject_id": subject_id}
    )
    return str(issued["secret"])


@dataclass
class Scene:
    """One org with users Ann, Bob and Cid (each with a token client) in one team thread:

    1 thread.created; 2 Ann "hello" (key ``k-hello``); 3 Bob to Ann only; 4 Cid's keyed reply
    to 2 (key ``k-reply``, causation 2); 5 Ann to Cid and Bob (key ``k-aud``); 6 Bob, non-ASCII
    text and tool calls with numbers. Cid reads 3 as a stub."""

    srv: LiveServer
    org: Org
    users: dict[str, dict[str, Any]]
    tokens: dict[str, str]
    http: dict[str, httpx.Client]
    thread: str
    posted: list[dict[str, Any]]

    def close(self) -> None:
        for c in self.http.values():
            c.close()
        self.org.http.close()


def make_scene(srv: LiveServer) -> Scene:
    org = Org(srv, f"Chain-{uuid.uuid4().hex[:6]}")
    users = {n: org.user(n) for n in ("Ann", "Bob", "Cid")}
    team = org.team("Ops", *(("user", u["id"]) for u in users.values()))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "rollout"})["id"]
    tokens = {n: token(org, "user", u["id"]) for n, u in users.items()}
    http = {n: srv.client(t) for n, t in tokens.items()}
    ids = {n: u["id"] for n, u in users.items()}

    def post(who: str, content: str, **body: Any) -> dict[str, Any]:
        r = http[who].post(f"/threads/{thread}/messages", json={"content": content, **body})
        assert r.status_code == 201, r.text
        return dict(r.json())

    hello = post("Ann", "hello", idempotency_key="k-hello")
    posted = [
        hello,
        post("Bob", "for Ann only", audience=[ids["Ann"]]),
        post("Cid", "keyed reply", idempotency_key="k-reply", causation_id=hello["id"]),
        post("Ann", "to Cid and Bob", idempotency_key="k-aud", audience=[ids["Cid"], ids["Bob"]]),
        post(
            "Bob",
            'Grüße — "quoted" \\ back\nslash ✓ 🚀',
            tool_calls=[{"name": "calc", "args": {"f": 1.0, "big": 1e300, "neg": -0.0, "n": 7}}],
        ),
    ]
    assert [p["seq"] for p in posted] == [2, 3, 4, 5, 6]
    return Scene(srv, org, users, tokens, http, thread, posted)


@pytest.fixture
def scene(module_server: LiveServer) -> Iterator[Scene]:
    s = make_scene(module_server)
    try:
        yield s
    finally:
        s.close()


def sdk_chain(srv: LiveServer, key: str, thread_id: str) -> list[Envelope | EnvelopeStub]:
    async def fetch() -> list[Envelope | EnvelopeStub]:
        async with AsyncClient(srv.url, key) as client:
            return [e async for e in client.threads.chain(thread_id, page=2)]

    return anyio.run(fetch)


# ----------------------------------------------------------------------- a verifier from the doc


def doc_verify(items: list[dict[str, Any]]) -> tuple[bool, int | None]:
    """The chain check as docs/security.md ("The hash chain, byte for byte") states it, with
    hashlib and json only: (holds, first bad seq)."""
    prev = "0" * 64
    for n, e in enumerate(items, start=1):
        if e["seq"] != n or e["prev_hash"] != prev:
            return False, n
        if not e.get("stub"):
            s = e["sender"]
            fields = [
                e["thread_id"],
                e["seq"],
                e["id"],
                e["type"],
                e["data"],
                s["kind"],
                s["id"],
                s["org_id"],
                e["audience"],
                e["causation_id"],
                e["stored_idempotency_key"],
                e["created_at"],
                e["prev_hash"],
            ]
            text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != e["hash"]:
                return False, n
        prev = e["hash"]
    return True, None


# ----------------------------------------------------------------------------- reading the chain


def test_a_reader_outside_an_audience_checks_the_whole_chain_over_rest(scene: Scene) -> None:
    tid, ids = scene.thread, {n: u["id"] for n, u in scene.users.items()}
    cid = all_envelopes(scene.http["Cid"], tid)
    assert [e["seq"] for e in cid] == [1, 2, 3, 4, 5, 6]
    stub = cid[2]
    assert set(stub) == STUB_KEYS and stub["stub"] is True
    assert stub["hash"] == scene.posted[1]["hash"] and stub["prev_hash"] == cid[1]["hash"]
    assert "for Ann only" not in json.dumps(cid)
    # the keyed posts: the key as given, and as stored (and hashed)
    assert (cid[1]["idempotency_key"], cid[1]["stored_idempotency_key"]) == (
        "k-hello",
        f"{ids['Ann']}:k-hello",
    )
    assert cid[3]["stored_idempotency_key"] == f"{ids['Cid']}:k-reply"
    assert cid[4]["stored_idempotency_key"] == f"{ids['Ann']}:k-aud"
    assert cid[5]["stored_idempotency_key"] is None and cid[0]["stored_idempotency_key"] is None
    # what each poster was told is what readers get, hash included
    for posted, read in zip(scene.posted, [cid[1], None, *cid[3:]], strict=True):
        if read is not None:
            assert read == posted
    report = verify_chain(cid)
    assert report == ChainReport(True, 6, 1, None, None, cid[-1]["hash"], tid)
    assert doc_verify(cid) == (True, None)
    # the SDK parses stubs and whole envelopes alike, and checks its own models
    models = sdk_chain(scene.srv, scene.tokens["Cid"], tid)
    assert [type(m) for m in models] == [Envelope, Envelope, EnvelopeStub] + [Envelope] * 3
    assert verify_chain(models).ok and verify_chain(models).stubs == 1
    # readers in the audience (and the org key) recompute every hash, stubs for the rest
    for key, stubs in ((scene.tokens["Ann"], 0), (scene.tokens["Bob"], 0), (scene.org.key, 0)):
        report = verify_chain(sdk_chain(scene.srv, key, tid))
        assert (report.ok, report.checked, report.stubs) == (True, 6, stubs)
    # the messages view leaves hidden ones out (it is no chain view: it skips thread events)
    msgs = all_envelopes(scene.http["Cid"], tid, messages_only=True)
    assert [m["seq"] for m in msgs] == [2, 4, 5, 6]
    # a page holding only the hidden envelope holds its stub
    alone = scene.http["Cid"].get(f"/threads/{tid}/envelopes", params={"after": 2, "limit": 1})
    assert alone.json() == {"items": [stub], "next_after": 3}

    # SDK history (whole envelopes only) skips the stub
    async def history() -> list[int]:
        async with AsyncClient(scene.srv.url, scene.tokens["Cid"]) as client:
            return [e.seq async for e in client.threads.history(tid)]

    assert anyio.run(history) == [1, 2, 4, 5, 6]


def test_a_long_poll_answers_a_hidden_envelope_with_its_stub(scene: Scene) -> None:
    tid = scene.thread
    ann_id = scene.users["Ann"]["id"]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with httpx.AsyncClient(
            base_url=f"{scene.srv.url}/api/v1",
            headers={"Authorization": f"Bearer {scene.tokens['Cid']}"},
            timeout=60,
        ) as cid:
            async with anyio.create_task_group() as tg:
                got: dict[str, Any] = {}

                async def poll() -> None:
                    r = await cid.get(f"/threads/{tid}/envelopes", params={"after": 6, "wait": 30})
                    got.update(r.json())

                tg.start_soon(poll)
                await anyio.sleep(0.3)
                r = scene.http["Bob"].post(
                    f"/threads/{tid}/messages", json={"content": "psst", "audience": [ann_id]}
                )
                assert r.status_code == 201
            return got, r.json()

    page, hidden = anyio.run(scenario)
    assert page["items"] == [
        {
            "thread_id": tid,
            "seq": 7,
            "hash": hidden["hash"],
            "prev_hash": hidden["prev_hash"],
            "stub": True,
        }
    ]
    assert page["next_after"] == 7
    assert verify_chain(all_envelopes(scene.http["Cid"], tid)).checked == 7


def test_a_reader_outside_an_audience_checks_the_chain_over_the_websocket(scene: Scene) -> None:
    tid, srv = scene.thread, scene.srv
    ann_id = scene.users["Ann"]["id"]

    async def scenario() -> tuple[list[Envelope | EnvelopeStub], list[int]]:
        async with (
            AsyncClient(srv.url, scene.tokens["Cid"]) as cid,
            cid.realtime() as rt,
            cid.realtime() as plain_rt,
        ):
            room = await rt.join(tid)
            plain = await plain_rt.join(tid)
            chain: list[Envelope | EnvelopeStub] = []
            entries = room.entries()
            with anyio.fail_after(30):
                while len(chain) < 6:  # replayed from the WAL
                    chain.append(await anext(entries))
                # then live: a hidden one and a public one
                for who, body in (
                    ("Bob", {"content": "live secret", "audience": [ann_id]}),
                    ("Ann", {"content": "live public"}),
                ):
                    r = scene.http[who].post(f"/threads/{tid}/messages", json=body)
                    assert r.status_code == 201, r.text
                while len(chain) < 8:
                    chain.append(await anext(entries))
                seen = []
                async for env in plain:  # plain iteration skips the stubs
                    seen.append(env.seq)
                    if env.seq == 8:
                        break
            return chain, seen

    chain, seen = anyio.run(scenario)
    assert [e.seq for e in chain] == list(range(1, 9))
    assert [i for i, e in enumerate(chain, start=1) if isinstance(e, EnvelopeStub)] == [3, 7]
    report = verify_chain(chain)
    assert (report.ok, report.checked, report.stubs) == (True, 8, 2)
    assert seen == [1, 2, 4, 5, 6, 8]
    # the frame itself: the stub and nothing else
    url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
    headers = {"Authorization": f"Bearer {scene.tokens['Cid']}"}
    with connect(url, additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "join", "thread_id": tid, "after": 2}))
        while (frame := json.loads(ws.recv(timeout=30)))["type"] != "envelope":
            pass
    assert frame == {
        "type": "envelope",
        "thread_id": tid,
        "envelope": {
            "thread_id": tid,
            "seq": 3,
            "hash": scene.posted[1]["hash"],
            "prev_hash": scene.posted[0]["hash"],
            "stub": True,
        },
    }
    # the WebSocket's whole envelopes carry the same hashed fields as REST
    rest = all_envelopes(scene.http["Cid"], tid)
    assert [e.model_dump(mode="json")["hash"] for e in chain] == [e["hash"] for e in rest]


def test_stubs_never_reach_hubclient_handlers(tmp_path: Path) -> None:
    """An agent of a HubClient is handed only whole envelopes: a message hidden from it (a stub
    on the wire) neither calls its handler nor breaks its delivery."""
    calls: list[str] = []

    def record(env: Envelope, _channel: Any) -> str:
        calls.append(env.content or "")
        return f"ok {env.content}"

    async def main() -> None:
        async with (
            EmbeddedLink.open(tmp_path / "hub.db") as link,
            HubClient(link, discover=0.2) as hc,
        ):
            clerk = await hc.register(Passport(name="Clerk"), handler=record)
            ann, bob = await hc.human("Ann"), await hc.human("Bob")
            thread = await hc.rest.threads.create(
                "desk", team_id=await hc._team(), visibility="members"
            )
            await ann.send(thread.id, "for Bob only", audience=[bob.id])
            await ann.send(thread.id, "public")
            await clerk.wait_for(thread.id, lambda e: e.content == "ok public", timeout=20)
            chain = [e async for e in clerk.rest.threads.chain(thread.id)]
            wal = await clerk.channel(thread.id).read()
        assert calls == ["public"]
        assert [type(e) for e in chain][:3] == [Envelope, EnvelopeStub, Envelope]
        assert verify_chain(chain).ok
        assert [e.content for e in wal if e.type == "message"] == ["public", "ok public"]

    anyio.run(main)


# ----------------------------------------------------------------------------- tampering


def _tamper(srv: LiveServer, sql: str, **params: Any) -> None:
    """Change the database under the running server (another connection, as an intruder with
    access to the database would)."""
    assert sql_execute(srv.db, sql, **params) == 1, sql


def _col(srv: LiveServer, tid: str, seq: int, column: str) -> str | None:
    """The stored text of ``column`` (JSON columns as their text on both engines)."""
    [(value,)] = sql_rows(
        srv.db,
        f"SELECT CAST({column} AS TEXT) FROM envelopes WHERE thread_id = :t AND seq = :seq",
        t=tid,
        seq=seq,
    )
    return None if value is None else str(value)


def _set(column: str, value: Callable[[Scene, Any], Any], seq: int = 4) -> Callable[[Scene], None]:
    def change(s: Scene) -> None:
        old = _col(s.srv, s.thread, seq, column)
        new = value(s, old)
        assert new != old
        _tamper(
            s.srv,
            f"UPDATE envelopes SET {column} = :new WHERE thread_id = :t AND seq = :seq",
            new=new,
            t=s.thread,
            seq=seq,
        )

    return change


def _bump_digit(text: str) -> str:
    return text[:-8] + str((int(text[-8]) + 1) % 10) + text[-7:]  # a microsecond digit


# (what is changed, how, who verifies, first bad seq): every hashed column, the hash itself,
# a stub's hash, and a deleted row. Seq 4 is Cid's keyed reply (visible to everyone).
TAMPERING: dict[str, tuple[Callable[[Scene], None], str, int]] = {
    "content": (
        _set("data", lambda s, d: json.dumps({**json.loads(d), "content": "I never said it"})),
        "Cid",
        4,
    ),
    "data (a new key)": (
        _set("data", lambda s, d: json.dumps({**json.loads(d), "x": 1})),
        "Cid",
        4,
    ),
    "type": (_set("type", lambda s, v: "message.edited"), "Cid", 4),
    "sender_kind": (_set("sender_kind", lambda s, v: "agent"), "Cid", 4),
    "sender_id": (_set("sender_id", lambda s, v: s.users["Ann"]["id"]), "Cid", 4),
    "sender_org_id": (_set("sender_org_id", lambda s, v: "org_" + "0" * 24), "Cid", 4),
    "idempotency_key (unscoped)": (_set("idempotency_key", lambda s, v: "k-reply"), "Cid", 4),
    "idempotency_key (removed)": (_set("idempotency_key", lambda s, v: None), "Cid", 4),
    "causation_id": (_set("causation_id", lambda s, v: None), "Cid", 4),
    "audience (added)": (
        _set("audience", lambda s, v: json.dumps([s.users["Cid"]["id"]])),
        "Cid",
        4,
    ),
    "audience (narrowed)": (
        _set("audience", lambda s, v: json.dumps([s.users["Cid"]["id"]]), seq=5),
        "Cid",
        5,
    ),
    "created_at": (_set("created_at", lambda s, v: _bump_digit(v)), "Cid", 4),
    "id": (_set("id", lambda s, v: v[:-4] + "beef"), "Cid", 4),
    "seq": (_set("seq", lambda s, v: 40), "Cid", 4),
    "thread_id": (_set("thread_id", lambda s, v: "thr_" + "0" * 24), "Cid", 4),
    "prev_hash": (_set("prev_hash", lambda s, v: "f" * 64), "Cid", 4),
    "hash": (_set("hash", lambda s, v: "f" * 64), "Cid", 4),
    "hash of a stub": (_set("hash", lambda s, v: "f" * 64, seq=3), "Cid", 4),
    "content of a hidden envelope, read by its audience": (
        _set("data", lambda s, d: json.dumps({"content": "forged"}), seq=3),
        "Ann",
        3,
    ),
    "deleted row": (
        lambda s: _tamper(
            s.srv, "DELETE FROM envelopes WHERE thread_id = :t AND seq = 4", t=s.thread
        ),
        "Cid",
        4,
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_with_any_stored_field_is_caught_by_the_client(scene: Scene, case: str) -> None:
    change, reader, bad = TAMPERING[case]
    before = verify_chain(sdk_chain(scene.srv, scene.tokens[reader], scene.thread))
    assert before.ok and before.checked == 6
    change(scene)
    raw = all_envelopes(scene.http[reader], scene.thread)
    report = verify_chain(raw)
    assert not report.ok, (case, report)
    assert report.first_bad_seq == bad, (case, report)
    assert report.reason
    assert verify_chain(sdk_chain(scene.srv, scene.tokens[reader], scene.thread)).first_bad_seq == (
        bad
    )
    assert doc_verify(raw) == (False, bad)
    assert scene.org.ok("GET", f"/threads/{scene.thread}/verify")["ok"] is False


def test_a_hidden_envelope_is_checked_whole_only_by_its_audience(scene: Scene) -> None:
    """What a stub cannot show: rewriting the content of an envelope hidden from Cid (hash
    left alone) keeps Cid's chain intact — Cid never saw that content — while Ann, in its
    audience, and the server's own check catch it."""
    _set("data", lambda s, d: json.dumps({"content": "forged"}), seq=3)(scene)
    assert verify_chain(all_envelopes(scene.http["Cid"], scene.thread)).ok
    assert verify_chain(all_envelopes(scene.http["Ann"], scene.thread)).first_bad_seq == 3


def test_verify_chain_reports_breaks_in_what_it_is_given(scene: Scene) -> None:
    cid = all_envelopes(scene.http["Cid"], scene.thread)
    assert verify_chain([]) == ChainReport(True, 0)
    assert verify_chain(cid[3:], after=3, prev_hash=cid[2]["hash"]).ok  # a continuation
    cases: list[tuple[list[dict[str, Any]], int, str]] = [
        (cid[1:], 1, "expected seq 1"),
        ([cid[0], cid[2], cid[1], *cid[3:]], 2, "expected seq 2"),
        ([*cid[:4], cid[3], *cid[4:]], 5, "expected seq 5"),
        ([*cid[:3], {k: v for k, v in cid[3].items() if k != "data"}], 4, "'data'"),
        ([*cid[:3], {**cid[3], "stored_idempotency_key": "k-reply"}], 4, "hash"),
        ([*cid[:3], {**cid[3], "thread_id": "thr_other"}], 4, "thread"),
        ([*cid[:3], {**cid[3], "sender": {**cid[3]["sender"], "org_id": None}}], 4, "org_id"),
    ]
    for items, bad, reason in cases:
        report = verify_chain(items)
        assert (report.ok, report.first_bad_seq) == (False, bad), (reason, report)
        assert report.reason is not None and reason in report.reason, report
    with pytest.raises(TypeError):
        verify_chain([42])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- the spec


def _doc_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("## The hash chain, byte for byte")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_docs_example_hashes_as_the_doc_says() -> None:
    """The worked example in docs/security.md: its envelope, its hash input text and its
    digest agree with each other, with hashlib/json alone and with verify_chain."""
    section = _doc_section()
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    envelope = json.loads(next(body for lang, body in blocks if lang == "json"))
    hash_input = next(body for lang, body in blocks if lang == "text").rstrip("\n")
    fields = (
        [envelope[k] for k in ("thread_id", "seq", "id", "type", "data")]
        + [envelope["sender"][k] for k in ("kind", "id", "org_id")]
        + [
            envelope[k]
            for k in (
                "audience",
                "causation_id",
                "stored_idempotency_key",
                "created_at",
                "prev_hash",
            )
        ]
    )
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert text == hash_input
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert digest == envelope["hash"]
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    assert digest in prose  # stated outside the example too
    assert f"`{len(text.encode('utf-8'))}` bytes" in section
    report = verify_chain([envelope], after=envelope["seq"] - 1, prev_hash=envelope["prev_hash"])
    assert report.ok


def test_a_verifier_written_from_the_doc_agrees_with_the_server(scene: Scene) -> None:
    for who in ("Ann", "Bob", "Cid"):
        items = all_envelopes(scene.http[who], scene.thread)
        assert doc_verify(items) == (True, None), who
    assert sum(1 for e in all_envelopes(scene.http["Cid"], scene.thread) if e.get("stub")) == 1


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def random_scene(module_server: LiveServer) -> Iterator[Scene]:
    s = make_scene(module_server)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.engines("sqlite", "postgresql")  # U+0000 is refused (422) on both
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    content=st.text(min_size=1, max_size=200).filter(lambda t: t.strip()),
    key=st.none() | st.text(min_size=1, max_size=40),
    args=st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=4),
    hidden=st.booleans(),
)
def test_any_message_hashes_the_same_on_the_server_and_here(
    random_scene: Scene, content: str, key: str | None, args: dict[str, Any], hidden: bool
) -> None:
    """Whatever a message holds (any Unicode, quotes, control characters, nested JSON, floats,
    big integers), and with or without a key or an audience, the server's hash is what the doc's
    verifier and verify_chain compute."""
    s = random_scene
    body: dict[str, Any] = {"content": content, "tool_calls": [{"name": "t", "args": args}]}
    if key is not None:
        body["idempotency_key"] = key
    if hidden:
        body["audience"] = [s.users["Bob"]["id"]]
    r = s.http["Ann"].post(f"/threads/{s.thread}/messages", json=body)
    if r.status_code == 422:  # refused input (e.g. a key the server does not take): not hashed
        return
    assert r.status_code == 201, r.text
    for who in ("Ann", "Cid"):
        items = all_envelopes(s.http[who], s.thread)
        assert doc_verify(items) == (True, None), who
        assert verify_chain(items).ok, who


# ----------------------------------------------------------------------------- the CLI


def _cli_env() -> dict[str, str]:
    """This process's environment (its PYTHONPATH included) without the CLI's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_NETWORK_")}
    return {**env, "COLUMNS": "200"}


def _cli(
    srv: LiveServer, key: str, thread_id: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "threads", "verify", thread_id, "--url", srv.url, "--token", key, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(),
    )


def test_cli_threads_verify_checks_the_chain_locally(scene: Scene) -> None:
    srv, tid, cid = scene.srv, scene.thread, scene.tokens["Cid"]
    ok = _cli(srv, cid, tid)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "chain intact" in ok.stdout and tid in ok.stdout and "6 envelopes" in ok.stdout
    last = all_envelopes(scene.http["Cid"], tid)[-1]["hash"]
    assert last in ok.stdout  # whole ids and hashes, never shortened
    as_json = _cli(srv, cid, tid, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "thread_id": tid,
        "ok": True,
        "checked": 6,
        "stubs": 1,
        "first_bad_seq": None,
        "reason": None,
        "last_hash": last,
    }
    _set("data", lambda s, d: json.dumps({**json.loads(d), "content": "forged"}), seq=5)(scene)
    broken = _cli(srv, cid, tid)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "chain broken at seq 5" in broken.stdout
    report = json.loads(_cli(srv, cid, tid, "--json").stdout)
    assert (report["ok"], report["first_bad_seq"]) == (False, 5)
    # a thread out of scope (or unknown) and a bad credential are failures, not a pass
    outsider = Org(srv, f"Other-{uuid.uuid4().hex[:6]}")
    try:
        assert _cli(srv, outsider.key, tid).returncode == 1
    finally:
        outsider.http.close()
    assert _cli(srv, "an_org_nonsense", tid).returncode == 1
    no_token = subprocess.run(
        [str(CLI), "threads", "verify", tid, "--url", srv.url],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(),
    )
    assert no_token.returncode == 2
