"""Tenant isolation: nothing of org B is reachable by org A, by real ids or guessed ones.

The first tests walk every route with ids of another org; the property test drives random
sequences of operations against a reference model of what each org may see.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import LiveServer, Org, assert_error


def _build_b(b: Org) -> dict[str, str]:
    """Give org B one of everything; returns the ids."""
    user = b.user("Bea")
    agent = b.agent("B Bot", "bbot")
    routine = b.ok("POST", f"/agents/{agent['id']}/routines", json={"name": "r"})
    b.ok("POST", f"/agents/{routine['agent_id']}/routines/{routine['id']}/pause")
    team = b.team("B Team", ("user", user["id"]), ("agent", agent["id"]))
    thread = b.ok("POST", f"/teams/{team['id']}/threads", json={"title": "B private"})
    msg = b.ok(
        "POST",
        f"/threads/{thread['id']}/messages",
        json={"content": "B-SECRET-MESSAGE-1188", "user_id": user["id"]},
    )
    net = b.ok("POST", "/networks", json={"name": "B Net"})
    b.ok("POST", f"/networks/{net['id']}/members", json={"user_id": user["id"]})
    net_thread = b.ok("POST", f"/networks/{net['id']}/threads", json={"title": "B net thread"})
    b.ok(
        "POST",
        f"/threads/{net_thread['id']}/messages",
        json={"content": "B-NET-SECRET-5521", "user_id": user["id"]},
    )
    invite = b.ok("POST", f"/networks/{net['id']}/invites", json={})
    doc = b.ok(
        "POST",
        "/knowledge",
        json={"documents": [{"name": "b.md", "content": "B knowledge zanzibar-4471"}]},
    )[0]
    agent_doc = b.ok(
        "POST",
        f"/agents/{agent['id']}/knowledge",
        json={"documents": [{"name": "ba.md", "content": "B agent knowledge quokka-9902"}]},
    )[0]
    return {
        "user": user["id"],
        "agent": agent["id"],
        "routine": routine["id"],
        "team": team["id"],
        "thread": thread["id"],
        "message": msg["id"],
        "network": net["id"],
        "net_thread": net_thread["id"],
        "invite": invite["id"],
        "code": invite["join_code"],
        "doc": doc["id"],
        "agent_doc": agent_doc["id"],
    }


def _requests(ids: dict[str, str], mine: dict[str, str]) -> list[tuple[str, str, Any]]:
    """Every request by which org A could reach one of B's resources (ids in ``ids``)."""
    u, ag, rt = ids["user"], ids["agent"], ids["routine"]
    tm, th, net, nth = ids["team"], ids["thread"], ids["network"], ids["net_thread"]
    post = {"content": "intruder", "agent_id": mine["agent"]}
    reqs: list[tuple[str, str, Any]] = [
        ("GET", f"/users/{u}", None),
        ("PATCH", f"/users/{u}", {"name": "pwned"}),
        ("DELETE", f"/users/{u}", None),
        ("GET", f"/agents/{ag}", None),
        ("PATCH", f"/agents/{ag}", {"name": "pwned"}),
        ("DELETE", f"/agents/{ag}", None),
        ("GET", f"/agents/{ag}/routines", None),
        ("POST", f"/agents/{ag}/routines", {"name": "x"}),
        ("PATCH", f"/agents/{ag}/routines/{rt}", {"name": "pwned"}),
        ("POST", f"/agents/{ag}/routines/{rt}/pause", None),
        ("POST", f"/agents/{ag}/routines/{rt}/activate", None),
        ("DELETE", f"/agents/{ag}/routines/{rt}", None),
        # B's routine under A's own agent
        ("PATCH", f"/agents/{mine['agent']}/routines/{rt}", {"name": "pwned"}),
        ("POST", f"/agents/{mine['agent']}/routines/{rt}/activate", None),
        ("DELETE", f"/agents/{mine['agent']}/routines/{rt}", None),
        ("GET", f"/agents/{ag}/knowledge", None),
        ("POST", f"/agents/{ag}/knowledge", {"documents": [{"name": "x", "content": "x"}]}),
        ("DELETE", f"/knowledge/{ids['doc']}", None),
        ("DELETE", f"/knowledge/{ids['agent_doc']}", None),
        ("GET", f"/knowledge/search?q=zanzibar&agent_id={ag}", None),
        ("GET", f"/teams/{tm}", None),
        ("PATCH", f"/teams/{tm}", {"name": "pwned"}),
        ("DELETE", f"/teams/{tm}", None),
        ("GET", f"/teams/{tm}/members", None),
        ("POST", f"/teams/{tm}/members", {"agent_id": mine["agent"]}),
        ("DELETE", f"/teams/{tm}/members/user/{u}", None),
        ("DELETE", f"/teams/{tm}/members/agent/{ag}", None),
        ("GET", f"/teams/{tm}/threads", None),
        ("POST", f"/teams/{tm}/threads", {"title": "x"}),
        ("GET", f"/networks/{net}", None),
        ("PATCH", f"/networks/{net}", {"name": "pwned"}),
        ("GET", f"/networks/{net}/members", None),
        ("POST", f"/networks/{net}/members", {"agent_id": mine["agent"]}),
        ("DELETE", f"/networks/{net}/members/user/{u}", None),
        ("GET", f"/networks/{net}/threads", None),
        ("POST", f"/networks/{net}/threads", {"title": "x"}),
        ("POST", f"/networks/{net}/invites", {}),
        ("POST", f"/networks/{net}/close", None),
    ]
    for t in (th, nth):
        reqs += [
            ("GET", f"/threads/{t}", None),
            ("PATCH", f"/threads/{t}", {"agent_budget": 0}),
            ("GET", f"/threads/{t}/messages", None),
            ("GET", f"/threads/{t}/messages?wait=5", None),
            ("GET", f"/threads/{t}/envelopes", None),
            ("GET", f"/threads/{t}/verify", None),
            ("POST", f"/threads/{t}/messages", post),
            ("POST", f"/threads/{t}/messages", {"content": "x", "user_id": mine["user"]}),
            ("POST", f"/threads/{t}/messages", {"content": "x", "user_id": u}),
        ]
    # B's members used inside A's own resources
    reqs += [
        ("POST", f"/teams/{mine['team']}/members", {"agent_id": ag}),
        ("POST", f"/teams/{mine['team']}/members", {"user_id": u}),
        ("POST", f"/threads/{mine['thread']}/messages", {"content": "x", "agent_id": ag}),
        ("POST", f"/threads/{mine['thread']}/messages", {"content": "x", "user_id": u}),
    ]
    return reqs


def _build_a(a: Org) -> dict[str, str]:
    user, agent = a.user("Ann"), a.agent("A Bot", "abot")
    team = a.team("A Team", ("user", user["id"]), ("agent", agent["id"]))
    thread = a.ok("POST", f"/teams/{team['id']}/threads", json={"title": "A thread"})
    return {"user": user["id"], "agent": agent["id"], "team": team["id"], "thread": thread["id"]}


def _guess(real: str) -> str:
    prefix = real.split("_", 1)[0]
    return f"{prefix}_{secrets.token_hex(12)}"


def test_every_resource_of_another_org_answers_404(make_org) -> None:
    a, b = make_org("A"), make_org("B")
    mine = _build_a(a)
    ids = _build_b(b)
    guessed = {k: (_guess(v) if k != "code" else v) for k, v in ids.items()}
    before = {
        p: b.http.get(p).json()
        for p in (
            f"/users/{ids['user']}",
            f"/agents/{ids['agent']}",
            f"/agents/{ids['agent']}/routines",
            f"/teams/{ids['team']}",
            f"/teams/{ids['team']}/members",
            f"/networks/{ids['network']}",
            f"/threads/{ids['thread']}",
            f"/threads/{ids['net_thread']}",
            f"/threads/{ids['thread']}/envelopes",
            "/knowledge",
            f"/agents/{ids['agent']}/knowledge",
        )
    }

    for method, path, body in _requests(ids, mine):
        real = a.http.request(method, path, json=body)
        err = assert_error(real, 404, "not_found")
        # the same request with guessed ids gets the same answer, modulo the id itself
        gpath = path
        gbody = body
        for k, v in ids.items():
            gpath = gpath.replace(v, guessed[k])
            if isinstance(gbody, dict):
                gbody = {kk: (guessed[k] if vv == v else vv) for kk, vv in gbody.items()}
        fake = a.http.request(method, gpath, json=gbody)
        gerr = assert_error(fake, 404, "not_found")
        masked = err["message"]
        for k, v in ids.items():
            masked = masked.replace(v, guessed[k])
        assert masked == gerr["message"], (method, path)
        for marker in ("B-SECRET-MESSAGE-1188", "B-NET-SECRET-5521", "zanzibar", "quokka"):
            assert marker not in real.text

    # searching never returns B's chunks
    assert a.ok("GET", "/knowledge/search", params={"q": "zanzibar quokka knowledge"}) == []
    # joining with B's agent attached fails without admitting A
    assert_error(
        a.http.post("/networks/join", json={"code": ids["code"], "agent_ids": [ids["agent"]]}),
        404,
        "not_found",
    )
    # A's listings never contain B's ids
    listing_paths = ("/users", "/agents", "/teams", "/networks", "/threads", "/knowledge", "/audit")
    for p in listing_paths:
        if p == "/audit":
            # A's own refused attempts name the ids A itself sent; everything else must not
            text = str(
                [
                    e
                    for e in a.ok("GET", p, params={"limit": 1000})
                    if (e["action"], e["outcome"]) != ("envelope.message", "refused")
                ]
            )
        else:
            text = a.http.get(p).text
        for k, v in ids.items():
            assert v not in text, (p, k)
        assert b.id not in text
    # ... and nothing above changed B's resources
    for p, body in before.items():
        assert b.http.get(p).json() == body, p
    # B's thread has not grown and A's own thread did not get B's messages
    assert b.ok("GET", f"/threads/{ids['thread']}")["last_seq"] == 2
    assert a.ok("GET", f"/threads/{mine['thread']}")["last_seq"] == 1


def test_a_visa_to_one_network_reveals_nothing_else(make_org) -> None:
    a, b = make_org("A"), make_org("B")
    mine = _build_a(a)
    ids = _build_b(b)
    # B hosts a second network and admits A into it only
    shared = b.ok("POST", "/networks", json={"name": "Shared"})
    code = b.ok("POST", f"/networks/{shared['id']}/invites", json={})["join_code"]
    a.ok("POST", "/networks/join", json={"code": code, "agent_ids": [mine["agent"]]})
    bu = ids["user"]
    b.ok("POST", f"/networks/{shared['id']}/members", json={"user_id": bu})
    sth = b.ok("POST", f"/networks/{shared['id']}/threads", json={"title": "shared"})
    b.ok("POST", f"/threads/{sth['id']}/messages", json={"content": "hello A", "user_id": bu})

    assert [n["id"] for n in a.ok("GET", "/networks")] == [shared["id"]]
    assert {t["id"] for t in a.ok("GET", "/threads")} == {mine["thread"], sth["id"]}
    assert [m["content"] for m in a.ok("GET", f"/threads/{sth['id']}/messages")["items"]] == [
        "hello A"
    ]
    a.ok(
        "POST",
        f"/threads/{sth['id']}/messages",
        json={"content": "hi B", "agent_id": mine["agent"]},
    )
    # members of the shared network show B's user by name, but B's private things stay hidden
    names = {m["name"] for m in a.ok("GET", f"/networks/{shared['id']}/members")}
    assert names == {"A Bot", "Bea"}
    for method, path, body in _requests(ids, mine):
        assert_error(a.http.request(method, path, json=body), 404, "not_found")
    # B's user, though a member of the shared network, is still not A's to use or read
    assert_error(a.http.get(f"/users/{bu}"), 404, "not_found")
    assert_error(
        a.http.post(f"/threads/{sth['id']}/messages", json={"content": "x", "user_id": bu}),
        404,
        "not_found",
    )
    # B sees A's post in the shared thread, and never A's private thread
    assert [m["content"] for m in b.ok("GET", f"/threads/{sth['id']}/messages")["items"]] == [
        "hello A",
        "hi B",
    ]
    assert_error(b.http.get(f"/threads/{mine['thread']}"), 404, "not_found")
    assert mine["thread"] not in b.http.get("/threads").text
    # A's audit has its own join but not B's acts; B's audit records the join as host
    a_audit = a.ok("GET", "/audit", params={"limit": 1000})
    assert all(e["org_id"] == a.id for e in a_audit)
    own_refusals = [
        e for e in a_audit if (e["action"], e["outcome"]) == ("envelope.message", "refused")
    ]
    assert own_refusals  # A's attempts on B's thread are in A's log, as A sent them
    rest = [e for e in a_audit if e not in own_refusals]
    assert ids["thread"] not in str(rest) and sth["id"] not in str(rest)
    b_joins = b.ok("GET", "/audit", params={"action": "network.join"})
    assert [e["resource_id"] for e in b_joins] == [shared["id"]]


# --------------------------------------------------------------------- property-based model


@dataclass
class OrgModel:
    org: Org
    users: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    doc_markers: list[str] = field(default_factory=list)


@dataclass
class ContainerModel:
    id: str
    kind: str  # team | network
    host: int
    visas: set[int] = field(default_factory=set)
    members: set[str] = field(default_factory=set)
    codes: list[str] = field(default_factory=list)


@dataclass
class ThreadModel:
    id: str
    container: str
    markers: list[str] = field(default_factory=list)
    consecutive_agent: int = 0


RARELY = st.integers(0, 3).map(lambda x: x == 0)


def _marker() -> str:
    return f"MK{secrets.token_hex(8)}"


class IsolationMachine(RuleBasedStateMachine):
    """Random operations by several fresh orgs; the model says what each org may see."""

    srv: LiveServer

    def __init__(self) -> None:
        super().__init__()
        self.orgs: list[OrgModel] = []
        self.containers: dict[str, ContainerModel] = {}
        self.threads: dict[str, ThreadModel] = {}
        self.calls = 0

    # ------------------------------------------------------------------ model helpers

    def sees_container(self, oi: int, cid: str) -> bool:
        c = self.containers[cid]
        return c.host == oi or (c.kind == "network" and oi in c.visas)

    def sees_thread(self, oi: int, tid: str) -> bool:
        return self.sees_container(oi, self.threads[tid].container)

    def forbidden_markers(self, oi: int) -> list[str]:
        out = [
            m for t in self.threads.values() if not self.sees_thread(oi, t.id) for m in t.markers
        ]
        for j, om in enumerate(self.orgs):
            if j != oi:
                out += om.doc_markers
        return out

    def call(self, oi: int, method: str, url: str, **kw: Any) -> httpx.Response:
        """Every request goes through here: its answer must not leak another scope's markers."""
        self.calls += 1
        r = self.orgs[oi].org.http.request(method, url, **kw)
        assert r.status_code < 500, r.text
        for m in self.forbidden_markers(oi):
            assert m not in r.text, (oi, method, url, m)
        return r

    def pick(self, seq: list[Any], n: int) -> Any:
        return seq[n % len(seq)]

    # ---------------------------------------------------------------------------- rules

    @initialize()
    def two_orgs(self) -> None:
        self.create_org()
        self.create_org()

    @precondition(lambda self: len(self.orgs) < 4)
    @rule()
    def create_org(self) -> None:
        """A fresh org, with one agent and one user."""
        self.orgs.append(OrgModel(Org(self.srv, f"Org{len(self.orgs)}-{secrets.token_hex(3)}")))
        self.create_member(len(self.orgs) - 1, True)
        self.create_member(len(self.orgs) - 1, False)

    @rule(o=st.integers(0, 99), is_agent=st.booleans())
    def create_member(self, o: int, is_agent: bool) -> None:
        oi = o % len(self.orgs)
        om = self.orgs[oi]
        if is_agent:
            key = f"a{len(om.agents)}"
            r = self.call(oi, "POST", "/agents", json={"name": f"Agent {key}", "lookup_key": key})
            assert r.status_code == 201, r.text
            om.agents.append(r.json()["id"])
        else:
            r = self.call(oi, "POST", "/users", json={"name": f"User {len(om.users)}"})
            assert r.status_code == 201, r.text
            om.users.append(r.json()["id"])

    @rule(
        o=st.integers(0, 99),
        network=st.booleans(),
        picks=st.lists(st.integers(0, 99), min_size=1, max_size=3),
    )
    def create_container(self, o: int, network: bool, picks: list[int]) -> None:
        oi = o % len(self.orgs)
        om = self.orgs[oi]
        kind = "network" if network else "team"
        r = self.call(oi, "POST", f"/{kind}s", json={"name": f"{kind} {len(self.containers)}"})
        assert r.status_code == 201, r.text
        c = ContainerModel(r.json()["id"], kind, oi)
        self.containers[c.id] = c
        pool = [("agent", x) for x in om.agents] + [("user", x) for x in om.users]
        for p in picks:
            if not pool:
                break
            mk, mid = self.pick(pool, p)
            r = self.call(oi, "POST", f"/{kind}s/{c.id}/members", json={f"{mk}_id": mid})
            assert r.status_code == 201, r.text
            c.members.add(mid)
        self.create_thread(list(self.containers).index(c.id), oi, False)

    @precondition(lambda self: any(c.kind == "network" for c in self.containers.values()))
    @rule(n=st.integers(0, 99), o=st.integers(0, 99))
    def invite(self, n: int, o: int) -> None:
        nets = [c for c in self.containers.values() if c.kind == "network"]
        self._invite(self.pick(nets, n), o % len(self.orgs))

    def _invite(self, net: ContainerModel, oi: int) -> None:
        r = self.call(oi, "POST", f"/networks/{net.id}/invites", json={})
        if oi == net.host:
            assert r.status_code == 201, r.text
            net.codes.append(r.json()["join_code"])
        elif oi in net.visas:
            assert_error(r, 403, "permission_denied")
        else:
            assert_error(r, 404, "not_found")

    @precondition(lambda self: any(c.codes for c in self.containers.values()))
    @rule(
        n=st.integers(0, 99),
        o=st.integers(0, 99),
        picks=st.lists(st.integers(0, 99), max_size=2),
        with_user=st.booleans(),
    )
    def join(self, n: int, o: int, picks: list[int], with_user: bool = False) -> None:
        net = self.pick([c for c in self.containers.values() if c.codes], n)
        self._join(net, o % len(self.orgs), picks, with_user)

    @precondition(lambda self: any(c.kind == "network" for c in self.containers.values()))
    @rule(
        n=st.integers(0, 99),
        o=st.integers(0, 99),
        picks=st.lists(st.integers(0, 99), max_size=2),
        with_user=st.booleans(),
    )
    def invite_and_join(self, n: int, o: int, picks: list[int], with_user: bool) -> None:
        net = self.pick([c for c in self.containers.values() if c.kind == "network"], n)
        self._invite(net, net.host)
        self._join(net, o % len(self.orgs), picks, with_user)

    def _join(self, net: ContainerModel, oi: int, picks: list[int], with_user: bool) -> None:
        om = self.orgs[oi]
        agent_ids = sorted({self.pick(om.agents, p) for p in picks}) if om.agents else []
        user_ids = om.users[:1] if with_user else []
        r = self.call(
            oi,
            "POST",
            "/networks/join",
            json={"code": net.codes[-1], "agent_ids": agent_ids, "user_ids": user_ids},
        )
        if oi == net.host:
            assert_error(r, 409, "conflict")
            return
        assert r.status_code == 200, r.text
        assert r.json()["network"]["id"] == net.id
        assert sorted(m["id"] for m in r.json()["members"]) == sorted(agent_ids + user_ids)
        net.visas.add(oi)
        net.members.update(agent_ids + user_ids)

    @precondition(lambda self: bool(self.containers))
    @rule(c=st.integers(0, 99), o=st.integers(0, 99), p=st.integers(0, 99))
    def add_member(self, c: int, o: int, p: int) -> None:
        cont = self.pick(list(self.containers.values()), c)
        oi = o % len(self.orgs)
        om = self.orgs[oi]
        pool = [("agent", x) for x in om.agents] + [("user", x) for x in om.users]
        if not pool:
            return
        mk, mid = self.pick(pool, p)
        r = self.call(oi, "POST", f"/{cont.kind}s/{cont.id}/members", json={f"{mk}_id": mid})
        if self.sees_container(oi, cont.id):
            assert r.status_code == 201, r.text
            cont.members.add(mid)
        else:
            assert_error(r, 404, "not_found")

    @precondition(lambda self: bool(self.containers))
    @rule(c=st.integers(0, 99), o=st.integers(0, 99), stray=RARELY)
    def create_thread(self, c: int, o: int, stray: bool = True) -> None:
        oi = o % len(self.orgs)
        conts = list(self.containers.values())
        visible = [x for x in conts if self.sees_container(oi, x.id)]
        cont = self.pick(conts if stray or not visible else visible, c)
        r = self.call(oi, "POST", f"/{cont.kind}s/{cont.id}/threads", json={"title": "t"})
        if self.sees_container(oi, cont.id):
            assert r.status_code == 201, r.text
            tid = r.json()["id"]
            self.threads[tid] = ThreadModel(tid, cont.id)
        else:
            assert_error(r, 404, "not_found")

    @precondition(lambda self: bool(self.threads))
    @rule(
        posts=st.lists(
            st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), RARELY),
            min_size=1,
            max_size=6,
        )
    )
    def post_burst(self, posts: list[tuple[int, int, int, bool]]) -> None:
        for t, o, p, stray in posts:
            self.post(t, o, p, stray)

    @precondition(lambda self: bool(self.threads))
    @rule(t=st.integers(0, 99), o=st.integers(0, 99), p=st.integers(0, 99), stray=RARELY)
    def post(self, t: int, o: int, p: int, stray: bool) -> None:
        """Post as one of org ``o``'s own members; ``stray`` also tries threads and senders
        the org may not use (expecting 404/403)."""
        oi = o % len(self.orgs)
        om = self.orgs[oi]
        threads = list(self.threads.values())
        visible = [x for x in threads if self.sees_thread(oi, x.id)]
        th = self.pick(threads if stray or not visible else visible, t)
        pool = [("agent", x) for x in om.agents] + [("user", x) for x in om.users]
        members = [m for m in pool if m[1] in self.containers[th.container].members]
        mk, mid = self.pick(pool if stray or not members else members, p)
        marker = _marker()
        r = self.call(
            oi,
            "POST",
            f"/threads/{th.id}/messages",
            json={"content": f"note {marker}", f"{mk}_id": mid},
        )
        if not self.sees_thread(oi, th.id):
            assert_error(r, 404, "not_found")
        elif mid not in self.containers[th.container].members:
            assert_error(r, 403, "permission_denied")
        elif mk == "agent" and th.consecutive_agent >= 4:
            assert_error(r, 429, "agent_budget_exhausted")
        else:
            assert r.status_code == 201, r.text
            th.markers.append(marker)
            th.consecutive_agent = th.consecutive_agent + 1 if mk == "agent" else 0

    @precondition(lambda self: sum(len(om.docs) for om in self.orgs) < 4)
    @rule(o=st.integers(0, 99))
    def add_knowledge(self, o: int) -> None:
        oi = o % len(self.orgs)
        marker = _marker()
        r = self.call(
            oi,
            "POST",
            "/knowledge",
            json={"documents": [{"name": "notes.md", "content": f"# Notes\n\nfact {marker}"}]},
        )
        assert r.status_code == 201, r.text
        self.orgs[oi].docs.append(r.json()[0]["id"])
        self.orgs[oi].doc_markers.append(marker)

    # ------------------------------------------------------------------------ the check

    def teardown(self) -> None:
        try:
            self.check_everything()
        finally:
            for om in self.orgs:
                om.org.http.close()

    def check_everything(self) -> None:
        for oi, om in enumerate(self.orgs):

            def ids(path: str, oi: int = oi) -> list[str]:
                return [x["id"] for x in self.call(oi, "GET", path).json()]

            assert ids("/users") == om.users
            assert ids("/agents") == om.agents
            assert ids("/knowledge") == om.docs
            assert set(ids("/teams")) == {
                c.id for c in self.containers.values() if c.kind == "team" and c.host == oi
            }
            assert set(ids("/networks")) == {
                c.id
                for c in self.containers.values()
                if c.kind == "network" and self.sees_container(oi, c.id)
            }
            assert set(ids("/threads")) == {t for t in self.threads if self.sees_thread(oi, t)}
            self.call(oi, "GET", "/audit")
            for tid, th in self.threads.items():
                r = self.call(oi, "GET", f"/threads/{tid}/messages")
                if self.sees_thread(oi, tid):
                    assert r.status_code == 200, r.text
                    assert [m["content"] for m in r.json()["items"]] == [
                        f"note {m}" for m in th.markers
                    ]
                    assert self.call(oi, "GET", f"/threads/{tid}/verify").json()["ok"] is True
                    got = self.call(oi, "GET", f"/threads/{tid}")
                    assert got.status_code == 200, got.text
                    assert got.json()["team_id"] == th.container
                else:
                    assert_error(r, 404, "not_found")
                    assert_error(self.call(oi, "GET", f"/threads/{tid}"), 404, "not_found")
            for cid, c in self.containers.items():
                r = self.call(oi, "GET", f"/{c.kind}s/{cid}/members")
                if self.sees_container(oi, cid):
                    assert {m["id"] for m in r.json()} == c.members
                else:
                    assert_error(r, 404, "not_found")
            for j, other in enumerate(self.orgs):
                if j == oi:
                    continue
                for marker in other.doc_markers:
                    r = self.call(oi, "GET", "/knowledge/search", params={"q": marker})
                    assert r.json() == []
                for doc in other.docs:
                    assert_error(self.call(oi, "DELETE", f"/knowledge/{doc}"), 404, "not_found")
            for marker in om.doc_markers:
                hits = self.call(oi, "GET", "/knowledge/search", params={"q": marker}).json()
                assert [h["document_id"] for h in hits] == [om.docs[om.doc_markers.index(marker)]]


@pytest.mark.timeout(300)
def test_isolation_holds_under_random_operations(module_server: LiveServer) -> None:
    IsolationMachine.srv = module_server
    module_server.app.state.services.teams.join_limit = 1_000_000  # all orgs join from 127.0.0.1
    run_state_machine_as_test(
        IsolationMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
