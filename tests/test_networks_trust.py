"""Trust across companies: invite listing/revocation, join rate limits, visas, revoke and leave.

Everything runs against a real server (uvicorn over SQLite) through real HTTP, except the unit
tests of the sliding-window limiter, which use a fake clock.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent_network.services.ratelimit import RateLimitedError, SlidingWindowLimiter
from conftest import LiveServer, Org, all_envelopes, assert_error, settle

INVITE_KEYS = {"id", "created_at", "expires_at", "max_uses", "uses", "revoked"}
VISA_KEYS = {
    "id",
    "network_id",
    "org_id",
    "org_name",
    "created_at",
    "revoked_at",
    "end_reason",
    "members",
}


def _network(org: Org, name: str = "Net") -> dict[str, Any]:
    return dict(org.ok("POST", "/networks", json={"name": name}))


def _invite(host: Org, net_id: str, **kw: Any) -> dict[str, Any]:
    r = host.http.post(f"/networks/{net_id}/invites", json=kw)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _join(org: Org, code: str, **kw: Any) -> dict[str, Any]:
    return dict(org.ok("POST", "/networks/join", json={"code": code, **kw}))


def _code_forms(code: str) -> list[str]:
    """Every way a join code (or its stored hash) could show up in a response."""
    return [code, code.lower(), f"{code[:4]}-{code[4:8]}-{code[8:]}", _sha(code)]


def _sha(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _audit(org: Org, action: str) -> list[dict[str, Any]]:
    return list(org.ok("GET", "/audit", params={"action": action}))


def _member_ids(org: Org, net_id: str) -> set[str]:
    return {m["id"] for m in org.ok("GET", f"/networks/{net_id}/members")}


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


@pytest.fixture
def client_from(server: LiveServer) -> Iterator[Any]:
    """``client_from(org, address)``: an HTTP client for ``org`` whose connections come from the
    loopback ``address`` (e.g. 127.0.0.2), so the server sees another client address."""
    clients: list[httpx.Client] = []

    def make(org: Org, address: str) -> httpx.Client:
        if not _can_bind(address):
            pytest.skip(f"cannot bind the loopback address {address} here")
        c = httpx.Client(
            base_url=f"{server.url}/api/v1",
            headers={"Authorization": f"Bearer {org.key}"},
            transport=httpx.HTTPTransport(local_address=address),
            timeout=60,
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


# ------------------------------------------------------------------------------ invites


def test_host_lists_and_revokes_invites_without_ever_showing_codes(make_org) -> None:
    host, guest, late, outsider = (
        make_org("Host"),
        make_org("Guest"),
        make_org("Late"),
        make_org("Outsider"),
    )
    net = _network(host)
    assert host.ok("GET", f"/networks/{net['id']}/invites") == []
    first = _invite(host, net["id"], max_uses=3)
    second = _invite(host, net["id"], expires_in=3600)
    codes = [first["join_code"], second["join_code"]]

    listed = host.ok("GET", f"/networks/{net['id']}/invites")
    assert [i["id"] for i in listed] == [first["id"], second["id"]]
    for item in listed:
        assert set(item) == INVITE_KEYS
        assert item["uses"] == 0 and item["revoked"] is False
    assert listed[0]["max_uses"] == 3 and listed[1]["max_uses"] is None
    assert listed[0]["expires_at"] == first["expires_at"]
    assert listed[1]["expires_at"] == second["expires_at"]

    gbot = guest.agent("Guest Bot", "gbot")
    _join(guest, first["join_code"], agent_ids=[gbot["id"]])
    assert [i["uses"] for i in host.ok("GET", f"/networks/{net['id']}/invites")] == [1, 0]

    # a member org sees the network but may not manage its invites; an outsider sees nothing
    for method in ("GET", "DELETE"):
        path = f"/networks/{net['id']}/invites"
        if method == "DELETE":
            path += f"/{first['id']}"
        assert_error(guest.http.request(method, path), 403, "permission_denied")
        assert_error(outsider.http.request(method, path), 404, "not_found")

    # revoking: 204, the code stops working for everybody, the org it admitted stays
    r = host.http.delete(f"/networks/{net['id']}/invites/{first['id']}")
    assert r.status_code == 204 and r.content == b""
    listed = host.ok("GET", f"/networks/{net['id']}/invites")
    assert [(i["id"], i["revoked"], i["uses"]) for i in listed] == [
        (first["id"], True, 1),
        (second["id"], False, 0),
    ]
    wrong = assert_error(
        late.http.post("/networks/join", json={"code": "WRONGCODE234"}), 404, "invite_invalid"
    )
    revoked = assert_error(
        late.http.post("/networks/join", json={"code": first["join_code"]}), 404, "invite_invalid"
    )
    assert revoked == wrong  # a revoked code is indistinguishable from a wrong one
    assert_error(
        guest.http.post("/networks/join", json={"code": first["join_code"]}),
        404,
        "invite_invalid",
    )
    assert late.ok("GET", "/networks") == []
    assert _member_ids(host, net["id"]) == {gbot["id"]}
    assert guest.ok("GET", f"/networks/{net['id']}")["id"] == net["id"]
    assert [v["end_reason"] for v in guest.ok("GET", f"/networks/{net['id']}/visas")] == [None]

    # revoking twice is harmless; unknown invites, or another network's, are 404
    assert host.http.delete(f"/networks/{net['id']}/invites/{first['id']}").status_code == 204
    assert_error(host.http.delete(f"/networks/{net['id']}/invites/inv_nope"), 404, "not_found")
    other = _network(host, "Other")
    assert_error(
        host.http.delete(f"/networks/{other['id']}/invites/{second['id']}"), 404, "not_found"
    )
    assert host.ok("GET", f"/networks/{other['id']}/invites") == []
    # the untouched invite still admits
    _join(late, second["join_code"])
    assert [i["uses"] for i in host.ok("GET", f"/networks/{net['id']}/invites")] == [1, 1]

    # the code (in any form, or its hash) never appears in a listing or the audit log
    texts = [
        host.http.get(p).text
        for p in (
            f"/networks/{net['id']}/invites",
            f"/networks/{net['id']}",
            f"/networks/{net['id']}/visas",
            "/networks",
            "/audit",
        )
    ] + [guest.http.get(p).text for p in ("/audit", f"/networks/{net['id']}/visas")]
    for text in texts:
        for code in codes:
            for form in _code_forms(code):
                assert form not in text
    audits = _audit(host, "invite.revoke")
    assert [(a["resource_id"], a["data"]) for a in audits] == [
        (net["id"], {"invite_id": first["id"]})
    ]


def test_expired_and_used_up_codes(server: LiveServer, make_org) -> None:
    host, g1, g2, g3 = make_org("Host"), make_org("G1"), make_org("G2"), make_org("G3")
    net = _network(host)
    short = _invite(host, net["id"], expires_in=0.05)
    twice = _invite(host, net["id"], max_uses=2)

    time.sleep(0.2)
    assert_error(
        g1.http.post("/networks/join", json={"code": short["join_code"]}), 404, "invite_invalid"
    )
    assert g1.ok("GET", "/networks") == []

    first = _join(g1, twice["join_code"])
    # joining again while the visa is live attaches more members and uses nothing up
    gbot = g1.agent("G1 Bot", "bot")
    again = _join(g1, twice["join_code"], agent_ids=[gbot["id"]])
    assert again["visa_id"] == first["visa_id"]
    assert [m["id"] for m in again["members"]] == [gbot["id"]]
    uses = {i["id"]: i["uses"] for i in host.ok("GET", f"/networks/{net['id']}/invites")}
    assert uses == {short["id"]: 0, twice["id"]: 1}
    _join(g2, twice["join_code"])
    uses = {i["id"]: i["uses"] for i in host.ok("GET", f"/networks/{net['id']}/invites")}
    assert uses == {short["id"]: 0, twice["id"]: 2}
    # a third org finds it used up, with the same answer as a wrong code
    used_up = assert_error(
        g3.http.post("/networks/join", json={"code": twice["join_code"]}), 404, "invite_invalid"
    )
    wrong = assert_error(
        g3.http.post("/networks/join", json={"code": "ZZZZZZZZZZZZ"}), 404, "invite_invalid"
    )
    assert used_up == wrong
    assert g3.ok("GET", "/networks") == []
    # an org whose visa ended needs a valid code: the used-up one no longer admits it
    r = host.http.delete(f"/networks/{net['id']}/visas/{first['visa_id']}")
    assert r.status_code == 204, r.text
    assert_error(
        g1.http.post("/networks/join", json={"code": twice["join_code"]}), 404, "invite_invalid"
    )
    assert g1.ok("GET", "/networks") == []
    assert [n["id"] for n in g2.ok("GET", "/networks")] == [net["id"]]


# --------------------------------------------------------------------------- rate limits


def test_join_attempts_are_limited_per_org(server: LiveServer, make_org, client_from) -> None:
    host, guest, other = make_org("Host"), make_org("Guest"), make_org("Other")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    assert server.app.state.services.teams.join_limit == 10  # the default

    # ten attempts in a minute, failed and successful alike
    for i in range(8):
        assert_error(
            guest.http.post("/networks/join", json={"code": f"WRONGCODE{i:03d}"}),
            404,
            "invite_invalid",
        )
    _join(guest, code)
    _join(guest, code)
    # the eleventh is refused, before the code is even looked at (wrong or valid)
    for attempt in ("WRONGCODE999", code):
        err = assert_error(
            guest.http.post("/networks/join", json={"code": attempt}), 429, "rate_limited"
        )
        assert "retry in" in err["message"]
        assert 1 <= err["details"]["retry_after"] <= 60
        assert f"retry in {err['details']['retry_after']} s" in err["message"]
    # a refused attempt with a valid code changed nothing
    gbot = guest.agent("Bot", "bot")
    assert_error(
        guest.http.post("/networks/join", json={"code": code, "agent_ids": [gbot["id"]]}),
        429,
        "rate_limited",
    )
    assert _member_ids(host, net["id"]) == set()
    # the limit is per org: from another client address the guest is still refused, while a
    # fresh org from there is admitted
    elsewhere = client_from(guest, "127.0.0.2")
    assert_error(elsewhere.post("/networks/join", json={"code": code}), 429, "rate_limited")
    r = client_from(other, "127.0.0.2").post("/networks/join", json={"code": code})
    assert r.status_code == 200, r.text
    assert [n["id"] for n in other.ok("GET", "/networks")] == [net["id"]]


def test_join_attempts_are_limited_per_client_address(
    server: LiveServer, make_org, client_from
) -> None:
    teams = server.app.state.services.teams
    teams.join_limit = 3
    host, a, b = make_org("Host"), make_org("A"), make_org("B")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    # every org here talks from 127.0.0.1: the address bucket is shared
    for i in range(3):
        assert_error(
            a.http.post("/networks/join", json={"code": f"GUESS{i:07d}"}), 404, "invite_invalid"
        )
    # B has made no attempt at all, yet is refused because of the address
    err = assert_error(b.http.post("/networks/join", json={"code": code}), 429, "rate_limited")
    assert "join attempts" in err["message"]
    assert b.ok("GET", "/networks") == []
    # the host's invite management is not throttled
    assert len(host.ok("GET", f"/networks/{net['id']}/invites")) == 1
    # raising the limit on the running service lets 127.0.0.1 in again
    teams.join_limit = 5
    _join(a, code)
    assert [n["id"] for n in a.ok("GET", "/networks")] == [net["id"]]
    _join(a, code)
    assert_error(b.http.post("/networks/join", json={"code": code}), 429, "rate_limited")
    # from another address B gets in: its own org bucket is empty
    r = client_from(b, "127.0.0.2").post("/networks/join", json={"code": code})
    assert r.status_code == 200, r.text
    assert [n["id"] for n in b.ok("GET", "/networks")] == [net["id"]]


def test_sliding_window_limiter_unit() -> None:
    now = [1000.0]
    lim = SlidingWindowLimiter(3, 60.0, clock=lambda: now[0], sweep_at=2)
    assert [lim.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.acquire("k") == pytest.approx(60.0)
    now[0] += 20
    assert lim.acquire("k") == pytest.approx(40.0)  # refused attempts are not counted
    assert lim.acquire("other") == 0.0
    now[0] += 40  # the first three slide out of the window together
    assert lim.acquire("k") == 0.0
    # several keys: admitted only if all have room, then counted against all
    lim2 = SlidingWindowLimiter(2, 10.0, clock=lambda: now[0])
    assert lim2.acquire("org", "addr") == 0.0
    assert lim2.acquire("org") == 0.0
    now[0] += 5
    assert lim2.acquire("org", "addr2") == pytest.approx(5.0)
    assert lim2.acquire("addr2") == 0.0  # the refused attempt did not count for addr2
    assert lim2.acquire("addr", limit=1) == pytest.approx(5.0)  # per-call limit
    with pytest.raises(RateLimitedError) as exc:
        lim2.check("org", what="join attempts")
    assert exc.value.code == "rate_limited" and exc.value.status == 429
    assert exc.value.details == {"retry_after": 5}
    assert exc.value.message == "too many join attempts; retry in 5 s"
    lim2.reset()
    lim2.check("org")
    assert SlidingWindowLimiter(0).acquire("x") > 0


# ------------------------------------------------------------------------------- visas


def test_visa_list_host_sees_all_member_sees_own_outsider_nothing(make_org) -> None:
    host, g1, g2, outsider = make_org("Host"), make_org("G1"), make_org("G2"), make_org("Out")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    hu = host.user("Hana")
    host.ok("POST", f"/networks/{net['id']}/members", json={"user_id": hu["id"]})
    b1, u1 = g1.agent("G1 Bot", "bot"), g1.user("Gil")
    u2 = g2.user("Gwen")
    v1 = _join(g1, code, agent_ids=[b1["id"]], user_ids=[u1["id"]])["visa_id"]
    v2 = _join(g2, code, user_ids=[u2["id"]])["visa_id"]

    visas = host.ok("GET", f"/networks/{net['id']}/visas")
    assert [v["id"] for v in visas] == [v1, v2]
    for v in visas:
        assert set(v) == VISA_KEYS
        assert v["network_id"] == net["id"]
        assert v["revoked_at"] is None and v["end_reason"] is None and v["created_at"]
    assert [(v["org_id"], v["org_name"]) for v in visas] == [(g1.id, "G1"), (g2.id, "G2")]
    assert visas[0]["members"] == [
        {"kind": "agent", "id": b1["id"], "name": "G1 Bot", "role": "member"},
        {"kind": "user", "id": u1["id"], "name": "Gil", "role": "member"},
    ]
    assert visas[1]["members"] == [
        {"kind": "user", "id": u2["id"], "name": "Gwen", "role": "member"}
    ]
    # members a visa org adds later are listed under its visa too
    b1b = g1.agent("G1 Bot 2", "bot2")
    g1.ok("POST", f"/networks/{net['id']}/members", json={"agent_id": b1b["id"]})

    mine = g1.ok("GET", f"/networks/{net['id']}/visas")
    assert [v["id"] for v in mine] == [v1]
    assert {m["id"] for m in mine[0]["members"]} == {b1["id"], u1["id"], b1b["id"]}
    r = g2.http.get(f"/networks/{net['id']}/visas")
    assert [v["id"] for v in r.json()] == [v2]
    for text in (r.text, g1.http.get(f"/networks/{net['id']}/visas").text):
        assert hu["id"] not in text  # the host's members are not visa members
    assert v1 not in r.text and g1.id not in r.text
    assert_error(outsider.http.get(f"/networks/{net['id']}/visas"), 404, "not_found")
    assert_error(outsider.http.get("/networks/net_nope/visas"), 404, "not_found")

    # only the host revokes: a member org is told no (even for its own visa: it leaves
    # instead), an outsider learns nothing
    assert_error(g1.http.delete(f"/networks/{net['id']}/visas/{v2}"), 403, "permission_denied")
    assert_error(g1.http.delete(f"/networks/{net['id']}/visas/{v1}"), 403, "permission_denied")
    assert_error(outsider.http.delete(f"/networks/{net['id']}/visas/{v1}"), 404, "not_found")
    assert_error(host.http.delete(f"/networks/{net['id']}/visas/visa_nope"), 404, "not_found")
    other = _network(host, "Other")
    assert_error(host.http.delete(f"/networks/{other['id']}/visas/{v1}"), 404, "not_found")
    assert [v["end_reason"] for v in host.ok("GET", f"/networks/{net['id']}/visas")] == [
        None,
        None,
    ]


def _routine(org: Org, agent_id: str) -> None:
    org.ok("POST", f"/agents/{agent_id}/routines", json={"name": "participate"})


def _agent_msgs(org: Org, tid: str, agent_id: str, after: int = 0) -> list[dict[str, Any]]:
    return [
        m
        for m in all_envelopes(org.http, tid, messages_only=True)
        if m["sender"]["id"] == agent_id and m["seq"] > after
    ]


def test_revoking_a_visa_removes_the_org_at_once_and_it_may_rejoin(
    server: LiveServer, make_org
) -> None:
    host, guest, third = make_org("Host"), make_org("Guest"), make_org("Third")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    hana, hbot = host.user("Hana"), host.agent("Host Bot", "hbot")
    gus, gbot = guest.user("Gus"), guest.agent("Guest Bot", "gbot")
    tbot = third.agent("Third Bot", "tbot")
    _routine(host, hbot["id"])
    _routine(guest, gbot["id"])
    for kind, mid in (("user", hana["id"]), ("agent", hbot["id"])):
        host.ok("POST", f"/networks/{net['id']}/members", json={f"{kind}_id": mid})
    visa = _join(guest, code, agent_ids=[gbot["id"]], user_ids=[gus["id"]])["visa_id"]
    _join(third, code, agent_ids=[tbot["id"]])
    th = host.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Shared"})
    gth = guest.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Guest-made"})
    guest.ok("POST", f"/threads/{th['id']}/messages", json={"content": "hi", "user_id": gus["id"]})
    settle(server, host.http, th["id"])
    t1 = host.ok(
        "POST", f"/threads/{th['id']}/messages", json={"content": "plan?", "user_id": hana["id"]}
    )
    settle(server, host.http, th["id"])
    assert t1["id"] in {m["causation_id"] for m in _agent_msgs(host, th["id"], gbot["id"])}
    before = all_envelopes(host.http, th["id"])

    r = host.http.delete(f"/networks/{net['id']}/visas/{visa}")
    assert r.status_code == 204 and r.content == b""

    # at once: the guest's members are gone, the third org's stay
    assert _member_ids(host, net["id"]) == {hana["id"], hbot["id"], tbot["id"]}
    assert _member_ids(third, net["id"]) == {hana["id"], hbot["id"], tbot["id"]}
    # the guest sees neither the network nor any of its threads (not even the one it created)
    assert guest.ok("GET", "/networks") == []
    for path in (
        f"/networks/{net['id']}",
        f"/networks/{net['id']}/members",
        f"/networks/{net['id']}/threads",
        f"/networks/{net['id']}/visas",
        f"/threads/{th['id']}",
        f"/threads/{th['id']}/messages",
        f"/threads/{gth['id']}",
    ):
        assert_error(guest.http.get(path), 404, "not_found")
    assert {t["id"] for t in guest.ok("GET", "/threads")} == set()
    assert_error(
        guest.http.post(
            f"/threads/{th['id']}/messages", json={"content": "still here?", "user_id": gus["id"]}
        ),
        404,
        "not_found",
    )
    assert_error(
        guest.http.post(f"/networks/{net['id']}/members", json={"agent_id": gbot["id"]}),
        404,
        "not_found",
    )
    assert_error(guest.http.post(f"/networks/{net['id']}/leave"), 404, "not_found")
    # the host sees the ended visa; the history the guest took part in stays in the WAL
    visas = host.ok("GET", f"/networks/{net['id']}/visas")
    ended = next(v for v in visas if v["id"] == visa)
    assert ended["end_reason"] == "revoked" and ended["revoked_at"] and ended["members"] == []
    assert [v["end_reason"] for v in visas if v["id"] != visa] == [None]
    assert all_envelopes(host.http, th["id"]) == before
    assert host.ok("GET", f"/threads/{th['id']}/verify")["ok"] is True
    assert host.ok("GET", f"/threads/{gth['id']}")["id"] == gth["id"]
    # revoking again changes nothing
    assert host.http.delete(f"/networks/{net['id']}/visas/{visa}").status_code == 204
    assert host.ok("GET", f"/networks/{net['id']}/visas") == visas

    # the guest's agent gets no more replies in; the host's agent still answers
    t2 = host.ok(
        "POST", f"/threads/{th['id']}/messages", json={"content": "again?", "user_id": hana["id"]}
    )
    settle(server, host.http, th["id"])
    assert [m["causation_id"] for m in _agent_msgs(host, th["id"], hbot["id"], t2["seq"])] == [
        t2["id"]
    ]
    assert _agent_msgs(host, th["id"], gbot["id"], t2["seq"]) == []

    # audited in both orgs' logs
    for org in (host, guest):
        recs = _audit(org, "network.visa_revoke")
        assert len(recs) == 1, recs
        assert recs[0]["org_id"] == org.id and recs[0]["resource_id"] == net["id"]
        assert recs[0]["data"] == {"visa_id": visa, "org_id": guest.id, "members_removed": 2}
    assert _audit(third, "network.visa_revoke") == []

    # re-joining with a valid code makes a new visa; the history is readable again
    again = _join(guest, code, user_ids=[gus["id"]])
    assert again["visa_id"] != visa
    assert [v["id"] for v in guest.ok("GET", f"/networks/{net['id']}/visas")] == [
        visa,
        again["visa_id"],
    ]
    msgs = all_envelopes(guest.http, th["id"], messages_only=True)
    assert [m["content"] for m in msgs if m["sender"]["kind"] == "user"] == [
        "hi",
        "plan?",
        "again?",
    ]
    assert gbot["id"] in {m["sender"]["id"] for m in msgs}
    assert gbot["id"] not in _member_ids(guest, net["id"])


def test_a_member_org_leaves_and_rejoins(make_org) -> None:
    host, guest, outsider = make_org("Host"), make_org("Guest"), make_org("Out")
    net = _network(host)
    code = _invite(host, net["id"])["join_code"]
    gbot, gus = guest.agent("Guest Bot", "gbot"), guest.user("Gus")
    first = _join(guest, code, agent_ids=[gbot["id"]], user_ids=[gus["id"]])["visa_id"]
    th = host.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Shared"})
    guest.ok(
        "POST", f"/threads/{th['id']}/messages", json={"content": "hi", "agent_id": gbot["id"]}
    )

    # the host cannot leave its own network; an outsider cannot see it
    assert_error(host.http.post(f"/networks/{net['id']}/leave"), 409, "conflict")
    assert_error(outsider.http.post(f"/networks/{net['id']}/leave"), 404, "not_found")

    left = guest.ok("POST", f"/networks/{net['id']}/leave")
    assert set(left) == VISA_KEYS
    assert left["id"] == first and left["org_id"] == guest.id and left["org_name"] == "Guest"
    assert left["end_reason"] == "left" and left["revoked_at"] and left["members"] == []
    assert _member_ids(host, net["id"]) == set()
    assert guest.ok("GET", "/networks") == []
    assert_error(guest.http.get(f"/networks/{net['id']}"), 404, "not_found")
    assert_error(guest.http.get(f"/threads/{th['id']}"), 404, "not_found")
    assert_error(guest.http.post(f"/networks/{net['id']}/leave"), 404, "not_found")
    assert [(v["id"], v["end_reason"]) for v in host.ok("GET", f"/networks/{net['id']}/visas")] == [
        (first, "left")
    ]
    # the host may still "revoke" the ended visa: nothing changes
    assert host.http.delete(f"/networks/{net['id']}/visas/{first}").status_code == 204
    assert host.ok("GET", f"/networks/{net['id']}/visas")[0]["end_reason"] == "left"
    assert [m["content"] for m in host.ok("GET", f"/threads/{th['id']}/messages")["items"]] == [
        "hi"
    ]
    for org in (host, guest):
        recs = _audit(org, "network.leave")
        assert [(r["org_id"], r["resource_id"], r["data"]) for r in recs] == [
            (org.id, net["id"], {"visa_id": first, "org_id": guest.id, "members_removed": 2})
        ]
    assert _audit(host, "network.visa_revoke") == []

    # joining again: a new visa, counted as a new use of the code
    again = _join(guest, code, agent_ids=[gbot["id"]])
    assert again["visa_id"] != first
    assert _member_ids(host, net["id"]) == {gbot["id"]}
    assert [i["uses"] for i in host.ok("GET", f"/networks/{net['id']}/invites")] == [2]
    assert [
        (v["id"], v["end_reason"]) for v in guest.ok("GET", f"/networks/{net['id']}/visas")
    ] == [(first, "left"), (again["visa_id"], None)]
    assert guest.ok("GET", f"/threads/{th['id']}")["id"] == th["id"]
