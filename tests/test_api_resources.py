"""Every REST resource and verb over a live server: happy paths and their errors."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import httpx
import pytest

from conftest import LiveServer, Org, all_envelopes, assert_error

pytestmark = pytest.mark.engines("sqlite", "postgresql")

# ------------------------------------------------------------------------------------ orgs


def test_org_create_is_admin_only_and_key_is_shown_once(server: LiveServer, make_org) -> None:
    with server.client(server.admin_key) as admin:
        r = admin.post("/orgs", json={"name": "  Acme  "})
        assert r.status_code == 201, r.text
        body = r.json()
        assert set(body) == {"org", "secret"}
        assert body["org"]["name"] == "Acme"
        assert body["org"]["id"].startswith("org_")
        key = body["secret"]
        assert key.startswith("an_org_") and len(key) > 40
        # The admin key owns no org data.
        assert_error(admin.get("/orgs/me"), 403, "permission_denied")
        assert_error(admin.get("/users"), 403, "permission_denied")
        assert_error(admin.post("/orgs", json={"name": ""}), 422, "invalid_request")
        assert_error(admin.post("/orgs", json={"name": "   "}), 422, "invalid_request")
        assert_error(admin.post("/orgs", json={"name": "x", "extra": 1}), 422, "invalid_request")

    with server.client(key) as org:
        me = org.get("/orgs/me")
        assert me.status_code == 200
        assert me.json()["id"] == body["org"]["id"]
        assert me.json()["name"] == "Acme"
        # The secret is never returned again, neither raw nor in any other answer we can read.
        for path in ("/orgs/me", "/audit", "/users", "/agents", "/teams", "/networks"):
            text = org.get(path).text
            assert key not in text
            assert key[len("an_org_") :] not in text
        # An org key cannot create orgs.
        assert_error(org.post("/orgs", json={"name": "Evil"}), 403, "permission_denied")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer an_org_not-a-real-key"},
        {"Authorization": "Bearer an_admin_not-a-real-key"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_missing_or_bad_credentials_answer_401(server: LiveServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers) as c:
        assert_error(c.post("/orgs", json={"name": "x"}), 401, "unauthenticated")
        assert_error(c.get("/orgs/me"), 401, "unauthenticated")
        assert_error(c.get("/threads"), 401, "unauthenticated")
        assert_error(c.get("/audit"), 401, "unauthenticated")


def test_openapi_and_health(server: LiveServer) -> None:
    # the first /openapi.json builds the schema: seconds on a loaded machine
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=60) as c:
        r = c.get("/openapi.json")
        assert r.status_code == 200
        spec = r.json()
        assert spec["info"]["title"] == "Agent Network"
        for path in (
            "/api/v1/orgs",
            "/api/v1/orgs/me",
            "/api/v1/users/{user_id}",
            "/api/v1/agents/{agent_id}/routines/{routine_id}/pause",
            "/api/v1/teams/{team_id}/members",
            "/api/v1/networks/join",
            "/api/v1/threads/{thread_id}/messages",
            "/api/v1/threads/{thread_id}/verify",
            "/api/v1/knowledge/search",
            "/api/v1/audit",
        ):
            assert path in spec["paths"], path
        assert c.get("/health").json()["status"] == "ok"
        assert_error(c.get("/no-such-route"), 404, "not_found")


# ----------------------------------------------------------------------------------- users


def test_users_crud(make_org) -> None:
    a: Org = make_org("A")
    r = a.http.post("/users", json={"name": "Ann", "email": "ann@a.example"})
    assert r.status_code == 201
    ann = r.json()
    assert ann["name"] == "Ann" and ann["email"] == "ann@a.example" and ann["org_id"] == a.id
    bob = a.user("Bob")
    assert bob["email"] is None

    assert [u["id"] for u in a.ok("GET", "/users")] == [ann["id"], bob["id"]]
    assert a.ok("GET", f"/users/{ann['id']}") == ann

    changed = a.ok("PATCH", f"/users/{ann['id']}", json={"name": "Ann B.", "email": "b@a.example"})
    assert changed["name"] == "Ann B." and changed["email"] == "b@a.example"
    assert a.ok("GET", f"/users/{ann['id']}")["name"] == "Ann B."
    # An empty patch changes nothing.
    assert a.ok("PATCH", f"/users/{ann['id']}", json={}) == changed

    assert_error(a.http.post("/users", json={"name": ""}), 422, "invalid_request")
    assert_error(a.http.post("/users", json={"name": "   "}), 422, "invalid_request")
    assert_error(a.http.post("/users", json={}), 422, "invalid_request")
    assert_error(a.http.post("/users", json={"name": "x", "role": "boss"}), 422, "invalid_request")
    assert_error(a.http.patch(f"/users/{ann['id']}", json={"name": "  "}), 422, "invalid_request")
    assert_error(a.http.patch(f"/users/{ann['id']}", json={"nick": "x"}), 422, "invalid_request")

    r = a.http.delete(f"/users/{bob['id']}")
    assert r.status_code == 204 and r.content == b""
    assert_error(a.http.get(f"/users/{bob['id']}"), 404, "not_found")
    assert_error(a.http.patch(f"/users/{bob['id']}", json={"name": "x"}), 404, "not_found")
    assert_error(a.http.delete(f"/users/{bob['id']}"), 404, "not_found")
    assert [u["id"] for u in a.ok("GET", "/users")] == [ann["id"]]
    assert_error(a.http.get("/users/usr_000000000000000000000000"), 404, "not_found")


# ---------------------------------------------------------------------------------- agents


def test_agents_crud(make_org) -> None:
    a: Org = make_org("A")
    r = a.http.post(
        "/agents",
        json={
            "name": "Support Bot",
            "lookup_key": "support-bot",
            "identity": "You help.",
            "model": "test",
            "metadata": {"tier": 1},
        },
    )
    assert r.status_code == 201, r.text
    bot = r.json()
    assert bot["id"].startswith("agt_")
    assert (bot["name"], bot["lookup_key"], bot["identity"], bot["model"], bot["metadata"]) == (
        "Support Bot",
        "support-bot",
        "You help.",
        "test",
        {"tier": 1},
    )
    other = a.agent("Other", "other")
    assert other["model"] is None and other["metadata"] == {}

    assert [x["id"] for x in a.ok("GET", "/agents")] == [bot["id"], other["id"]]
    assert a.ok("GET", f"/agents/{bot['id']}") == bot

    # duplicate lookup_key in the same org -> 409 conflict
    assert_error(
        a.http.post("/agents", json={"name": "Dup", "lookup_key": "support-bot"}), 409, "conflict"
    )
    # invalid lookup keys -> 422
    for bad in ("Support Bot", "UPPER", "-leading", "a/b", "x" * 101, ""):
        assert_error(
            a.http.post("/agents", json={"name": "X", "lookup_key": bad}), 422, "invalid_request"
        )
    # unknown field -> 422 invalid_request
    err = assert_error(
        a.http.post("/agents", json={"name": "X", "lookup_key": "x", "colour": "red"}),
        422,
        "invalid_request",
    )
    assert "colour" in err["message"]
    assert_error(
        a.http.post("/agents", json={"name": "   ", "lookup_key": "x"}), 422, "invalid_request"
    )

    upd = a.ok(
        "PATCH",
        f"/agents/{bot['id']}",
        json={"name": "Helper", "identity": "New.", "metadata": {"tier": 2}},
    )
    assert (upd["name"], upd["identity"], upd["metadata"], upd["lookup_key"]) == (
        "Helper",
        "New.",
        {"tier": 2},
        "support-bot",
    )
    assert a.ok("GET", f"/agents/{bot['id']}")["name"] == "Helper"
    assert_error(
        a.http.patch(f"/agents/{bot['id']}", json={"lookup_key": "other"}), 409, "conflict"
    )
    assert_error(
        a.http.patch(f"/agents/{bot['id']}", json={"lookup_key": "Not Valid"}),
        422,
        "invalid_request",
    )
    assert_error(a.http.patch(f"/agents/{bot['id']}", json={"name": " "}), 422, "invalid_request")
    assert_error(a.http.patch(f"/agents/{bot['id']}", json={"owner": "x"}), 422, "invalid_request")

    r = a.http.delete(f"/agents/{bot['id']}")
    assert r.status_code == 204
    assert_error(a.http.get(f"/agents/{bot['id']}"), 404, "not_found")
    assert_error(a.http.patch(f"/agents/{bot['id']}", json={"name": "x"}), 404, "not_found")
    assert_error(a.http.delete(f"/agents/{bot['id']}"), 404, "not_found")
    assert [x["id"] for x in a.ok("GET", "/agents")] == [other["id"]]
    # a deleted agent frees its lookup_key
    again = a.agent("Support Bot 2", "support-bot")
    assert again["id"] != bot["id"]


def test_same_lookup_key_in_two_orgs_is_fine(make_org) -> None:
    a, b = make_org("A"), make_org("B")
    assert a.agent("X", "same")["org_id"] == a.id
    assert b.agent("X", "same")["org_id"] == b.id


# -------------------------------------------------------------------------------- routines


def test_routines_lifecycle(make_org) -> None:
    a: Org = make_org("A")
    bot = a.agent("Bot", "bot")
    base = f"/agents/{bot['id']}/routines"
    r = a.http.post(base, json={"name": "chat"})
    assert r.status_code == 201, r.text
    rt = r.json()
    assert rt["id"].startswith("rtn_")
    assert (rt["agent_id"], rt["event_type"], rt["handler_type"], rt["preset_name"]) == (
        bot["id"],
        "thread.message_added",
        "preset",
        "participate",
    )
    assert rt["status"] == "active" and rt["config"] == {}
    rt2 = a.ok("POST", base, json={"name": "second", "config": {"k": 1}})
    assert [x["id"] for x in a.ok("GET", base)] == [rt["id"], rt2["id"]]

    upd = a.ok("PATCH", f"{base}/{rt['id']}", json={"name": "renamed", "config": {"a": 2}})
    assert (upd["name"], upd["config"], upd["status"]) == ("renamed", {"a": 2}, "active")
    assert a.ok("POST", f"{base}/{rt['id']}/pause")["status"] == "paused"
    assert a.ok("GET", base)[0]["status"] == "paused"
    assert a.ok("POST", f"{base}/{rt['id']}/activate")["status"] == "active"
    assert a.ok("PATCH", f"{base}/{rt['id']}", json={"status": "paused"})["status"] == "paused"
    assert_error(
        a.http.patch(f"{base}/{rt['id']}", json={"status": "sleeping"}), 422, "invalid_request"
    )
    assert_error(
        a.http.patch(f"{base}/{rt['id']}", json={"preset_name": "x"}), 422, "invalid_request"
    )

    # bad preset / event / handler / missing name -> 422
    for body in (
        {"name": "x", "preset_name": "world-domination"},
        {"name": "x", "preset_name": None},
        {"name": "x", "event_type": "thread.deleted"},
        {"name": "x", "handler_type": "webhook"},
        {"preset_name": "participate"},
        {"name": ""},
    ):
        assert_error(a.http.post(base, json=body), 422, "invalid_request")

    r = a.http.delete(f"{base}/{rt['id']}")
    assert r.status_code == 204
    assert [x["id"] for x in a.ok("GET", base)] == [rt2["id"]]
    assert_error(a.http.delete(f"{base}/{rt['id']}"), 404, "not_found")
    assert_error(a.http.patch(f"{base}/{rt['id']}", json={"name": "x"}), 404, "not_found")
    assert_error(a.http.post(f"{base}/{rt['id']}/pause"), 404, "not_found")
    assert_error(a.http.post(f"{base}/{rt['id']}/activate"), 404, "not_found")
    # a routine id under the wrong agent is not found
    other = a.agent("Other", "other")
    assert_error(a.http.post(f"/agents/{other['id']}/routines/{rt2['id']}/pause"), 404, "not_found")
    assert_error(a.http.get("/agents/agt_000000000000000000000000/routines"), 404, "not_found")
    assert_error(
        a.http.post("/agents/agt_000000000000000000000000/routines", json={"name": "x"}),
        404,
        "not_found",
    )
    # deleting the agent pauses its routines (they are not listed any more: agent is gone)
    a.ok("DELETE", f"/agents/{bot['id']}")
    assert_error(a.http.get(base), 404, "not_found")


def test_routine_with_unavailable_model_is_refused_at_creation(
    make_org, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    a: Org = make_org("A")
    gpt = a.agent("GPT", "gpt", model="openai:gpt-4o")
    err = assert_error(
        a.http.post(f"/agents/{gpt['id']}/routines", json={"name": "chat"}),
        422,
        "model_unavailable",
    )
    assert "openai:gpt-4o" in err["message"]
    assert a.ok("GET", f"/agents/{gpt['id']}/routines") == []
    for bad_model in ("nonsense-model-name", "local:other", "nope:thing"):
        a.ok("PATCH", f"/agents/{gpt['id']}", json={"model": bad_model})
        assert_error(
            a.http.post(f"/agents/{gpt['id']}/routines", json={"name": "chat"}),
            422,
            "model_unavailable",
        )
    # the configured default ("test") is fine
    a.ok("PATCH", f"/agents/{gpt['id']}", json={"model": None})
    assert (
        a.ok("POST", f"/agents/{gpt['id']}/routines", json={"name": "chat"})["status"] == "active"
    )


# ----------------------------------------------------------------------------------- teams


def test_teams_crud_members_and_threads(make_org) -> None:
    a: Org = make_org("A")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    r = a.http.post("/teams", json={"name": "Core", "description": "the core team"})
    assert r.status_code == 201
    team = r.json()
    assert team["id"].startswith("team_")
    assert (team["kind"], team["status"], team["org_id"], team["description"]) == (
        "team",
        "open",
        a.id,
        "the core team",
    )
    assert [t["id"] for t in a.ok("GET", "/teams")] == [team["id"]]
    assert a.ok("GET", f"/teams/{team['id']}") == team
    assert a.ok("PATCH", f"/teams/{team['id']}", json={"name": "Core 2"})["name"] == "Core 2"
    assert_error(a.http.patch(f"/teams/{team['id']}", json={"name": " "}), 422, "invalid_request")
    assert_error(a.http.post("/teams", json={"name": ""}), 422, "invalid_request")
    assert_error(
        a.http.post("/teams", json={"name": "x", "kind": "network"}), 422, "invalid_request"
    )

    mbase = f"/teams/{team['id']}/members"
    r = a.http.post(mbase, json={"agent_id": bot["id"]})
    assert r.status_code == 201
    assert r.json() == {
        "kind": "agent",
        "id": bot["id"],
        "name": "Bot",
        "role": "member",
        "org_id": a.id,
    }
    a.ok("POST", mbase, json={"user_id": ann["id"], "role": "owner"})
    # adding twice is harmless
    a.ok("POST", mbase, json={"user_id": ann["id"], "role": "owner"})
    members = a.ok("GET", mbase)
    assert sorted((m["kind"], m["id"], m["role"], m["org_name"]) for m in members) == sorted(
        [("agent", bot["id"], "member", "A"), ("user", ann["id"], "owner", "A")]
    )
    both = {"agent_id": bot["id"], "user_id": ann["id"]}
    assert_error(a.http.post(mbase, json=both), 422, "invalid_request")
    assert_error(a.http.post(mbase, json={}), 422, "invalid_request")
    assert_error(
        a.http.post(mbase, json={"user_id": ann["id"], "role": "king"}), 422, "invalid_request"
    )
    assert_error(
        a.http.post(mbase, json={"agent_id": "agt_000000000000000000000000"}), 404, "not_found"
    )

    r = a.http.delete(f"{mbase}/agent/{bot['id']}")
    assert r.status_code == 204
    assert [m["id"] for m in a.ok("GET", mbase)] == [ann["id"]]
    assert_error(a.http.delete(f"{mbase}/agent/{bot['id']}"), 404, "not_found")

    tbase = f"/teams/{team['id']}/threads"
    r = a.http.post(tbase, json={"title": " Planning "})
    assert r.status_code == 201
    th = r.json()
    assert (th["title"], th["team_id"], th["org_id"], th["status"], th["last_seq"]) == (
        "Planning",
        team["id"],
        a.id,
        "open",
        1,
    )
    assert th["agent_budget"] == 4 and th["adapter"] == "open"
    th2 = a.ok("POST", tbase, json={"title": "Budgeted", "agent_budget": 2})
    assert th2["agent_budget"] == 2
    assert [t["id"] for t in a.ok("GET", tbase)] == [th["id"], th2["id"]]
    assert_error(a.http.post(tbase, json={"title": ""}), 422, "invalid_request")
    assert_error(a.http.post(tbase, json={"title": "   "}), 422, "invalid_request")
    assert_error(
        a.http.post(tbase, json={"title": "x", "agent_budget": -1}), 422, "invalid_request"
    )
    assert_error(
        a.http.post(tbase, json={"title": "x", "agent_budget": 1001}), 422, "invalid_request"
    )

    r = a.http.delete(f"/teams/{team['id']}")
    assert r.status_code == 204
    assert_error(a.http.get(f"/teams/{team['id']}"), 404, "not_found")
    assert_error(a.http.get(tbase), 404, "not_found")
    assert_error(a.http.get(f"/threads/{th['id']}"), 404, "not_found")
    assert a.ok("GET", "/teams") == []
    assert a.ok("GET", "/threads") == []
    assert_error(a.http.delete(f"/teams/{team['id']}"), 404, "not_found")
    assert_error(a.http.post(tbase, json={"title": "x"}), 404, "not_found")


# -------------------------------------------------------------------------------- networks


def _network(host: Org, name: str = "Net") -> dict[str, Any]:
    r = host.http.post("/networks", json={"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _invite(host: Org, net_id: str, **kw: Any) -> dict[str, Any]:
    r = host.http.post(f"/networks/{net_id}/invites", json=kw)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_networks_invites_and_join(make_org) -> None:
    host, guest, third = make_org("Host"), make_org("Guest"), make_org("Third")
    net = _network(host)
    assert net["id"].startswith("net_") and net["kind"] == "network" and net["org_id"] == host.id
    assert [n["id"] for n in host.ok("GET", "/networks")] == [net["id"]]
    assert guest.ok("GET", "/networks") == []
    # a network is not a team
    assert host.ok("GET", "/teams") == []
    assert_error(host.http.get(f"/teams/{net['id']}"), 404, "not_found")
    assert_error(host.http.delete(f"/teams/{net['id']}"), 404, "not_found")

    inv = _invite(host, net["id"])
    code = inv["join_code"]
    assert len(code) == 12 and inv["network_id"] == net["id"] and inv["max_uses"] is None
    assert_error(
        host.http.post(f"/networks/{net['id']}/invites", json={"expires_in": 0}),
        422,
        "invalid_request",
    )
    assert_error(
        host.http.post(f"/networks/{net['id']}/invites", json={"max_uses": 0}),
        422,
        "invalid_request",
    )

    # the host cannot join its own network
    assert_error(host.http.post("/networks/join", json={"code": code}), 409, "conflict")
    # wrong codes
    assert_error(
        guest.http.post("/networks/join", json={"code": "WRONGCODE234"}), 404, "invite_invalid"
    )
    assert_error(guest.http.post("/networks/join", json={"code": ""}), 422, "invalid_request")

    gbot, gann = guest.agent("Guest Bot", "gbot"), guest.user("Gina")
    # joining with an agent of another org fails and admits nobody
    hbot = host.agent("Host Bot", "hbot")
    assert_error(
        guest.http.post("/networks/join", json={"code": code, "agent_ids": [hbot["id"]]}),
        404,
        "not_found",
    )
    assert guest.ok("GET", "/networks") == []

    # codes are case/separator-insensitive
    pretty = f"{code[:4]}-{code[4:8]}-{code[8:]}".lower()
    r = guest.http.post(
        "/networks/join", json={"code": pretty, "agent_ids": [gbot["id"]], "user_ids": [gann["id"]]}
    )
    assert r.status_code == 200, r.text
    joined = r.json()
    assert joined["network"]["id"] == net["id"] and joined["visa_id"].startswith("visa_")
    assert sorted(m["id"] for m in joined["members"]) == sorted([gbot["id"], gann["id"]])
    assert [n["id"] for n in guest.ok("GET", "/networks")] == [net["id"]]
    assert guest.ok("GET", f"/networks/{net['id']}")["org_id"] == host.id
    # joining again reuses the visa
    again = guest.ok("POST", "/networks/join", json={"code": code})
    assert again["visa_id"] == joined["visa_id"]

    members = host.ok("GET", f"/networks/{net['id']}/members")
    assert {(m["id"], m["org_name"]) for m in members} == {
        (gbot["id"], "Guest"),
        (gann["id"], "Guest"),
    }
    host.ok("POST", f"/networks/{net['id']}/members", json={"agent_id": hbot["id"]})
    assert len(guest.ok("GET", f"/networks/{net['id']}/members")) == 3

    # guest (visa) may add its own members, not create invites, rename or close
    gbot2 = guest.agent("Guest Bot 2", "gbot2")
    guest.ok("POST", f"/networks/{net['id']}/members", json={"agent_id": gbot2["id"]})
    assert_error(
        guest.http.post(f"/networks/{net['id']}/invites", json={}), 403, "permission_denied"
    )
    assert_error(
        guest.http.patch(f"/networks/{net['id']}", json={"name": "x"}), 403, "permission_denied"
    )
    assert_error(guest.http.post(f"/networks/{net['id']}/close"), 403, "permission_denied")
    # guest can remove its own member but not the host's
    assert (
        guest.http.delete(f"/networks/{net['id']}/members/agent/{gbot2['id']}").status_code == 204
    )
    assert_error(
        guest.http.delete(f"/networks/{net['id']}/members/agent/{hbot['id']}"), 404, "not_found"
    )
    assert (
        host.ok("PATCH", f"/networks/{net['id']}", json={"description": "d"})["description"] == "d"
    )

    # a third org without a visa sees nothing
    assert_error(third.http.get(f"/networks/{net['id']}"), 404, "not_found")
    assert_error(third.http.get(f"/networks/{net['id']}/members"), 404, "not_found")


def test_invite_expiry_and_max_uses(make_org) -> None:
    host, g1, g2, g3 = make_org("Host"), make_org("G1"), make_org("G2"), make_org("G3")
    net = _network(host)

    short = _invite(host, net["id"], expires_in=0.05)
    time.sleep(0.2)
    assert_error(
        g1.http.post("/networks/join", json={"code": short["join_code"]}), 404, "invite_invalid"
    )
    assert g1.ok("GET", "/networks") == []

    once = _invite(host, net["id"], max_uses=2)
    assert once["max_uses"] == 2
    g1.ok("POST", "/networks/join", json={"code": once["join_code"]})
    g2.ok("POST", "/networks/join", json={"code": once["join_code"]})
    err = assert_error(
        g3.http.post("/networks/join", json={"code": once["join_code"]}), 404, "invite_invalid"
    )
    # wrong, expired and used-up codes are indistinguishable
    wrong = assert_error(
        g3.http.post("/networks/join", json={"code": "ZZZZZZZZZZZZ"}), 404, "invite_invalid"
    )
    assert err["message"] == wrong["message"]
    assert g3.ok("GET", "/networks") == []
    assert [n["id"] for n in g2.ok("GET", "/networks")] == [net["id"]]


def test_close_network_makes_threads_read_only_but_readable(make_org) -> None:
    host, guest = make_org("Host"), make_org("Guest")
    hu, gu = host.user("Hana"), guest.user("Gus")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    late_code = _invite(host, net["id"])["join_code"]
    guest.ok("POST", "/networks/join", json={"code": code, "user_ids": [gu["id"]]})
    host.ok("POST", f"/networks/{net['id']}/members", json={"user_id": hu["id"]})
    th = host.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Shared"})
    gth = guest.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Guest-made"})
    assert gth["org_id"] == guest.id
    host.ok(
        "POST", f"/threads/{th['id']}/messages", json={"content": "from host", "user_id": hu["id"]}
    )
    guest.ok(
        "POST", f"/threads/{th['id']}/messages", json={"content": "from guest", "user_id": gu["id"]}
    )

    r = host.http.post(f"/networks/{net['id']}/close")
    assert r.status_code == 200
    assert r.json()["status"] == "closed" and r.json()["closed_at"]
    # closing twice is fine
    assert host.ok("POST", f"/networks/{net['id']}/close")["status"] == "closed"

    for org, uid in ((host, hu["id"]), (guest, gu["id"])):
        for tid in (th["id"], gth["id"]):
            assert_error(
                org.http.post(f"/threads/{tid}/messages", json={"content": "late", "user_id": uid}),
                409,
                "thread_closed",
            )
            assert org.ok("GET", f"/threads/{tid}")["status"] == "closed"
        assert_error(
            org.http.post(f"/networks/{net['id']}/threads", json={"title": "new"}),
            409,
            "thread_closed",
        )
        msgs = org.ok("GET", f"/threads/{th['id']}/messages")["items"]
        assert [m["content"] for m in msgs] == ["from host", "from guest"]
        assert org.ok("GET", f"/threads/{th['id']}/verify")["ok"] is True
        assert {t["id"] for t in org.ok("GET", "/threads")} == {th["id"], gth["id"]}
    envs = all_envelopes(host.http, th["id"])
    assert envs[-1]["type"] == "thread.closed"
    assert_error(
        host.http.post(f"/networks/{net['id']}/members", json={"user_id": host.user("New")["id"]}),
        409,
        "thread_closed",
    )
    assert_error(host.http.post(f"/networks/{net['id']}/invites", json={}), 409, "thread_closed")
    latecomer = make_org("Late")
    assert_error(
        latecomer.http.post("/networks/join", json={"code": late_code}), 404, "invite_invalid"
    )


# --------------------------------------------------------------------------------- threads


def _team_thread(org: Org, *members: tuple[str, str], title: str = "T") -> dict[str, Any]:
    team = org.team("Team", *members)
    return dict(org.ok("POST", f"/teams/{team['id']}/threads", json={"title": title}))


def test_thread_get_list_post_and_cursor(make_org) -> None:
    a: Org = make_org("A")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    th = _team_thread(a, ("user", ann["id"]), ("agent", bot["id"]))
    tid = th["id"]
    assert a.ok("GET", f"/threads/{tid}") == th
    assert [t["id"] for t in a.ok("GET", "/threads")] == [tid]

    posted = []
    for i in range(7):
        sender = {"user_id": ann["id"]} if i % 2 == 0 else {"agent_id": bot["id"]}
        r = a.http.post(f"/threads/{tid}/messages", json={"content": f"m{i}", **sender})
        assert r.status_code == 201, r.text
        posted.append(r.json())
    assert [p["seq"] for p in posted] == list(range(2, 9))
    first = posted[0]
    assert first["type"] == "message" and first["content"] == "m0"
    assert first["sender"] == {
        "kind": "user",
        "id": ann["id"],
        "name": "Ann",
        "org_id": a.id,
        "org_name": "A",
    }
    assert posted[1]["sender"]["kind"] == "agent" and posted[1]["sender"]["name"] == "Bot"
    assert first["prev_hash"] != first["hash"] and len(first["hash"]) == 64
    state = a.ok("GET", f"/threads/{tid}")
    assert state["last_seq"] == 8 and state["consecutive_agent_messages"] == 0

    # page through with after/limit/next_after
    seen: list[str] = []
    after = 0
    pages = 0
    while True:
        body = a.ok("GET", f"/threads/{tid}/messages", params={"after": after, "limit": 3})
        if not body["items"]:
            assert body["next_after"] == after
            break
        pages += 1
        assert len(body["items"]) <= 3
        seen += [m["content"] for m in body["items"]]
        assert body["next_after"] == body["items"][-1]["seq"]
        after = body["next_after"]
    assert seen == [f"m{i}" for i in range(7)]
    assert pages == 3
    body = a.ok("GET", f"/threads/{tid}/messages", params={"after": 5, "limit": 2})
    assert [m["seq"] for m in body["items"]] == [6, 7] and body["next_after"] == 7
    # envelopes include the thread.created event
    envs = a.ok("GET", f"/threads/{tid}/envelopes")["items"]
    assert [e["type"] for e in envs] == ["thread.created"] + ["message"] * 7
    assert envs[0]["data"]["title"] == "T" and envs[0]["sender"]["kind"] == "system"
    for prev, cur in itertools.pairwise(envs):
        assert cur["prev_hash"] == prev["hash"]

    for params in (
        {"limit": 0},
        {"limit": 1001},
        {"after": -1},
        {"wait": 61},
        {"wait": -1},
        {"after": "x"},
    ):
        assert_error(a.http.get(f"/threads/{tid}/messages", params=params), 422, "invalid_request")

    assert_error(a.http.get("/threads/thr_000000000000000000000000"), 404, "not_found")
    assert_error(a.http.get("/threads/thr_000000000000000000000000/messages"), 404, "not_found")


def test_post_errors(make_org) -> None:
    a: Org = make_org("A")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    outsider_user, outsider_agent = a.user("Out"), a.agent("Out", "out")
    th = _team_thread(a, ("user", ann["id"]), ("agent", bot["id"]))
    url = f"/threads/{th['id']}/messages"
    assert_error(
        a.http.post(url, json={"content": "x", "user_id": outsider_user["id"]}),
        403,
        "permission_denied",
    )
    assert_error(
        a.http.post(url, json={"content": "x", "agent_id": outsider_agent["id"]}),
        403,
        "permission_denied",
    )
    assert_error(
        a.http.post(url, json={"content": "x", "user_id": ann["id"], "agent_id": bot["id"]}),
        422,
        "invalid_request",
    )
    assert_error(a.http.post(url, json={"content": "x"}), 422, "invalid_request")
    assert_error(
        a.http.post(url, json={"content": "", "user_id": ann["id"]}), 422, "invalid_request"
    )
    assert_error(
        a.http.post(url, json={"content": "  \n ", "user_id": ann["id"]}), 422, "invalid_request"
    )
    assert_error(a.http.post(url, json={"user_id": ann["id"]}), 422, "invalid_request")
    assert_error(
        a.http.post(url, json={"content": "x" * 32_001, "user_id": ann["id"]}),
        422,
        "invalid_request",
    )
    assert_error(
        a.http.post(url, json={"content": "x", "user_id": ann["id"], "sender": "me"}),
        422,
        "invalid_request",
    )
    assert_error(
        a.http.post(url, json={"content": "x", "user_id": ann["id"], "idempotency_key": ""}),
        422,
        "invalid_request",
    )
    assert_error(
        a.http.post(url, content=b"not json", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    assert_error(
        a.http.post(url, json={"content": "x", "user_id": "usr_000000000000000000000000"}),
        404,
        "not_found",
    )
    # a deleted user can no longer post
    a.ok("DELETE", f"/users/{ann['id']}")
    assert_error(a.http.post(url, json={"content": "x", "user_id": ann["id"]}), 404, "not_found")
    # nothing of the above was appended
    assert a.ok("GET", f"/threads/{th['id']}")["last_seq"] == 1
    assert a.ok("GET", url)["items"] == []


def test_long_poll_returns_when_a_message_arrives(server: LiveServer, make_org) -> None:
    a: Org = make_org("A")
    ann = a.user("Ann")
    th = _team_thread(a, ("user", ann["id"]))
    url = f"/threads/{th['id']}/messages"

    # nothing arrives: returns empty after about `wait`
    t0 = time.monotonic()
    body = a.ok("GET", url, params={"after": 1, "wait": 0.4})
    elapsed = time.monotonic() - t0
    assert body == {"items": [], "next_after": 1}
    assert 0.35 <= elapsed < 3

    def post_later() -> None:
        time.sleep(0.5)
        with server.client(a.key) as c:
            r = c.post(url, json={"content": "wake up", "user_id": ann["id"]})
            assert r.status_code == 201

    poster = threading.Thread(target=post_later)
    t0 = time.monotonic()
    poster.start()
    body = a.ok("GET", url, params={"after": 1, "wait": 20})
    elapsed = time.monotonic() - t0
    poster.join()
    assert [m["content"] for m in body["items"]] == ["wake up"]
    assert body["next_after"] == 2
    assert 0.4 <= elapsed < 5, elapsed
    # already there: returns at once
    t0 = time.monotonic()
    assert a.ok("GET", url, params={"after": 0, "wait": 20})["items"][0]["content"] == "wake up"
    assert time.monotonic() - t0 < 2


def test_thread_budget_patch_and_verify(make_org) -> None:
    a, other = make_org("A"), make_org("Other")
    ann = a.user("Ann")
    th = _team_thread(a, ("user", ann["id"]))
    assert a.ok("PATCH", f"/threads/{th['id']}", json={"agent_budget": 0})["agent_budget"] == 0
    assert a.ok("GET", f"/threads/{th['id']}")["agent_budget"] == 0
    assert_error(
        a.http.patch(f"/threads/{th['id']}", json={"agent_budget": -1}), 422, "invalid_request"
    )
    assert_error(a.http.patch(f"/threads/{th['id']}", json={}), 422, "invalid_request")
    assert_error(
        other.http.patch(f"/threads/{th['id']}", json={"agent_budget": 3}), 404, "not_found"
    )
    a.ok("POST", f"/threads/{th['id']}/messages", json={"content": "hi", "user_id": ann["id"]})
    v = a.ok("GET", f"/threads/{th['id']}/verify")
    assert v == {
        "thread_id": th["id"],
        "ok": True,
        "checked": 3,
        "first_bad_seq": None,
        "reason": None,
    }
    types = [e["type"] for e in a.ok("GET", f"/threads/{th['id']}/envelopes")["items"]]
    assert types == ["thread.created", "thread.budget_set", "message"]


def test_network_thread_budget_may_be_set_by_host_or_creator_only(make_org) -> None:
    host, g1, g2 = make_org("Host"), make_org("G1"), make_org("G2")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    g1.ok("POST", "/networks/join", json={"code": code})
    g2.ok("POST", "/networks/join", json={"code": code})
    th = g1.ok("POST", f"/networks/{net['id']}/threads", json={"title": "by g1"})
    assert g1.ok("PATCH", f"/threads/{th['id']}", json={"agent_budget": 2})["agent_budget"] == 2
    assert host.ok("PATCH", f"/threads/{th['id']}", json={"agent_budget": 3})["agent_budget"] == 3
    assert_error(
        g2.http.patch(f"/threads/{th['id']}", json={"agent_budget": 9}), 403, "permission_denied"
    )


def test_audit_lists_own_acts_only(make_org) -> None:
    a, b = make_org("A"), make_org("B")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    team = a.team("T", ("user", ann["id"]))
    b_user = b.user("Bea")
    log = a.ok("GET", "/audit")
    actions = [(e["action"], e["resource_id"]) for e in log]
    assert actions[:5] == [
        ("org.create", a.id),
        ("user.create", ann["id"]),
        ("agent.create", bot["id"]),
        ("team.create", team["id"]),
        ("team.member_add", team["id"]),
    ]
    assert all(e["org_id"] == a.id for e in log)
    assert all(e["outcome"] == "accepted" for e in log)
    assert b_user["id"] not in a.http.get("/audit").text
    assert b.id not in a.http.get("/audit").text
    assert [e["resource_id"] for e in a.ok("GET", "/audit", params={"action": "user.create"})] == [
        ann["id"]
    ]
    assert [e["action"] for e in a.ok("GET", "/audit", params={"resource_id": bot["id"]})] == [
        "agent.create"
    ]
    assert a.ok("GET", "/audit", params={"outcome": "refused"}) == []
    page = a.ok("GET", "/audit", params={"limit": 2})
    assert len(page) == 2
    rest = a.ok("GET", "/audit", params={"after_id": page[-1]["id"]})
    assert [e["id"] for e in page + rest] == [e["id"] for e in log]
    assert_error(a.http.get("/audit", params={"limit": 0}), 422, "invalid_request")
    assert_error(a.http.get("/audit", params={"limit": 1001}), 422, "invalid_request")


# ------------------------------------------------------------------------- known src bugs


def test_closing_a_network_closes_threads_whatever_keys_members_used(make_org) -> None:
    host, guest = make_org("Host"), make_org("Guest")
    gu = guest.user("Gus")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    guest.ok("POST", "/networks/join", json={"code": code, "user_ids": [gu["id"]]})
    th = guest.ok("POST", f"/networks/{net['id']}/threads", json={"title": "t"})
    guest.ok(
        "POST",
        f"/threads/{th['id']}/messages",
        json={"content": "hi", "user_id": gu["id"], "idempotency_key": "network_closed"},
    )
    assert host.ok("POST", f"/networks/{net['id']}/close")["status"] == "closed"
    assert guest.ok("GET", f"/threads/{th['id']}")["status"] == "closed"
    assert_error(
        guest.http.post(
            f"/threads/{th['id']}/messages", json={"content": "after close", "user_id": gu["id"]}
        ),
        409,
        "thread_closed",
    )


def _null_patch_targets(a: Org) -> dict[str, str]:
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    rt = a.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "r"})
    return {
        "user": f"/users/{ann['id']}",
        "agent": f"/agents/{bot['id']}",
        "routine": f"/agents/{bot['id']}/routines/{rt['id']}",
        "team": f"/teams/{a.team('T')['id']}",
        "network": f"/networks/{_network(a)['id']}",
    }


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("user", "name"),
        ("agent", "name"),
        ("agent", "lookup_key"),
        ("agent", "identity"),
        ("agent", "metadata"),
        ("routine", "name"),
        ("routine", "config"),
        ("team", "name"),
        ("team", "description"),
        ("network", "name"),
    ],
)
def test_patch_with_null_for_a_required_field_is_rejected(
    server: LiveServer, make_org, target: str, field: str
) -> None:
    a: Org = make_org("A")
    url = _null_patch_targets(a)[target]
    before = a.ok("GET", url) if target != "routine" else None
    with server.client(a.key) as c:
        r = c.patch(url, json={field: None})
    if r.status_code == 200:
        # acceptable only if the field kept a real value
        assert r.json()[field] is not None, f"{field} became null"
    else:
        assert_error(r, 422, "invalid_request")
    if before is not None:
        assert a.ok("GET", url)[field] == before[field]


@pytest.mark.parametrize(
    "case", ["messages_after", "envelopes_after", "audit_after_id", "max_uses"]
)
def test_huge_integers_are_rejected_not_crashing(server: LiveServer, make_org, case: str) -> None:
    a: Org = make_org("A")
    ann = a.user("Ann")
    th = _team_thread(a, ("user", ann["id"]))
    net = _network(a)
    big = 10**20
    with server.client(a.key) as c:
        r = {
            "messages_after": lambda: c.get(f"/threads/{th['id']}/messages", params={"after": big}),
            "envelopes_after": lambda: c.get(
                f"/threads/{th['id']}/envelopes", params={"after": big}
            ),
            "audit_after_id": lambda: c.get("/audit", params={"after_id": big}),
            "max_uses": lambda: c.post(f"/networks/{net['id']}/invites", json={"max_uses": big}),
        }[case]()
    if r.status_code == 200:
        assert r.json()["items"] == []
    else:
        assert_error(r, 422, "invalid_request")
