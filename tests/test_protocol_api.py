"""Thread protocols over the public surface: REST, WebSocket, the SDK and the hub clients.

A real server (uvicorn on 127.0.0.1, real SQLite file) is driven over HTTP: opening each adapter
(good knobs, bad knobs refused with 422 naming the knob and nothing written), auto-acks by agent
rule and user setting, explicit ack/reject/close/context and their errors, the consulting,
discussion and workflow rules, audiences on every read path (messages, envelopes, long-poll,
WebSocket; a property test over random audiences and readers), agent resumes, the SDK's
``AsyncClient`` and a ``HubClient`` over ``EmbeddedLink``.
"""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import (
    AsyncClient,
    HubClient,
    InvalidAudience,
    NotYourTurn,
    Passport,
    ProtocolViolation,
    Resume,
    ThreadClosed,
)
from agent_network.client.models import Thread
from agent_network.protocol import Finish, Handoff, ToolSpec, TransitionGraph, tool_call
from conftest import (
    LiveServer,
    Org,
    TestDb,
    all_envelopes,
    assert_error,
    open_network,
    sql_rows,
    sqlite_only,
)

pytestmark = pytest.mark.engines("sqlite", "postgresql")

# ----------------------------------------------------------------------------- helpers


def new_org(srv: LiveServer, name: str) -> Org:
    return Org(srv, f"{name}-{uuid.uuid4().hex[:6]}")


def token(org: Org, kind: str, subject_id: str) -> str:
    issued = org.ok(
        "POST", "/credentials", json={"kind": f"{kind}_token", "subject_id": subject_id}
    )
    return str(issued["secret"])


class Crew:
    """One org with a team of agents ann, bob, cat and users una (auto_ack off) and
    ugo (auto_ack on), each with its own token client."""

    def __init__(self, srv: LiveServer) -> None:
        self.srv = srv
        self.org = new_org(srv, "crew")
        o = self.org
        self.ann = o.agent("Ann", "ann")
        self.bob = o.agent("Bob", "bob")
        self.cat = o.agent("Cat", "cat")
        self.una = o.user("Una")
        self.ugo = o.ok("POST", "/users", json={"name": "Ugo", "auto_ack": True})
        self.team = o.team(
            "crew",
            ("agent", self.ann["id"]),
            ("agent", self.bob["id"]),
            ("agent", self.cat["id"]),
            ("user", self.una["id"]),
            ("user", self.ugo["id"]),
        )
        self.clients: dict[str, Any] = {}

    def as_(self, who: dict[str, Any]) -> Any:
        """An HTTP client holding ``who``'s own token (agent or user)."""
        if who["id"] not in self.clients:
            kind = "agent" if who["id"].startswith("agt") else "user"
            self.clients[who["id"]] = self.srv.client(token(self.org, kind, who["id"]))
        return self.clients[who["id"]]

    def open(self, adapter: str, *people: dict[str, Any], **body: Any) -> Any:
        """POST a thread on the team; returns the response."""
        parts = [
            {"kind": "agent" if p["id"].startswith("agt") else "user", "id": p["id"]}
            for p in people
        ]
        payload = {"title": f"{adapter} thread", "adapter": adapter, "participants": parts}
        payload.update(body)
        return self.org.http.post(f"/teams/{self.team['id']}/threads", json=payload)

    def opened(self, adapter: str, *people: dict[str, Any], **body: Any) -> dict[str, Any]:
        r = self.open(adapter, *people, **body)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def close_all(self) -> None:
        for c in self.clients.values():
            c.close()
        self.org.http.close()


def pid(p: dict[str, Any]) -> dict[str, str]:
    return {"kind": "agent" if p["id"].startswith("agt") else "user", "id": p["id"]}


def post(http: Any, thread_id: str, content: str, **body: Any) -> Any:
    return http.post(f"/threads/{thread_id}/messages", json={"content": content, **body})


def wait_status(http: Any, thread_id: str, status: str) -> dict[str, Any]:
    """Poll the thread until its status is ``status`` (the sweeper closes closing threads)."""
    deadline = time.monotonic() + 30
    while True:
        got = dict(http.get(f"/threads/{thread_id}").json())
        if got["status"] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.fixture
def crew(module_server: LiveServer) -> Any:
    c = Crew(module_server)
    yield c
    c.close_all()


# ----------------------------------------------------------------------------- opening


def test_open_each_adapter_shows_the_protocol_state(crew: Crew) -> None:
    ann, bob, cat, ugo = crew.ann, crew.bob, crew.cat, crew.ugo
    consulting = crew.opened("consulting", ann, bob, ttl=600, ack_timeout=60)
    assert consulting["adapter"] == "consulting" and consulting["status"] == "active"
    assert consulting["participants"] == [
        {"kind": "agent", "id": ann["id"], "name": "Ann"},
        {"kind": "agent", "id": bob["id"], "name": "Bob"},
    ]
    assert consulting["initiator"] == {"kind": "agent", "id": ann["id"], "name": "Ann"}
    assert consulting["pending_acks"] == [] and consulting["close_reason"] is None
    assert consulting["expected_speaker"] == ann["id"]
    envs = all_envelopes(crew.org.http, consulting["id"])
    assert [e["type"] for e in envs] == ["thread.created", "thread.ack"]
    created = envs[0]["data"]
    assert created["adapter"] == "consulting" and created["ttl"] == 600
    assert created["invitees"] == [["agent", bob["id"]]]  # default: all but the initiator
    assert created["names"]["Bob"] == bob["id"] and created["names"]["bob"] == bob["id"]
    assert envs[1]["sender"]["id"] == bob["id"] and envs[1]["data"] == {"auto": True}

    conversation = crew.opened("conversation", ann, ugo, visibility="restricted")
    assert (conversation["status"], conversation["visibility"]) == ("active", "restricted")

    discussion = crew.opened("discussion", bob, ann, cat, order=[bob["id"], cat["id"], ann["id"]])
    assert discussion["expected_speaker"] == bob["id"]
    assert discussion["initiator"]["id"] == bob["id"]

    graph = TransitionGraph.sequence(["Ann", "bob", cat["id"]])  # names, lookup keys, ids
    workflow = crew.opened("workflow", ann, bob, cat, graph=graph.to_dict(), invitees=[])
    assert workflow["status"] == "active" and workflow["turns"] == 0
    assert workflow["context"] == {} and workflow["expected_speaker"] == ann["id"]
    assert all_envelopes(crew.org.http, workflow["id"])[-1]["type"] == "thread.created"

    listed = {t["id"]: t for t in crew.org.ok("GET", f"/teams/{crew.team['id']}/threads")}
    assert listed[workflow["id"]] == workflow | {"last_seq": 1}
    assert listed[consulting["id"]]["participants"] == consulting["participants"]
    open_thread = crew.org.ok("POST", f"/teams/{crew.team['id']}/threads", json={"title": "o"})
    assert (open_thread["adapter"], open_thread["status"], open_thread["participants"]) == (
        "open",
        "open",
        [],
    )


def _counts(db: TestDb) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        sql_rows(db, f"SELECT count(*) FROM {t}")[0][0]
        for t in ("threads", "envelopes", "thread_participants")
    )


BAD_KNOBS: list[tuple[str, dict[str, Any], str]] = [
    ("nosuch", {}, "adapter"),
    ("consulting", {"three": True}, "participants"),
    ("consulting", {"none": True}, "participants"),
    ("consulting", {"ttl": 0}, "ttl"),
    ("consulting", {"ack_timeout": -5}, "ack_timeout"),
    ("consulting", {"expectations": [{"kind": "whenever", "seconds": 5}]}, "expectations"),
    ("consulting", {"expectations": [{"kind": "reply_within", "seconds": 5, "handler": "x"}]}, ""),
    ("consulting", {"initiator": "stranger"}, "initiator"),
    ("consulting", {"invitees": "stranger"}, "invitee"),
    ("workflow", {}, "graph"),
    ("workflow", {"graph": {"initial_speaker": "nobody", "transitions": []}}, "graph"),
    ("discussion", {"order": "partial"}, "order"),
    ("discussion", {"ordering": "random"}, "ordering"),
    ("discussion", {"knobs": {"ttl": 5}}, "knobs"),
    ("consulting", {"outsider": True}, "not a member"),
    ("open", {"invitees": []}, "invitees"),
    ("open", {"graph": {}}, "graph"),
]


@pytest.mark.engines(
    "sqlite",
    postgresql="the knobs are refused before any database work, the same code on both engines "
    "(17 servers for CI time, no PostgreSQL-specific path)",
)
@pytest.mark.parametrize(("adapter", "change", "named"), BAD_KNOBS)
def test_bad_knobs_are_refused_before_anything_is_written(
    server: LiveServer, adapter: str, change: dict[str, Any], named: str
) -> None:
    crew = Crew(server)
    try:
        ann, bob, cat = crew.ann, crew.bob, crew.cat
        people = [ann, bob]
        body = dict(change)
        if body.pop("three", False):
            people = [ann, bob, cat]
        if body.pop("none", False):
            people = []
        if body.pop("outsider", False):
            other = crew.org.agent("Out", "out")  # same org, not in the team
            people = [ann, other]
        if body.get("initiator") == "stranger":
            body["initiator"] = pid(cat)
        if body.get("invitees") == "stranger":
            body["invitees"] = [pid(cat)]
        if body.get("order") == "partial":
            body["order"] = [ann["id"]]
        if adapter == "open":
            people = []
        before = _counts(server.db)
        err = assert_error(crew.open(adapter, *people, **body), 422, "invalid_request")
        assert named in err["message"], err
        assert _counts(server.db) == before  # no thread row, no WAL, no participants
        # the refusal was the knob's: the same thread without it opens
        assert crew.open("consulting", ann, bob).status_code == 201
    finally:
        crew.close_all()


# ----------------------------------------------------------------------------- acks


def test_auto_ack_follows_the_agent_rule(crew: Crew) -> None:
    ann, bob, cat = crew.ann, crew.bob, crew.cat
    o = crew.org
    o.ok("PUT", f"/agents/{bob['id']}/rule", json={"allowed_adapters": ["conversation"]})
    o.ok("PUT", f"/agents/{cat['id']}/rule", json={"inbound_from": ["Bob"]})
    refused = crew.opened("discussion", ann, bob, cat)
    assert refused["status"] == "invited"
    assert [p["id"] for p in refused["pending_acks"]] == [bob["id"], cat["id"]]
    audit = o.ok("GET", "/audit", params={"action": "rule.refused", "resource_id": refused["id"]})
    reasons = sorted(r["reason"] for r in audit)
    assert "allowed_adapters" in reasons[0] and "inbound_from" in reasons[1], reasons
    # invited: nobody speaks yet
    assert_error(post(crew.as_(ann), refused["id"], "hi"), 409, "protocol_violation")
    # the rules admit these: bob's adapter, cat's initiator
    admitted = crew.opened("conversation", ann, bob)
    assert admitted["status"] == "active"
    by_bob = crew.opened("conversation", bob, cat)
    assert by_bob["status"] == "active" and by_bob["pending_acks"] == []
    # explicit acks make the refused one active
    o.ok("POST", f"/threads/{refused['id']}/ack", json={"agent_id": bob["id"]})
    done = crew.as_(cat).post(f"/threads/{refused['id']}/ack", json={}).json()
    assert done["status"] == "active" and done["pending_acks"] == []


def test_user_auto_ack_setting(crew: Crew) -> None:
    ann, una, ugo = crew.ann, crew.una, crew.ugo
    assert ugo["auto_ack"] is True and una["auto_ack"] is False
    assert crew.org.ok("GET", f"/users/{una['id']}")["auto_ack"] is False
    waiting = crew.opened("conversation", ann, una)
    assert waiting["status"] == "invited"
    assert waiting["pending_acks"] == [{"kind": "user", "id": una["id"], "name": "Una"}]
    acked = crew.as_(una).post(f"/threads/{waiting['id']}/ack", json={})
    assert acked.status_code == 200 and acked.json()["status"] == "active", acked.text
    assert crew.opened("conversation", ann, ugo)["status"] == "active"
    patched = crew.org.ok("PATCH", f"/users/{una['id']}", json={"auto_ack": True})
    assert patched["auto_ack"] is True
    assert crew.opened("conversation", ann, una)["status"] == "active"
    assert_error(
        crew.org.http.patch(f"/users/{una['id']}", json={"auto_ack": None}), 422, "invalid_request"
    )


def test_explicit_ack_reject_close_and_their_errors(crew: Crew) -> None:
    ann, bob, una, cat = crew.ann, crew.bob, crew.una, crew.cat
    t = crew.opened("conversation", ann, una)["id"]
    # a member who is no participant, a second ack, naming someone else with a token
    assert_error(crew.as_(cat).post(f"/threads/{t}/ack", json={}), 409, "protocol_violation")
    assert_error(
        crew.as_(una).post(f"/threads/{t}/ack", json={"user_id": crew.ugo["id"]}),
        403,
        "permission_denied",
    )
    assert_error(
        crew.org.http.post(f"/threads/{t}/ack", json={}), 422, "invalid_request"
    )  # an org key names its sender
    assert_error(
        crew.org.http.post("/threads/nope/ack", json={"user_id": una["id"]}), 404, "not_found"
    )
    rejected = crew.as_(una).post(f"/threads/{t}/reject", json={"reason": "busy"}).json()
    assert rejected["status"] in ("closing", "closed")
    assert rejected["close_reason"] == "invite_rejected"
    assert wait_status(crew.org.http, t, "closed")["close_reason"] == "invite_rejected"
    assert_error(crew.as_(una).post(f"/threads/{t}/ack", json={}), 409, "thread_closed")
    assert_error(post(crew.as_(ann), t, "hello?"), 409, "thread_closed")
    assert_error(crew.org.http.post(f"/threads/{t}/close", json={}), 409, "thread_closed")

    # close by a participant's token, then by the sweeper; not by a stranger
    c = crew.opened("conversation", ann, bob)["id"]
    assert_error(crew.as_(cat).post(f"/threads/{c}/close", json={}), 409, "protocol_violation")
    closing = crew.as_(bob).post(f"/threads/{c}/close", json={"reason": "done here"}).json()
    assert closing["close_reason"] == "done here"
    assert wait_status(crew.org.http, c, "closed")["close_reason"] == "done here"
    kinds = [e["type"] for e in all_envelopes(crew.org.http, c)]
    assert kinds[-2:] == ["thread.closing", "thread.closed"]

    # an org key of an org with a participant closes as its org
    d = crew.opened("conversation", ann, bob)["id"]
    assert crew.org.ok("POST", f"/threads/{d}/close", json={})["close_reason"] == "closed"
    closing_env = next(e for e in all_envelopes(crew.org.http, d) if e["type"] == "thread.closing")
    assert closing_env["sender"] == {
        "kind": "system",
        "id": crew.org.id,
        "name": "system",
        "org_id": crew.org.id,
        "org_name": crew.org.name,
    }

    # an open thread: the org closes it at once; tokens may not
    o = crew.org.ok("POST", f"/teams/{crew.team['id']}/threads", json={"title": "room"})["id"]
    assert_error(crew.as_(una).post(f"/threads/{o}/close", json={}), 403, "permission_denied")
    closed = crew.org.ok("POST", f"/threads/{o}/close", json={"reason": "archived"})
    assert (closed["status"], closed["close_reason"]) == ("closed", "archived")
    assert_error(post(crew.as_(una), o, "late"), 409, "thread_closed")
    assert_error(
        crew.org.http.post(f"/threads/{o}/close", json={"reason": ""}), 422, "invalid_request"
    )


def test_close_needs_a_participant_of_the_callers_org(module_server: LiveServer) -> None:
    host, guest = new_org(module_server, "host"), new_org(module_server, "guest")
    try:
        h1, h2 = host.agent("H1", "h1"), host.agent("H2", "h2")
        g = guest.agent("G", "g")
        net = open_network(
            host, {guest: [("agent", g["id"])]}, ("agent", h1["id"]), ("agent", h2["id"])
        )
        t = host.ok(
            "POST",
            f"/networks/{net['id']}/threads",
            json={
                "title": "inner",
                "adapter": "conversation",
                "participants": [pid(h1), pid(h2)],
            },
        )
        assert t["status"] == "active"
        assert_error(
            guest.http.post(f"/threads/{t['id']}/close", json={}), 403, "permission_denied"
        )
        # a guest's agent cannot be the initiator of a thread the host opens
        bad = host.http.post(
            f"/networks/{net['id']}/threads",
            json={"title": "x", "adapter": "conversation", "participants": [pid(g), pid(h1)]},
        )
        assert "initiator" in assert_error(bad, 422, "invalid_request")["message"]
        # a guest participant: the guest org may close
        both = host.ok(
            "POST",
            f"/networks/{net['id']}/threads",
            json={"title": "x", "adapter": "conversation", "participants": [pid(h1), pid(g)]},
        )
        assert guest.ok("POST", f"/threads/{both['id']}/close", json={})["status"] in (
            "closing",
            "closed",
        )
    finally:
        host.http.close()
        guest.http.close()


# ----------------------------------------------------------------------------- adapters


def test_consulting_full_cycle_over_rest(crew: Crew) -> None:
    ann, bob = crew.as_(crew.ann), crew.as_(crew.bob)
    t = crew.opened("consulting", crew.ann, crew.bob)["id"]
    assert_error(post(bob, t, "I answer first"), 409, "not_your_turn")
    q = post(ann, t, "What is 2+2?")
    assert q.status_code == 201, q.text
    assert_error(post(ann, t, "And 3+3?"), 409, "not_your_turn")
    state = ann.get(f"/threads/{t}").json()
    assert state["expected_speaker"] == crew.bob["id"]
    r = post(bob, t, "4", causation_id=q.json()["id"])
    assert r.status_code == 201, r.text
    done = wait_status(crew.org.http, t, "closed")
    assert (done["status"], done["close_reason"]) == ("closed", "consulting_complete")
    assert_error(post(ann, t, "thanks"), 409, "thread_closed")
    messages = all_envelopes(crew.org.http, t, messages_only=True)
    assert [m["content"] for m in messages] == ["What is 2+2?", "4"]


def test_discussion_is_round_robin(crew: Crew) -> None:
    a, b, c = crew.ann, crew.bob, crew.cat
    t = crew.opened("discussion", a, b, c, agent_budget=20)["id"]
    assert_error(post(crew.as_(b), t, "me first"), 409, "not_your_turn")
    for speaker, nxt in ((a, b), (b, c), (c, a), (a, b)):
        r = post(crew.as_(speaker), t, f"turn of {speaker['name']}")
        assert r.status_code == 201, r.text
        assert crew.org.ok("GET", f"/threads/{t}")["expected_speaker"] == nxt["id"]
    assert_error(post(crew.as_(c), t, "out of turn"), 409, "not_your_turn")
    # an org key posting as the right agent is fine too
    assert (
        crew.org.http.post(
            f"/threads/{t}/messages", json={"content": "b again", "agent_id": b["id"]}
        ).status_code
        == 201
    )


def test_workflow_handoff_tools_and_context(crew: Crew) -> None:
    a, b, c = crew.ann, crew.bob, crew.cat
    graph = TransitionGraph.sequence(
        ["ann", "bob", "cat"],
        tools=[ToolSpec("approve", "accept the draft", speakers=("cat",), finish="approved")],
    )
    t = crew.opened("workflow", a, b, c, graph=graph.to_dict())["id"]
    assert crew.as_(c).get(f"/threads/{t}/tools").json() == [
        {
            "name": "approve",
            "description": "accept the draft",
            "speakers": ["cat"],
            "handoff": None,
            "finish": "approved",
        }
    ]
    assert crew.org.ok("GET", f"/threads/{t}/tools", params={"agent_id": a["id"]}) == []
    assert_error(crew.org.http.get(f"/threads/{t}/tools"), 422, "invalid_request")
    assert_error(post(crew.as_(b), t, "not mine yet"), 409, "not_your_turn")
    # the static rule says ann -> bob; a Handoff to cat overrides it
    handoff = tool_call("handoff", Handoff(target="cat", reason="skip drafting"))
    r = post(crew.as_(a), t, "research done", tool_calls=[handoff])
    assert r.status_code == 201, r.text
    assert r.json()["data"]["tool_calls"] == [handoff]
    state = crew.org.ok("GET", f"/threads/{t}")
    assert (state["expected_speaker"], state["turns"]) == (c["id"], 1)
    # context does not advance the turn
    ctx = crew.as_(c).post(f"/threads/{t}/context", json={"values": {"verdict": "ok", "n": 2}})
    assert ctx.status_code == 200, ctx.text
    after = ctx.json()
    assert after["context"] == {"verdict": "ok", "n": 2}
    assert (after["expected_speaker"], after["turns"]) == (c["id"], 1)
    # an org key with several participants must name one; a non-participant is refused
    assert_error(
        crew.org.http.post(f"/threads/{t}/context", json={"values": {"x": 1}}),
        422,
        "invalid_request",
    )
    assert_error(
        crew.as_(crew.una).post(f"/threads/{t}/context", json={"values": {"x": 1}}),
        409,
        "protocol_violation",
    )
    assert_error(
        crew.as_(c).post(f"/threads/{t}/context", json={"values": {}}), 422, "invalid_request"
    )
    bad_calls = [tool_call("a", Finish()), tool_call("b", Finish())]
    assert_error(post(crew.as_(c), t, "two ends", tool_calls=bad_calls), 422, "invalid_request")
    fin = post(
        crew.as_(c), t, "approved", tool_calls=[tool_call("approve", Finish("ok", "approved"))]
    )
    assert fin.status_code == 201, fin.text
    assert wait_status(crew.org.http, t, "closed")["close_reason"] == "approved"
    assert crew.as_(c).get(f"/threads/{t}/tools").json() == []
    # context in a non-workflow thread is refused
    conv = crew.opened("conversation", a, b)["id"]
    assert_error(
        crew.as_(a).post(f"/threads/{conv}/context", json={"values": {"x": 1}}),
        409,
        "protocol_violation",
    )
    room = crew.org.ok("POST", f"/teams/{crew.team['id']}/threads", json={"title": "room"})["id"]
    assert_error(
        crew.as_(a).post(f"/threads/{room}/context", json={"values": {"x": 1}}),
        409,
        "protocol_violation",
    )


# ----------------------------------------------------------------------------- audience


def _ws_messages(srv: LiveServer, key: str, thread_id: str, until: str) -> list[dict[str, Any]]:
    """Join ``thread_id`` over the WebSocket and collect envelopes until one with content
    ``until`` arrives."""
    url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
    got: list[dict[str, Any]] = []
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send(json.dumps({"type": "join", "thread_id": thread_id, "after": 0}))
        while True:
            frame = json.loads(ws.recv(timeout=30))
            if frame["type"] == "envelope":
                got.append(frame["envelope"])
                if frame["envelope"].get("content") == until:  # (a stub has no content)
                    return got


def test_audience_hides_envelopes_from_everyone_else(crew: Crew) -> None:
    srv = crew.srv
    ann, una, ugo = crew.ann, crew.una, crew.ugo
    t = crew.org.ok("POST", f"/teams/{crew.team['id']}/threads", json={"title": "room"})["id"]
    una_http, ugo_http, ann_http = crew.as_(una), crew.as_(ugo), crew.as_(ann)
    assert post(una_http, t, "for everyone").status_code == 201
    # ugo long-polls past the public message while a secret and then a public one arrive
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        polled = pool.submit(
            lambda: ugo_http.get(f"/threads/{t}/messages", params={"after": 2, "wait": 30}).json()
        )
        time.sleep(0.3)  # let the poll start waiting (if it starts later, the read still holds)
        secret = post(una_http, t, "secret", audience=[ann["id"]])
        assert secret.status_code == 201, secret.text
        assert secret.json()["audience"] == [ann["id"]]
        assert post(una_http, t, "public again").status_code == 201
        page = polled.result(timeout=60)
    assert [m["content"] for m in page["items"]] == ["public again"]
    assert page["next_after"] == 4  # moved past the hidden envelope
    seen = {
        name: [m["content"] for m in all_envelopes(http, t, messages_only=True)]
        for name, http in (("una", una_http), ("ugo", ugo_http), ("ann", ann_http))
    }
    assert seen["una"] == ["for everyone", "secret", "public again"]  # the sender sees its own
    assert seen["ann"] == ["for everyone", "secret", "public again"]
    assert seen["ugo"] == ["for everyone", "public again"]
    # the envelopes (chain) view shows ugo the hidden one as a stub: its place, nothing else
    ugo_envs = all_envelopes(ugo_http, t)
    assert "secret" not in json.dumps(ugo_envs)
    stub = {"thread_id": t, "seq": 3, "hash": secret.json()["hash"]}
    stub |= {"prev_hash": secret.json()["prev_hash"], "stub": True}
    assert [e for e in ugo_envs if e.get("stub")] == [stub]
    # a page that holds only the hidden envelope holds its stub and moves the cursor on
    alone = ugo_http.get(f"/threads/{t}/envelopes", params={"after": 2, "limit": 1}).json()
    assert alone == {"items": [stub], "next_after": 3}
    # the org key sees its own org's envelopes
    assert "secret" in [m["content"] for m in all_envelopes(crew.org.http, t, messages_only=True)]
    # WebSocket: the same rule
    ugo_key = token(crew.org, "user", ugo["id"])
    ws_seen = _ws_messages(srv, ugo_key, t, "public again")
    assert [e["content"] for e in ws_seen if e.get("type") == "message"] == [
        "for everyone",
        "public again",
    ]
    assert [e for e in ws_seen if e.get("stub")] == [stub]
    # WebSocket post frame with an audience and tool calls
    url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
    una_key = token(crew.org, "user", una["id"])
    with connect(url, additional_headers={"Authorization": f"Bearer {una_key}"}) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "post",
                    "ref": "p1",
                    "thread_id": t,
                    "content": "ws secret",
                    "audience": [ann["id"]],
                    "tool_calls": [{"name": "lookup", "args": {"q": 1}}],
                }
            )
        )
        while (frame := json.loads(ws.recv(timeout=30)))["type"] != "posted":
            assert frame["type"] != "error", frame
    assert frame["envelope"]["audience"] == [ann["id"]]
    assert frame["envelope"]["data"]["tool_calls"] == [
        {"name": "lookup", "args": {"q": 1}, "result": None}
    ]
    assert "ws secret" not in [m.get("content") for m in all_envelopes(ugo_http, t)]
    assert "ws secret" in [m["content"] for m in all_envelopes(ann_http, t)]


def test_invalid_audience_is_refused(crew: Crew) -> None:
    outsider = crew.org.agent("Outsider", "outsider")  # not a member of the team
    room = crew.org.ok("POST", f"/teams/{crew.team['id']}/threads", json={"title": "room"})["id"]
    una = crew.as_(crew.una)
    before = crew.org.ok("GET", f"/threads/{room}")["last_seq"]
    err = assert_error(post(una, room, "x", audience=[outsider["id"]]), 422, "invalid_audience")
    assert outsider["id"] in err["message"]
    assert_error(post(una, room, "x", audience=[]), 422, "invalid_request")
    conv = crew.opened("conversation", crew.ann, crew.bob)["id"]
    assert_error(
        post(crew.as_(crew.ann), conv, "x", audience=[crew.cat["id"]]), 422, "invalid_audience"
    )
    assert crew.org.ok("GET", f"/threads/{room}")["last_seq"] == before
    ok = post(crew.as_(crew.ann), conv, "just bob", audience=[crew.bob["id"]])
    assert ok.status_code == 201, ok.text


AUDIENCE_READERS = ("ann", "bob", "una", "ugo")


@pytest.fixture(scope="module")
def audience_crew(module_server: LiveServer) -> Any:
    c = Crew(module_server)
    # ann and bob are agents: a budget above every example count, so that examples drawing agent
    # senders several times in a row test visibility, not the runaway guard
    room = c.org.ok(
        "POST", f"/teams/{c.team['id']}/threads", json={"title": "prop", "agent_budget": 1000}
    )["id"]
    yield c, room
    c.close_all()


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sender=st.sampled_from(AUDIENCE_READERS),
    audience=st.none() | st.lists(st.sampled_from(AUDIENCE_READERS), min_size=1, unique=True),
)
def test_reader_sees_an_envelope_iff_sender_or_audience(
    audience_crew: Any, sender: str, audience: list[str] | None
) -> None:
    crew, room = audience_crew
    people = {n: getattr(crew, n) for n in AUDIENCE_READERS}
    ids = None if audience is None else [people[n]["id"] for n in audience]
    body: dict[str, Any] = {} if ids is None else {"audience": ids}
    sent = post(crew.as_(people[sender]), room, f"from {sender} to {audience}", **body)
    assert sent.status_code == 201, sent.text
    seq = sent.json()["seq"]
    for reader in AUDIENCE_READERS:
        page = (
            crew.as_(people[reader])
            .get(f"/threads/{room}/messages", params={"after": seq - 1})
            .json()
        )
        visible = [m["seq"] for m in page["items"]]
        expected = audience is None or reader == sender or reader in audience
        assert (seq in visible) == expected, (reader, sender, audience)
        assert page["next_after"] >= seq


# ----------------------------------------------------------------------------- resume


def test_agent_resume_over_rest(crew: Crew) -> None:
    resume = {"capabilities": ["triage"], "domains": ["billing"], "summary": "sorts intake"}
    a = crew.org.agent("Res", "res", resume=resume)
    assert a["resume"] == resume
    assert crew.org.ok("GET", f"/agents/{a['id']}")["resume"] == resume
    patched = crew.org.ok("PATCH", f"/agents/{a['id']}", json={"resume": {"summary": "new"}})
    assert patched["resume"] == {"capabilities": [], "domains": [], "summary": "new"}
    assert crew.org.ok("PATCH", f"/agents/{a['id']}", json={"resume": None})["resume"] is None
    assert crew.org.ok("GET", f"/agents/{crew.ann['id']}")["resume"] is None
    for bad in ({"capabilities": ["x" * 201]}, {"summary": "s" * 4001}, {"skills": []}):
        r = crew.org.http.post(
            "/agents", json={"name": "B", "lookup_key": "bad-resume", "resume": bad}
        )
        assert_error(r, 422, "invalid_request")


@sqlite_only("seeds rows at revision 0005 through sqlite3")
def test_migration_0006_keeps_users_and_defaults_auto_ack(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import create_engine

    from agent_network.services.principal import hash_secret
    from agent_network.store.engine import alembic_config

    db = tmp_path / "m.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    engine.dispose()
    secret = "an_org_" + "m" * 43
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org_m', 'M', 't')")
        conn.execute(
            "INSERT INTO credentials (id, org_id, kind, subject_id, key_hash, scopes, name, "
            "created_at) VALUES ('key_m', 'org_m', 'org_key', 'org_m', ?, "
            "'[\"read\", \"write\"]', '', 't')",
            (hash_secret(secret),),
        )
        conn.execute(
            "INSERT INTO users (id, org_id, name, created_at) VALUES ('usr_m', 'org_m', 'Mo', 't')"
        )
    server = LiveServer(db)
    server.start()
    try:
        with server.client(secret) as http:
            r = http.get("/users/usr_m")
            assert r.status_code == 200, r.text
            assert r.json()["auto_ack"] is False and r.json()["name"] == "Mo"
    finally:
        server.stop()


# ----------------------------------------------------------------------------- SDK


def test_sdk_drives_protocol_threads(crew: Crew) -> None:
    srv = crew.srv

    async def scenario() -> None:
        async with (
            AsyncClient(srv.url, crew.org.key) as org,
            AsyncClient(srv.url, token(crew.org, "agent", crew.ann["id"])) as ann,
            AsyncClient(srv.url, token(crew.org, "agent", crew.bob["id"])) as bob,
            AsyncClient(srv.url, token(crew.org, "user", crew.una["id"])) as una,
        ):
            user = await org.users.create("Sid", auto_ack=True)
            assert user.auto_ack is True
            assert (await org.users.update(user.id, auto_ack=False)).auto_ack is False
            agent = await org.agents.create(
                "Dee", "dee", resume={"capabilities": ["x"], "domains": [], "summary": "s"}
            )
            assert agent.resume is not None and agent.resume.capabilities == ["x"]

            thread = await org.threads.create(
                "ask",
                team_id=crew.team["id"],
                adapter="consulting",
                participants=[("agent", crew.ann["id"]), ("user", crew.una["id"])],
                ttl=300,
            )
            assert isinstance(thread, Thread) and thread.status == "invited"
            assert [p.id for p in thread.pending_acks] == [crew.una["id"]]
            with pytest.raises(ProtocolViolation):
                await ann.threads.post(thread.id, "too early")
            active = await una.threads.ack(thread.id)
            assert active.status == "active" and active.expected_speaker == crew.ann["id"]
            with pytest.raises(NotYourTurn):
                await una.threads.post(thread.id, "me first")
            q = await ann.threads.post(thread.id, "question", audience=[crew.una["id"]])
            assert q.audience == [crew.una["id"]]
            await una.threads.post(thread.id, "answer", causation_id=q.id)
            with pytest.raises(ThreadClosed):
                await ann.threads.post(thread.id, "more")

            conv = await org.threads.create(
                "chat",
                team_id=crew.team["id"],
                adapter="conversation",
                participants=[("agent", crew.ann["id"]), ("agent", crew.bob["id"])],
            )
            with pytest.raises(InvalidAudience):
                await ann.threads.post(conv.id, "x", audience=[crew.cat["id"]])
            await ann.threads.post(conv.id, "for bob only", audience=[crew.bob["id"]])
            cat_page = await org.threads.messages(conv.id)
            assert [m.content for m in cat_page.items] == ["for bob only"]  # own org sees it
            bob_hist = [e.content async for e in bob.threads.history(conv.id, messages_only=True)]
            assert bob_hist == ["for bob only"]
            closed = await bob.threads.close(conv.id, reason="bye")
            assert closed.close_reason == "bye"
            with pytest.raises(ThreadClosed):
                await bob.threads.close(conv.id)

            wf = await org.threads.create(
                "flow",
                team_id=crew.team["id"],
                adapter="workflow",
                participants=[("agent", crew.ann["id"]), ("agent", crew.bob["id"])],
                graph=TransitionGraph.round_robin(["ann", "bob"], max_turns=4),
                invitees=[],
            )
            assert await ann.threads.tools(wf.id) == []
            ctx = await ann.threads.set_context(wf.id, {"stage": "draft"})
            assert ctx.context == {"stage": "draft"} and ctx.turns == 0
            await ann.threads.post(
                wf.id, "draft", tool_calls=[tool_call("handoff", Handoff("ann"))]
            )
            assert (await org.threads.get(wf.id)).expected_speaker == crew.ann["id"]
            rejected = await org.threads.create(
                "no",
                team_id=crew.team["id"],
                adapter="conversation",
                participants=[("agent", crew.ann["id"]), ("user", crew.una["id"])],
            )
            out = await una.threads.reject(rejected.id, reason="busy")
            assert out.close_reason == "invite_rejected"

    anyio.run(scenario)


def test_hubclient_consulting_over_locallink(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with EmbeddedLink.open(tmp_path / "hc.db") as link, HubClient(link) as hc:
            expert = await hc.register(
                Passport(name="Expert"),
                Resume(capabilities=["arithmetic"]),
                handler=lambda env, ch: f"answer to {env.content}",
            )
            asker = await hc.register(Passport(name="Asker"))
            assert (await hc.rest.agents.get(expert.id)).resume.capabilities == ["arithmetic"]  # type: ignore[union-attr]
            channel = await asker.open("q", target="expert", adapter="consulting", ttl=600)
            info = await channel.info()
            assert (info.adapter, info.status) == ("consulting", "active")
            await channel.send("2+2?")
            closed = await asker.wait_for(
                channel.thread_id, lambda e: e.type == "thread.closed", timeout=30
            )
            assert closed.data.get("reason") in (None, "consulting_complete")
            final = await channel.info()
            assert (final.status, final.close_reason) == ("closed", "consulting_complete")
            texts = [e.content for e in await channel.read() if e.type == "message"]
            assert texts == ["2+2?", "answer to 2+2?"]
            with pytest.raises(ThreadClosed):
                await channel.send("again")
            # a person invited to a conversation acks explicitly; both sides may close
            person = await hc.human("Pat")
            talk = await asker.open("talk", target=(), adapter="open")
            assert (await talk.info()).adapter == "open"
            conv = await hc.rest.threads.create(
                "chat",
                team_id=await hc._team(),
                adapter="conversation",
                participants=[("agent", asker.id), ("user", person.id)],
            )
            assert conv.status == "invited"
            assert (await person.ack(conv.id)).status == "active"
            assert (await person.close(conv.id, "done")).close_reason == "done"

    anyio.run(scenario)


def test_org_keys_see_audiences_naming_their_members(module_server: LiveServer) -> None:
    host, guest = new_org(module_server, "aud-host"), new_org(module_server, "aud-guest")
    try:
        h = host.agent("H", "h")
        g, gu = guest.agent("G", "g"), guest.user("Gus")
        net = open_network(
            host, {guest: [("agent", g["id"]), ("user", gu["id"])]}, ("agent", h["id"])
        )
        t = host.ok("POST", f"/networks/{net['id']}/threads", json={"title": "x"})["id"]
        sent = host.http.post(
            f"/threads/{t}/messages",
            json={"content": "to g", "agent_id": h["id"], "audience": [g["id"]]},
        )
        assert sent.status_code == 201, sent.text
        gus = module_server.client(token(guest, "user", gu["id"]))
        try:
            readers = {"host": host.http, "guest": guest.http, "gus": gus}
            seen = {
                name: [m["content"] for m in all_envelopes(http, t, messages_only=True)]
                for name, http in readers.items()
            }
        finally:
            gus.close()
        assert seen == {"host": ["to g"], "guest": ["to g"], "gus": []}
    finally:
        host.http.close()
        guest.http.close()
