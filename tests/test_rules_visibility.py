"""Restricted threads (visibility widened, never narrowed) and agent rules enforced by the hub's
paths: every rule refuses what it names, and the refusal is audited."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agent_network.runtime.models import register_model
from conftest import LiveServer, Org, assert_error, open_network, settle

ALWAYS = "fn:rules-always-answers"


@pytest.fixture(autouse=True)
def always_answers() -> Iterator[None]:
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("Noted, on it.")])

    register_model(ALWAYS, FunctionModel(answer))
    yield
    register_model(ALWAYS, None)


def _participating_agent(org: Org, name: str, key: str, **rule: Any) -> dict[str, Any]:
    agent = org.agent(name, key, model=ALWAYS)
    org.ok("POST", f"/agents/{agent['id']}/routines", json={"name": "p"})
    if rule:
        org.ok("PUT", f"/agents/{agent['id']}/rule", json=rule)
    return agent


def _replies(org: Org, tid: str, agent_id: str) -> list[dict[str, Any]]:
    items = org.ok("GET", f"/threads/{tid}/messages", params={"limit": 1000})["items"]
    return [m for m in items if m["sender"]["id"] == agent_id]


def _refusals(org: Org, needle: str) -> list[dict[str, Any]]:
    return [
        r
        for r in org.ok("GET", "/audit", params={"outcome": "refused", "limit": 1000})
        if needle in (r["reason"] or "")
    ]


# ------------------------------------------------------------------ restricted threads


def test_restricted_thread_is_seen_only_by_its_participants(server: LiveServer, make_org) -> None:
    host, guest, third = make_org("Host"), make_org("Guest"), make_org("Third")
    h_user, h_other = host.user("Hana"), host.user("Otto")
    g_user, t_user = guest.user("Gus"), third.user("Tia")
    net = open_network(
        host,
        {guest: [("user", g_user["id"])], third: [("user", t_user["id"])]},
        ("user", h_user["id"]),
        ("user", h_other["id"]),
    )
    body = {
        "title": "side",
        "visibility": "restricted",
        "participants": [
            {"kind": "user", "id": h_user["id"]},
            {"kind": "user", "id": g_user["id"]},
        ],
    }
    th = host.ok("POST", f"/networks/{net['id']}/threads", json=body)
    assert th["visibility"] == "restricted"
    guest.ok(
        "POST",
        f"/threads/{th['id']}/messages",
        json={"content": "secret-plan-42", "user_id": g_user["id"]},
    )
    # the third org takes no part: 404 and absent from listings
    assert_error(third.http.get(f"/threads/{th['id']}"), 404, "not_found")
    assert th["id"] not in {t["id"] for t in third.ok("GET", "/threads")}
    assert "secret-plan-42" not in third.http.get(f"/networks/{net['id']}/threads").text
    # a person of the host org who is no participant: their token sees nothing of it
    tok = host.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": h_other["id"]})
    with server.client(tok["secret"]) as http:
        assert_error(http.get(f"/threads/{th['id']}"), 404, "not_found")
        assert_error(
            http.post(f"/threads/{th['id']}/messages", json={"content": "x"}), 404, "not_found"
        )
    # narrowing is refused; a non-member cannot be added; widening lets the third org in
    members_th = host.ok("POST", f"/networks/{net['id']}/threads", json={"title": "open"})
    assert_error(
        host.http.patch(f"/threads/{members_th['id']}", json={"visibility": "restricted"}),
        422,
        "invalid_request",
    )
    outsider = host.agent("Outsider", "outsider")
    assert_error(
        host.http.post(
            f"/threads/{th['id']}/participants",
            json={"participants": [{"kind": "agent", "id": outsider["id"]}]},
        ),
        422,
        "invalid_request",
    )
    host.ok(
        "POST",
        f"/threads/{th['id']}/participants",
        json={"participants": [{"kind": "user", "id": h_other["id"]}]},
    )
    with server.client(tok["secret"]) as http:
        assert http.get(f"/threads/{th['id']}").status_code == 200
    host.ok("PATCH", f"/threads/{th['id']}", json={"visibility": "members"})
    assert third.ok("GET", f"/threads/{th['id']}")["visibility"] == "members"
    types = [e["type"] for e in host.ok("GET", f"/threads/{th['id']}/envelopes")["items"]]
    assert types[-2:] == ["thread.participants_added", "thread.visibility_set"]
    assert host.ok("GET", f"/threads/{th['id']}/verify")["ok"] is True


def test_agent_outside_a_restricted_thread_never_answers(server: LiveServer, make_org) -> None:
    a = make_org("Acme")
    u = a.user("U")
    inside = _participating_agent(a, "Inside", "inside")
    outside = _participating_agent(a, "Outside", "outside")
    team = a.team("T", ("user", u["id"]), ("agent", inside["id"]), ("agent", outside["id"]))
    th = a.ok(
        "POST",
        f"/teams/{team['id']}/threads",
        json={
            "title": "r",
            "visibility": "restricted",
            "agent_budget": 1,
            "participants": [
                {"kind": "user", "id": u["id"]},
                {"kind": "agent", "id": inside["id"]},
            ],
        },
    )
    a.ok("POST", f"/threads/{th['id']}/messages", json={"content": "hello", "user_id": u["id"]})
    settle(server, a.http, th["id"])
    assert len(_replies(a, th["id"], inside["id"])) == 1
    assert _replies(a, th["id"], outside["id"]) == []


# ------------------------------------------------------------------------------ rules


def test_inbound_from_and_outbound_to(server: LiveServer, make_org) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    alex, sam = acme.user("Alex"), globex.user("Sam")
    picky = _participating_agent(acme, "Picky", "picky", inbound_from=["org:Acme"])
    shy = _participating_agent(acme, "Shy", "shy", outbound_to=["org:Acme"])
    net = open_network(
        acme,
        {globex: [("user", sam["id"])]},
        ("user", alex["id"]),
        ("agent", picky["id"]),
        ("agent", shy["id"]),
    )
    th = acme.ok("POST", f"/networks/{net['id']}/threads", json={"title": "t", "agent_budget": 1})
    globex.ok(
        "POST",
        f"/threads/{th['id']}/messages",
        json={"content": "from Globex", "user_id": sam["id"]},
    )
    settle(server, acme.http, th["id"])
    assert _replies(acme, th["id"], picky["id"]) == []  # Globex may not trigger it
    assert _replies(acme, th["id"], shy["id"]) == []  # it may not talk where Globex listens
    assert _refusals(acme, "inbound_from does not admit 'Sam'")
    assert _refusals(acme, "outbound_to does not admit 'Sam'")
    acme.ok(
        "POST",
        f"/threads/{th['id']}/messages",
        json={"content": "from Acme", "user_id": alex["id"]},
    )
    settle(server, acme.http, th["id"])
    assert len(_replies(acme, th["id"], picky["id"])) == 1
    # the REST path enforces the same rule for an agent posting directly
    assert_error(
        acme.http.post(
            f"/threads/{th['id']}/messages", json={"content": "x", "agent_id": shy["id"]}
        ),
        403,
        "rule_violation",
    )
    # the other org's audit log shows none of this
    assert not _refusals(globex, "outbound_to")


def test_delegation_depth_stops_agents_answering_agents(server: LiveServer, make_org) -> None:
    a = make_org("Acme")
    u = a.user("U")
    one = _participating_agent(a, "One", "one", delegation_depth=1)
    two = _participating_agent(a, "Two", "two", delegation_depth=1)
    team = a.team("T", ("user", u["id"]), ("agent", one["id"]), ("agent", two["id"]))
    th = a.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t", "agent_budget": 50})
    a.ok("POST", f"/threads/{th['id']}/messages", json={"content": "go", "user_id": u["id"]})
    settle(server, a.http, th["id"])
    # each answers the person (depth 1) and neither answers the other (depth 2)
    assert len(_replies(a, th["id"], one["id"])) == 1
    assert len(_replies(a, th["id"], two["id"])) == 1
    assert _refusals(a, "delegation_depth 1")


def test_rate_allowed_adapters_inbox_and_concurrency(server: LiveServer, make_org) -> None:
    a = make_org("Acme")
    u = a.user("U")
    rated = _participating_agent(a, "Rated", "rated", rate={"messages": 1, "per_seconds": 3600})
    banned = _participating_agent(a, "Banned", "banned", allowed_adapters=["consulting"])
    deaf = _participating_agent(a, "Deaf", "deaf", inbox_cap=0)
    single = _participating_agent(a, "Single", "single", max_concurrent_threads=1)
    agents = [rated, banned, deaf, single]
    team = a.team("T", ("user", u["id"]), *[("agent", x["id"]) for x in agents])
    t1 = a.ok("POST", f"/teams/{team['id']}/threads", json={"title": "1", "agent_budget": 0})
    t2 = a.ok("POST", f"/teams/{team['id']}/threads", json={"title": "2", "agent_budget": 0})
    a.ok("PATCH", f"/threads/{t1['id']}", json={"agent_budget": 10})
    a.ok("PATCH", f"/threads/{t2['id']}", json={"agent_budget": 10})
    for tid in (t1["id"], t2["id"]):
        a.ok("POST", f"/threads/{tid}/messages", json={"content": "q", "user_id": u["id"]})
        settle(server, a.http, tid)
    counts = {
        x["name"]: (len(_replies(a, t1["id"], x["id"])), len(_replies(a, t2["id"], x["id"])))
        for x in agents
    }
    # Rated: one message in all; Single: active in thread 1 only (it may answer twice there)
    assert sum(counts["Rated"]) == 1
    assert counts["Banned"] == (0, 0) and counts["Deaf"] == (0, 0)
    assert counts["Single"][0] >= 1 and counts["Single"][1] == 0
    for reason in (
        "rate of 1 messages per 3600 s",
        "adapter 'open' is not in allowed_adapters",
        "inbox_cap 0",
        "max_concurrent_threads 1",
    ):
        assert _refusals(a, reason), reason


def test_rule_api_validation_and_scope(server: LiveServer, make_org) -> None:
    a, b = make_org("Acme"), make_org("Globex")
    bot = a.agent("Bot", "bot")
    assert a.ok("GET", f"/agents/{bot['id']}/rule")["inbound_from"] == ["*"]
    for bad in (
        {"rate": {"messages": 0, "per_seconds": 1}},
        {"inbox_cap": -1},
        {"unknown": 1},
        {"inbound_from": "*"},
    ):
        assert_error(a.http.put(f"/agents/{bot['id']}/rule", json=bad), 422, "invalid_request")
    assert_error(b.http.get(f"/agents/{bot['id']}/rule"), 404, "not_found")
    assert_error(b.http.put(f"/agents/{bot['id']}/rule", json={}), 404, "not_found")
    tok = a.ok("POST", "/credentials", json={"kind": "agent_token", "subject_id": bot["id"]})
    with server.client(tok["secret"]) as http:
        assert_error(http.get(f"/agents/{bot['id']}/rule"), 403, "permission_denied")
        assert_error(http.put(f"/agents/{bot['id']}/rule", json={}), 403, "permission_denied")
