"""Out of scope answers 404 before any role or credential refusal (issue 13, point 5b).

A call a credential may not make (a user or agent token on an admin route, a read-only key
writing, an org key asking for workflow tools without naming its agent) used to answer 403 or
422 whatever ids it named. Now an id of another org, or one that does not exist, answers 404,
the same as for every other call, and only a call on the caller's own ids gets the 403 (naming
the call) or 422.
"""

from __future__ import annotations

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
        world[key] = {"org": org, "user": user, "agent": agent, "team": team, "thread": thread}
    for key in ("a",):
        org = world[key]["org"]
        for kind in ("user", "agent"):
            body = {"kind": f"{kind}_token", "subject_id": world[key][kind]["id"]}
            world[key][f"{kind}_token"] = org.ok("POST", "/credentials", json=body)["secret"]
        body = {"kind": "org_key", "scopes": ["read"]}
        world[key]["read_key"] = org.ok("POST", "/credentials", json=body)["secret"]
    return world


CALLS = [
    ("PATCH", "/agents/{agent}", {"name": "x"}),
    ("DELETE", "/agents/{agent}", None),
    ("DELETE", "/users/{user}", None),
    ("PATCH", "/users/{user}", {"name": "x"}),
    ("POST", "/teams/{team}/members", {"user_id": "usr_000000000000000000000000"}),
    ("DELETE", "/teams/{team}", None),
    ("POST", "/agents/{agent}/routines", {"name": "participate"}),
]


def fill(template: str, side: dict[str, Any]) -> str:
    return template.format(
        agent=side["agent"]["id"], user=side["user"]["id"], team=side["team"]["id"]
    )


MADE_UP = {
    "agent": {"id": "agt_000000000000000000000000"},
    "user": {"id": "usr_000000000000000000000000"},
    "team": {"id": "team_000000000000000000000000"},
}


@pytest.mark.parametrize("credential", ["user_token", "agent_token", "read_key"])
@pytest.mark.parametrize(("method", "template", "body"), CALLS)
def test_a_refused_call_on_foreign_or_made_up_ids_answers_404(
    server: LiveServer,
    two: dict[str, Any],
    credential: str,
    method: str,
    template: str,
    body: dict[str, Any] | None,
) -> None:
    with server.client(two["a"][credential]) as http:
        foreign = http.request(method, fill(template, two["b"]), json=body)
        made_up = http.request(method, fill(template, MADE_UP), json=body)
        own = http.request(method, fill(template, two["a"]), json=body)
    assert_error(foreign, 404, "not_found")
    assert_error(made_up, 404, "not_found")
    assert (
        foreign.json()["error"]["message"].split("'")[0]
        == (made_up.json()["error"]["message"].split("'")[0])
    )
    error = assert_error(own, 403, "permission_denied")
    message = error["message"]
    if credential == "read_key":
        assert "read-only" in message
    else:
        article = "an agent token" if credential == "agent_token" else "a user token"
        assert message.startswith(f"{article} cannot "), message
        assert "a agent" not in message and "post messages" not in message
    verb = {"PATCH": "update", "DELETE": "delete", "POST": "create"}[method]
    assert f"{verb} " in message and "{id}" in message, message


def test_workflow_tools_scope_first_then_the_missing_agent_id(
    server: LiveServer, two: dict[str, Any]
) -> None:
    a: Org = two["a"]["org"]
    foreign = a.http.get(f"/threads/{two['b']['thread']['id']}/tools")
    made_up = a.http.get("/threads/thr_000000000000000000000000/tools")
    assert_error(foreign, 404, "not_found")
    assert_error(made_up, 404, "not_found")
    own = a.http.get(f"/threads/{two['a']['thread']['id']}/tools")
    assert_error(own, 422, "invalid_request")
    with server.client(two["a"]["user_token"]) as http:
        assert_error(http.get(f"/threads/{two['b']['thread']['id']}/tools"), 404, "not_found")
