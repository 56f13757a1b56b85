"""Team roles (issue 13, point 3): what an owner, an admin and a member of a team or network may do.

One test per cell of the matrix in docs/security.md ("Team roles"): every team-scoped act, tried
by a user token of each role, by an agent token whose agent is stored as admin (it acts as a
member), and by the org key (full power). An allowed act succeeds and changes what the org key
reads; a forbidden one answers 403 ``permission_denied`` naming the act, the role needed and the
caller's, and changes nothing. Then the rules around the matrix: the last owner stays, scope
comes before role, a member org's people act as members in a network it does not host, and a
token opens threads only as itself.

Before roles were enforced, user and agent tokens were refused every one of these acts with one
message ("a user token can only post messages as its user"), members could not create threads,
owners and admins could not administer, the last owner could be removed, and there was no way to
change a role.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from conftest import LiveServer, Org, assert_error


@dataclass
class World:
    """Org A (with a team and a hosted network, members of every role) and org B (joined the
    network with one user). ``tokens``: secret per acting role; ``ids``: what the acts name."""

    srv: LiveServer
    a: Org
    b: Org
    ids: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, role: str) -> httpx.Client:
        """The org key's client for ``org``; a fresh client with the role's token otherwise."""
        return self.a.http if role == "org" else self.srv.client(self.tokens[role])


def build(srv: LiveServer) -> World:
    srv.app.state.services.teams.join_limit = 1_000_000  # every org joins from 127.0.0.1
    tag = secrets.token_hex(3)
    w = World(srv, Org(srv, f"A-{tag}"), Org(srv, f"B-{tag}"))
    a, ids = w.a, w.ids
    for name in ("owner", "owner2", "admin", "member", "target", "newcomer"):
        ids[name] = a.user(f"{name} person")["id"]
    ids["agent"] = a.agent("Bot", "bot")["id"]
    roles = {
        "owner": "owner",
        "owner2": "owner",
        "admin": "admin",
        "member": "member",
        "target": "member",
    }
    for kind in ("team", "network"):
        box = a.ok("POST", f"/{kind}s", json={"name": f"{kind} of A"})
        ids[kind] = box["id"]
        for name, role in roles.items():
            body = {"user_id": ids[name], "role": role}
            a.ok("POST", f"/{kind}s/{box['id']}/members", json=body)
        body = {"agent_id": ids["agent"], "role": "admin"}  # stored admin; acts as a member
        a.ok("POST", f"/{kind}s/{box['id']}/members", json=body)
    team, net = ids["team"], ids["network"]
    ids["thread"] = a.ok("POST", f"/teams/{team}/threads", json={"title": "open"})["id"]
    everyone = [{"kind": "user", "id": ids[n]} for n in ("owner", "admin", "member")]
    everyone.append({"kind": "agent", "id": ids["agent"]})
    body = {"title": "restricted", "visibility": "restricted", "participants": everyone}
    ids["restricted"] = a.ok("POST", f"/teams/{team}/threads", json=body)["id"]
    ids["net_thread"] = a.ok("POST", f"/networks/{net}/threads", json={"title": "n"})["id"]
    ids["guest"] = w.b.user("guest person")["id"]
    code = a.ok("POST", f"/networks/{net}/invites", json={})["join_code"]
    ids["visa"] = w.b.ok("POST", "/networks/join", json={"code": code, "user_ids": [ids["guest"]]})[
        "visa_id"
    ]
    ids["invite"] = a.ok("POST", f"/networks/{net}/invites", json={})["id"]
    for name in ("owner", "admin", "member"):
        body = {"kind": "user_token", "subject_id": ids[name]}
        w.tokens[name] = a.ok("POST", "/credentials", json=body)["secret"]
    body = {"kind": "agent_token", "subject_id": ids["agent"]}
    w.tokens["agent"] = a.ok("POST", "/credentials", json=body)["secret"]
    body = {"kind": "user_token", "subject_id": ids["guest"]}
    w.tokens["guest"] = w.b.ok("POST", "/credentials", json=body)["secret"]
    return w


@dataclass(frozen=True)
class Act:
    """One team-scoped act: the request, its success status, the role a user token needs and
    the words the refusal starts with (``doing``)."""

    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    need: str
    doing: str
    where: str = "team"  # which one the refusal names: team | network
    gate: str | None = None  # an owner's act checked first as this admin act (its words)


def _member_path(box: str, who: str) -> str:
    return f"/{box}s/{{{box}}}/members/user/{{{who}}}"


ACTS: dict[str, Act] = {
    # teams
    "team.create_thread": Act("POST", "/teams/{team}/threads", {"title": "x"}, 201, "member", ""),
    "team.rename": Act(
        "PATCH", "/teams/{team}", {"name": "Renamed"}, 200, "admin", "renaming or re-describing"
    ),
    "team.add_member": Act(
        "POST",
        "/teams/{team}/members",
        {"user_id": "{newcomer}"},
        201,
        "admin",
        "adding members to",
    ),
    "team.add_owner": Act(
        "POST",
        "/teams/{team}/members",
        {"user_id": "{newcomer}", "role": "owner"},
        201,
        "owner",
        "adding an owner to",
        gate="adding members to",
    ),
    "team.remove_member": Act(
        "DELETE", _member_path("team", "target"), None, 204, "admin", "removing members from"
    ),
    "team.remove_owner": Act(
        "DELETE",
        _member_path("team", "owner2"),
        None,
        204,
        "owner",
        "removing an owner from",
        gate="removing members from",
    ),
    "team.make_admin": Act(
        "PATCH",
        _member_path("team", "target"),
        {"role": "admin"},
        200,
        "admin",
        "changing roles in",
    ),
    "team.grant_owner": Act(
        "PATCH",
        _member_path("team", "target"),
        {"role": "owner"},
        200,
        "owner",
        "giving role owner in",
        gate="changing roles in",
    ),
    "team.demote_owner": Act(
        "PATCH",
        _member_path("team", "owner2"),
        {"role": "member"},
        200,
        "owner",
        "changing an owner's role in",
        gate="changing roles in",
    ),
    "team.widen_thread": Act(
        "PATCH",
        "/threads/{restricted}",
        {"visibility": "members"},
        200,
        "admin",
        "widening threads of",
    ),
    "team.add_participants": Act(
        "POST",
        "/threads/{restricted}/participants",
        {"participants": [{"kind": "user", "id": "{target}"}]},
        200,
        "admin",
        "widening threads of",
    ),
    "team.set_budget": Act(
        "PATCH",
        "/threads/{thread}",
        {"agent_budget": 7},
        200,
        "admin",
        "setting the agent budget of threads in",
    ),
    "team.close_thread": Act(
        "POST", "/threads/{thread}/close", {}, 200, "admin", "closing open threads of"
    ),
    "team.delete": Act("DELETE", "/teams/{team}", None, 204, "owner", "deleting"),
    # networks (hosted by the caller's org)
    "network.create_thread": Act(
        "POST", "/networks/{network}/threads", {"title": "x"}, 201, "member", "", "network"
    ),
    "network.rename": Act(
        "PATCH",
        "/networks/{network}",
        {"description": "d"},
        200,
        "admin",
        "renaming or re-describing",
        "network",
    ),
    "network.add_member": Act(
        "POST",
        "/networks/{network}/members",
        {"user_id": "{newcomer}"},
        201,
        "admin",
        "adding members to",
        "network",
    ),
    "network.remove_member": Act(
        "DELETE",
        _member_path("network", "target"),
        None,
        204,
        "admin",
        "removing members from",
        "network",
    ),
    "network.make_admin": Act(
        "PATCH",
        _member_path("network", "target"),
        {"role": "admin"},
        200,
        "admin",
        "changing roles in",
        "network",
    ),
    "network.grant_owner": Act(
        "PATCH",
        _member_path("network", "target"),
        {"role": "owner"},
        200,
        "owner",
        "giving role owner in",
        "network",
        "changing roles in",
    ),
    "network.create_invite": Act(
        "POST", "/networks/{network}/invites", {}, 201, "admin", "creating invites to", "network"
    ),
    "network.list_invites": Act(
        "GET", "/networks/{network}/invites", None, 200, "admin", "listing invites of", "network"
    ),
    "network.revoke_invite": Act(
        "DELETE",
        "/networks/{network}/invites/{invite}",
        None,
        204,
        "admin",
        "revoking invites of",
        "network",
    ),
    "network.list_visas": Act(
        "GET", "/networks/{network}/visas", None, 200, "admin", "listing visas of", "network"
    ),
    "network.revoke_visa": Act(
        "DELETE",
        "/networks/{network}/visas/{visa}",
        None,
        204,
        "admin",
        "revoking visas of",
        "network",
    ),
    "network.close": Act(
        "POST", "/networks/{network}/close", None, 200, "owner", "closing", "network"
    ),
}

RANK = {"member": 0, "admin": 1, "owner": 2}
NEEDS = {"member": "member", "admin": "admin or owner", "owner": "owner"}
# who acts, and the role it acts with (an agent token: member, whatever its agent is stored as)
ACTORS = {"owner": "owner", "admin": "admin", "member": "member", "agent": "member", "org": None}


def allowed(actor: str, need: str) -> bool:
    role = ACTORS[actor]
    return role is None or RANK[role] >= RANK[need]


def fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ids) for v in value]
    return value


def snapshot(w: World) -> dict[str, Any]:
    """What the org key reads of the team, the network and their threads (status and body)."""
    out: dict[str, Any] = {}
    team, net = w.ids["team"], w.ids["network"]
    for path in (
        f"/teams/{team}",
        f"/teams/{team}/members",
        f"/teams/{team}/threads",
        f"/networks/{net}",
        f"/networks/{net}/members",
        f"/networks/{net}/threads",
        f"/networks/{net}/invites",
        f"/networks/{net}/visas",
    ):
        r = w.a.http.get(path)
        out[path] = (r.status_code, r.json())
    return out


@pytest.mark.parametrize("actor", list(ACTORS))
@pytest.mark.parametrize("act_name", list(ACTS))
def test_role_matrix(module_server: LiveServer, act_name: str, actor: str) -> None:
    act = ACTS[act_name]
    w = build(module_server)
    before = snapshot(w)
    http = w.client(actor)
    r = http.request(act.method, fill(act.path, w.ids), json=fill(act.body, w.ids))
    if actor != "org":
        http.close()
    if allowed(actor, act.need):
        assert r.status_code == act.status, (act_name, actor, r.text)
        if act.method != "GET":
            assert snapshot(w) != before, "an allowed act must change something"
        return
    error = assert_error(r, 403, "permission_denied")
    role = ACTORS[actor]
    doing, need = act.doing, act.need
    if act.gate is not None and not allowed(actor, "admin"):
        doing, need = act.gate, "admin"  # refused at the first step already
    where = w.ids[act.where]
    assert error["message"].startswith(f"{doing} {act.where} {where} needs role "), error
    assert f"needs role {NEEDS[need]}; you are {role}" in error["message"], error
    if actor == "agent":
        assert "an agent token acts as a member" in error["message"], error
    assert snapshot(w) == before, "a refused act changed something"


# ------------------------------------------------------------------------- around the matrix


@pytest.mark.parametrize("actor", ["org", "owner"])
def test_the_last_owner_is_neither_removed_nor_demoted(
    module_server: LiveServer, actor: str
) -> None:
    w = build(module_server)
    team, ids = w.ids["team"], w.ids
    http = w.client(actor)
    # owner2 may go (owner stays)...
    assert http.delete(f"/teams/{team}/members/user/{ids['owner2']}").status_code == 204
    # ... but the last owner neither leaves nor loses the role, whoever asks
    last = f"/teams/{team}/members/user/{ids['owner']}"
    error = assert_error(http.delete(last), 409, "conflict")
    assert (
        "last owner" in error["message"] and "make another member owner first" in error["message"]
    )
    assert_error(http.patch(last, json={"role": "admin"}), 409, "conflict")
    roles = {m["id"]: m["role"] for m in w.a.ok("GET", f"/teams/{team}/members")}
    assert roles[ids["owner"]] == "owner"
    # once another member is owner, it can
    promoted = http.patch(f"/teams/{team}/members/user/{ids['admin']}", json={"role": "owner"})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["role"] == "owner"
    assert http.patch(last, json={"role": "member"}).json()["role"] == "member"
    roles = {m["id"]: m["role"] for m in w.a.ok("GET", f"/teams/{team}/members")}
    assert (roles[ids["owner"]], roles[ids["admin"]]) == ("member", "owner")
    if actor != "org":
        http.close()


def test_role_changes_are_audited_and_validated(module_server: LiveServer) -> None:
    w = build(module_server)
    team, ids = w.ids["team"], w.ids
    path = f"/teams/{team}/members/user/{ids['target']}"
    assert_error(w.a.http.patch(path, json={"role": "king"}), 422, "invalid_request")
    missing = f"/teams/{team}/members/user/usr_{secrets.token_hex(12)}"
    assert_error(w.a.http.patch(missing, json={"role": "admin"}), 404, "not_found")
    assert w.a.ok("PATCH", path, json={"role": "admin"})["role"] == "admin"
    records = w.a.ok("GET", "/audit", params={"action": "team.member_role"})
    assert [r["data"] for r in records] == [
        {"member_kind": "user", "member_id": ids["target"], "role": "admin", "previous": "member"}
    ]
    # adding an existing member again changes nothing and answers its stored role
    again = w.a.ok("POST", f"/teams/{team}/members", json={"user_id": ids["owner"]})
    assert again["role"] == "owner"


def test_scope_comes_before_role(module_server: LiveServer) -> None:
    """A token's scope is its subject's teams and networks: another team of its own org, a
    team of another org and a made-up id all answer 404, the same as a read; only in its own
    team does the role answer 403."""
    w = build(module_server)
    other_team = w.a.ok("POST", "/teams", json={"name": "not theirs"})["id"]
    b_team = w.b.ok("POST", "/teams", json={"name": "B's"})["id"]
    made_up = f"team_{secrets.token_hex(12)}"
    with w.srv.client(w.tokens["member"]) as http:
        for team in (other_team, b_team, made_up):
            for method, path, body in (
                ("GET", f"/teams/{team}", None),
                ("DELETE", f"/teams/{team}", None),
                ("PATCH", f"/teams/{team}", {"name": "x"}),
                ("POST", f"/teams/{team}/members", {"user_id": w.ids["member"]}),
                ("PATCH", f"/teams/{team}/members/user/{w.ids['member']}", {"role": "owner"}),
            ):
                assert_error(http.request(method, path, json=body), 404, "not_found")
        assert_error(http.delete(f"/teams/{w.ids['team']}"), 403, "permission_denied")


def test_people_of_a_member_org_act_as_members_in_the_network(module_server: LiveServer) -> None:
    w = build(module_server)
    net, guest = w.ids["network"], w.ids["guest"]
    # the member org brings its own people as members only; roles are the host's to give
    error = assert_error(
        w.b.http.patch(f"/networks/{net}/members/user/{guest}", json={"role": "admin"}),
        403,
        "permission_denied",
    )
    assert f"giving role admin in network {net} is for the org that hosts it" in error["message"]
    b_user = w.b.user("another guest")["id"]
    body = {"user_id": b_user, "role": "owner"}
    assert_error(w.b.http.post(f"/networks/{net}/members", json=body), 403, "permission_denied")
    body["role"] = "member"
    assert w.b.ok("POST", f"/networks/{net}/members", json=body)["role"] == "member"
    with w.srv.client(w.tokens["guest"]) as http:
        # a guest may open threads in the network and post in them...
        made = http.post(f"/networks/{net}/threads", json={"title": "from B"})
        assert made.status_code == 201, made.text
        assert made.json()["org_id"] == w.b.id
        post = http.post(f"/threads/{made.json()['id']}/messages", json={"content": "hi"})
        assert post.status_code == 201, post.text
        # ... but administers nothing of the host's
        for method, path in (
            ("POST", f"/networks/{net}/invites"),
            ("GET", f"/networks/{net}/visas"),
            ("POST", f"/networks/{net}/close"),
        ):
            error = assert_error(http.request(method, path, json={}), 403, "permission_denied")
            assert "is for the org that hosts it" in error["message"] or (
                "you are member" in error["message"]
            ), error


def test_a_token_opens_threads_as_itself(module_server: LiveServer) -> None:
    w = build(module_server)
    team, ids = w.ids["team"], w.ids
    with w.srv.client(w.tokens["member"]) as http:
        others = [{"kind": "user", "id": ids["owner"]}]
        body = {"title": "r", "visibility": "restricted", "participants": others}
        error = assert_error(http.post(f"/teams/{team}/threads", json=body), 422, "invalid_request")
        assert "among the participants" in error["message"]
        body["participants"] = [*others, {"kind": "user", "id": ids["member"]}]
        made = http.post(f"/teams/{team}/threads", json=body)
        assert made.status_code == 201, made.text
        assert http.get(f"/threads/{made.json()['id']}").status_code == 200
        pair = [*others, {"kind": "user", "id": ids["member"]}]  # the initiator: the first
        proto = {"title": "p", "adapter": "consulting", "participants": pair}
        error = assert_error(
            http.post(f"/teams/{team}/threads", json=proto), 422, "invalid_request"
        )
        assert error["message"].startswith("initiator: a user token opens a protocol thread")
    # no thread was written by the refused attempts
    titles = sorted(t["title"] for t in w.a.ok("GET", f"/teams/{team}/threads"))
    assert titles == ["open", "r", "restricted"]
