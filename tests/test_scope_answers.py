"""Out of scope is 404, then role is 403 (issue 13, point 5b).

A call a credential may not make (a user or agent token on an org admin route, a read-only key
writing, an org key asking for workflow tools without naming its agent) used to answer 403 or
422 whatever ids it named, with messages that did not fit the call ("a user token can only post
messages as its user" on a PATCH, "a agent token"). Now an id the caller cannot see — another
org's, a made-up one, a restricted thread its org takes no part in — answers 404 exactly as a
read of it would, and only a call on what the caller sees gets the 403, whose message names the
call (or, for a team-scoped call, the role it needs), or the 422.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from conftest import LiveServer, Org, assert_error


@pytest.fixture
def two(make_org: Any) -> dict[str, Any]:
    a, b = make_org("A"), make_org("B")
    world: dict[str, Any] = {"a": a, "b": b}
    for org, key in ((a, "a"), (b, "b")):
        user = org.user(f"{key} person")
        agent = org.agent(f"{key} bot", f"{key}bot")
        team = org.team("T", ("user", user["id"]), ("agent", agent["id"]))
        thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})
        issued = org.ok("POST", "/credentials", json={"kind": "org_key", "scopes": ["read"]})
        cred = {**issued["credential"], "secret": issued["secret"]}
        world[key] = {
            "org": org,
            "user": user,
            "agent": agent,
            "team": team,
            "thread": thread,
            "credential": cred,
        }
    for kind in ("user", "agent"):
        body = {"kind": f"{kind}_token", "subject_id": world["a"][kind]["id"]}
        world["a"][f"{kind}_token"] = a.ok("POST", "/credentials", json=body)["secret"]
    world["a"]["read_key"] = world["a"]["credential"]["secret"]
    return world


# Calls no token may make (org administration), on ids of each kind a path may name.
ORG_CALLS = [
    ("PATCH", "/agents/{agent}", {"name": "x"}),
    ("DELETE", "/agents/{agent}", None),
    ("DELETE", "/users/{user}", None),
    ("PATCH", "/users/{user}", {"name": "x"}),
    ("POST", "/agents/{agent}/routines", {"name": "participate"}),
    ("DELETE", "/credentials/{credential}", None),
]
# Team-scoped calls, which a token may make by role: its user/agent is a plain member here.
TEAM_CALLS = [
    ("POST", "/teams/{team}/members", {"user_id": "{user}"}),
    ("DELETE", "/teams/{team}", None),
    ("PATCH", "/threads/{thread}", {"agent_budget": 3}),
]


def fill(value: Any, side: dict[str, Any]) -> Any:
    ids = {k: side[k]["id"] for k in ("agent", "user", "team", "thread", "credential")}
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: fill(v, side) for k, v in value.items()}
    return value


def made_up() -> dict[str, Any]:
    prefixes = {
        "agent": "agt",
        "user": "usr",
        "team": "team",
        "thread": "thr",
        "credential": "cred",
    }
    return {k: {"id": f"{p}_{secrets.token_hex(12)}"} for k, p in prefixes.items()}


def check_out_of_scope(
    server: LiveServer, two: dict[str, Any], credential: str, method: str, template: str, body: Any
) -> dict[str, Any]:
    """Foreign and made-up ids answer the same 404; returns the error on the caller's own."""
    fake = made_up()
    with server.client(two["a"][credential]) as http:
        foreign = http.request(method, fill(template, two["b"]), json=fill(body, two["b"]))
        guessed = http.request(method, fill(template, fake), json=fill(body, fake))
        own = http.request(method, fill(template, two["a"]), json=fill(body, two["a"]))
    assert_error(foreign, 404, "not_found")
    assert_error(guessed, 404, "not_found")
    # the same words, modulo the id itself
    assert (
        foreign.json()["error"]["message"].split("'")[0]
        == (guessed.json()["error"]["message"].split("'")[0])
    )
    return assert_error(own, 403, "permission_denied")


@pytest.mark.parametrize("credential", ["user_token", "agent_token", "read_key"])
@pytest.mark.parametrize(("method", "template", "body"), ORG_CALLS)
def test_an_org_call_on_foreign_or_made_up_ids_answers_404(
    server: LiveServer,
    two: dict[str, Any],
    credential: str,
    method: str,
    template: str,
    body: dict[str, Any] | None,
) -> None:
    error = check_out_of_scope(server, two, credential, method, template, body)
    message = error["message"]
    verb = {"PATCH": "update", "DELETE": "delete", "POST": "create"}[method]
    shown = template.removeprefix("/").replace("{agent}", "{id}").replace("{user}", "{id}")
    shown = shown.replace("{credential}", "{id}")
    if credential == "read_key":
        assert message == f"this credential is read-only: it cannot {verb} {shown}", message
    else:
        article = "an agent token" if credential == "agent_token" else "a user token"
        assert message.startswith(f"{article} cannot {verb} {shown}: "), message
        assert message.endswith("use an org key"), message
        assert "a agent" not in message and "post messages" not in message


@pytest.mark.parametrize("credential", ["user_token", "agent_token", "read_key"])
@pytest.mark.parametrize(("method", "template", "body"), TEAM_CALLS)
def test_a_team_call_on_foreign_or_made_up_ids_answers_404_then_names_the_role(
    server: LiveServer,
    two: dict[str, Any],
    credential: str,
    method: str,
    template: str,
    body: dict[str, Any] | None,
) -> None:
    error = check_out_of_scope(server, two, credential, method, template, body)
    message = error["message"]
    if credential == "read_key":
        assert message.startswith("this credential is read-only: it cannot "), message
    else:
        assert "needs role " in message and "; you are member" in message, message


def test_a_restricted_thread_the_org_takes_no_part_in_answers_404(
    server: LiveServer, two: dict[str, Any]
) -> None:
    """In a network both orgs see, B's restricted thread among B's own people is out of A's
    scope: a refused call naming it answers 404, as reading it does (not 403)."""
    a: Org = two["a"]["org"]
    b: Org = two["b"]["org"]
    server.app.state.services.teams.join_limit = 1_000_000
    net = b.ok("POST", "/networks", json={"name": "shared"})["id"]
    b.ok("POST", f"/networks/{net}/members", json={"user_id": two["b"]["user"]["id"]})
    code = b.ok("POST", f"/networks/{net}/invites", json={})["join_code"]
    a.ok("POST", "/networks/join", json={"code": code, "user_ids": [two["a"]["user"]["id"]]})
    hidden = b.ok(
        "POST",
        f"/networks/{net}/threads",
        json={
            "title": "B only",
            "visibility": "restricted",
            "participants": [{"kind": "user", "id": two["b"]["user"]["id"]}],
        },
    )["id"]
    seen = a.ok("POST", f"/networks/{net}/threads", json={"title": "everyone"})["id"]
    assert_error(a.http.get(f"/threads/{hidden}"), 404, "not_found")
    mine = {"kind": "user", "id": two["a"]["user"]["id"]}
    for credential in ("read_key", "user_token"):
        with server.client(two["a"][credential]) as http:
            for method, suffix, body in (
                ("PATCH", "", {"agent_budget": 3}),
                ("POST", "/participants", {"participants": [mine]}),
                ("POST", "/messages", {"content": "x", "user_id": two["a"]["user"]["id"]}),
            ):
                if credential == "user_token" and suffix == "/messages":
                    body = {"content": "x"}
                r = http.request(method, f"/threads/{hidden}{suffix}", json=body)
                assert_error(r, 404, "not_found")
            if credential == "read_key":
                r = http.patch(f"/threads/{seen}", json={"agent_budget": 3})
                assert_error(r, 403, "permission_denied")


def test_workflow_tools_scope_first_then_the_missing_agent_id(
    server: LiveServer, two: dict[str, Any]
) -> None:
    a: Org = two["a"]["org"]
    foreign = a.http.get(f"/threads/{two['b']['thread']['id']}/tools")
    guessed = a.http.get(f"/threads/thr_{secrets.token_hex(12)}/tools")
    assert_error(foreign, 404, "not_found")
    assert_error(guessed, 404, "not_found")
    own = a.http.get(f"/threads/{two['a']['thread']['id']}/tools")
    assert_error(own, 422, "invalid_request")
    with server.client(two["a"]["user_token"]) as http:
        assert_error(http.get(f"/threads/{two['b']['thread']['id']}/tools"), 404, "not_found")
        own = http.get(f"/threads/{two['a']['thread']['id']}/tools")
        assert_error(own, 403, "permission_denied")


def test_token_messages_name_the_credential_in_good_english(
    server: LiveServer, two: dict[str, Any]
) -> None:
    thread = two["a"]["thread"]["id"]
    with server.client(two["a"]["agent_token"]) as http:
        r = http.post(
            f"/threads/{thread}/messages",
            json={"content": "x", "user_id": two["a"]["user"]["id"]},
        )
        error = assert_error(r, 403, "permission_denied")
        assert error["message"] == "an agent token posts only as its own agent", error
        error = assert_error(http.get("/audit"), 403, "permission_denied")
        assert error["message"] == "an agent token cannot read audit; use an org key", error
