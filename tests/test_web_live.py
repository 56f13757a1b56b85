"""The live thread view over plain HTTP and a real WebSocket: single-use WebSocket tickets, the
protocol state panel with ack/reject/close and verify history, and posting with an audience."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from agent_network.api.realtime.tickets import TicketBook
from agent_network.errors import AuthenticationError
from conftest import LiveServer, Org
from web_helpers import csrf_of, sign_in


def _ws_url(srv: LiveServer) -> str:
    return srv.url.replace("http://", "ws://") + "/api/v1/ws"


def _token(org: Org, user: dict[str, Any]) -> str:
    made = org.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": user["id"]})
    return str(made["secret"])


def _ticket(c: Any, csrf: str) -> str:
    r = c.post("/app/ws-ticket", data={"csrf_token": csrf})
    assert r.status_code == 200, r.text
    assert "no-store" in r.headers["cache-control"]
    ticket = r.json()["ticket"]
    assert ticket.startswith("an_wst_") and r.json()["url"] == "/api/v1/ws"
    return str(ticket)


@contextlib.contextmanager
def _auth(srv: LiveServer, token: str) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    with connect(_ws_url(srv), open_timeout=10) as ws:
        ws.send(json.dumps({"type": "auth", "token": token}))
        yield ws, json.loads(ws.recv(timeout=10))


def _refused(srv: LiveServer, token: str) -> None:
    with _auth(srv, token) as (ws, first):
        assert first["type"] == "error" and first["error"]["code"] == "unauthenticated", first
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_a_ws_ticket_stands_for_the_sessions_credential_once(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    srv = server
    alex = org.user("Alex")
    team = org.team("Ops", ("user", alex["id"]))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "rollout-status"})
    cred = org.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": alex["id"]})
    with sign_in(srv, cred["secret"]) as c:
        csrf = csrf_of(c.get("/app/").text)
        # a ticket needs the session's CSRF token
        assert c.post("/app/ws-ticket", data={}).status_code == 403
        assert c.post("/app/ws-ticket", data={"csrf_token": "forged"}).status_code == 403
        ticket = _ticket(c, csrf)
        with _auth(srv, ticket) as (ws, welcome):
            # the same principal as the credential itself: Alex's user token
            assert welcome["type"] == "welcome", welcome
            assert welcome["principal"]["kind"] == "user"
            assert welcome["principal"]["subject_id"] == alex["id"]
            ws.send(json.dumps({"type": "join", "thread_id": thread["id"], "after": 0}))
            assert json.loads(ws.recv(timeout=10))["type"] == "joined"
        _refused(srv, ticket)  # single use
        _refused(srv, "an_wst_" + "x" * 43)  # unknown
        # signed out: a ticket issued before is refused
        late = _ticket(c, csrf)
        assert c.post("/app/logout", data={"csrf_token": csrf}).status_code == 303
        _refused(srv, late)
        assert c.post("/app/ws-ticket", data={"csrf_token": csrf}).status_code == 401
    # a revoked credential: its ticket is refused (the ticket resolves to the credential,
    # which is authenticated again)
    with sign_in(srv, cred["secret"]) as c:
        ticket = _ticket(c, csrf_of(c.get("/app/").text))
        org.ok("DELETE", f"/credentials/{cred['credential']['id']}")
        _refused(srv, ticket)


def test_tickets_expire_and_follow_their_issuer() -> None:
    book = TicketBook(ttl=0.05)
    expired = book.issue("an_org_secret")
    time.sleep(0.1)
    with pytest.raises(AuthenticationError):
        book.redeem(expired)
    alive = [True]
    ticket = TicketBook().issue("an_org_secret", lambda: alive[0])
    alive[0] = False
    with pytest.raises(AuthenticationError):
        TicketBook().redeem(ticket)  # another book (another process) does not know it
    book2 = TicketBook()
    t2 = book2.issue("an_org_secret", lambda: alive[0])
    with pytest.raises(AuthenticationError):
        book2.redeem(t2)  # its issuer no longer vouches for it (signed out)
    book3 = TicketBook(cap=2)
    first = book3.issue("a")
    book3.issue("b")
    book3.issue("c")
    assert len(book3) == 2
    with pytest.raises(AuthenticationError):
        book3.redeem(first)  # the oldest was dropped


def _consulting(org: Org) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    alex, sam = org.user("Alex"), org.user("Sam")
    team = org.team("Ops", ("user", alex["id"]), ("user", sam["id"]))
    thread = org.ok(
        "POST",
        f"/teams/{team['id']}/threads",
        json={
            "title": "ask sam",
            "adapter": "consulting",
            "participants": [{"kind": "user", "id": alex["id"]}, {"kind": "user", "id": sam["id"]}],
        },
    )
    return alex, sam, thread


def test_the_state_panel_answers_an_invitation_verifies_and_closes(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    srv = server
    _alex, sam, thread = _consulting(org)
    assert [p["id"] for p in thread["pending_acks"]] == [sam["id"]]
    url = f"/app/threads/{thread['id']}"
    with sign_in(srv, _token(org, sam)) as c:
        page = c.get(url)
        assert page.status_code == 200
        assert 'src="/app/static/thread.js"' in page.text
        assert f'data-thread-id="{thread["id"]}"' in page.text
        assert "Whose turn" in page.text and "invited" in page.text
        assert "Accept as Sam" in page.text and "Decline as Sam" in page.text
        csrf = csrf_of(page.text)
        member = f"user:{sam['id']}"
        # without the CSRF token: refused, nothing written
        assert c.post(f"{url}/ack", data={"member": member}).status_code == 403
        assert org.ok("GET", f"/threads/{thread['id']}")["status"] == "invited"
        # htmx: the panel alone comes back, in place
        hx = {"HX-Request": "true", "X-CSRF-Token": csrf}
        r = c.post(f"{url}/ack", data={"member": member}, headers=hx)
        assert r.status_code == 200, r.text
        assert r.text.lstrip().startswith('<section class="card state" id="state"')
        assert 'data-status="active"' in r.text and "Accept as" not in r.text
        assert org.ok("GET", f"/threads/{thread['id']}")["status"] == "active"
        # a second ack: the API's refusal next to the button (409 protocol_violation)
        again = c.post(f"{url}/ack", data={"member": member, "csrf_token": csrf})
        assert again.status_code == 409 and 'class="error"' in again.text
        # verify history: the hash-chain check's result
        v = c.post(f"{url}/verify", data={"csrf_token": csrf}, headers=hx)
        assert v.status_code == 200 and "History verified" in v.text, v.text
        # close, then closing again is refused next to the close button
        closed = c.post(f"{url}/close", data={"reason": "done"}, headers=hx)
        assert closed.status_code == 200, closed.text
        assert org.ok("GET", f"/threads/{thread['id']}")["status"] in ("closing", "closed")
        twice = c.post(f"{url}/close", data={"reason": "again", "csrf_token": csrf})
        assert twice.status_code == 409 and 'id="close-error"' in twice.text
        assert c.post(f"{url}/dance", data={"csrf_token": csrf}).status_code == 404


def test_a_declined_invitation_closes_the_thread(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    srv = server
    _alex, sam, thread = _consulting(org)
    url = f"/app/threads/{thread['id']}"
    with sign_in(srv, org.key) as c:  # an org key answers for its own person
        page = c.get(url).text
        assert "Decline as Sam" in page
        r = c.post(
            f"{url}/reject",
            data={"member": f"user:{sam['id']}", "reason": "busy", "csrf_token": csrf_of(page)},
        )
        assert r.status_code == 200, r.text
        got = org.ok("GET", f"/threads/{thread['id']}")
        assert got["status"] in ("closing", "closed")
        bad = c.post(f"{url}/ack", data={"member": "nobody", "csrf_token": csrf_of(page)})
        assert bad.status_code == 422 and "choose whom" in bad.text


def test_close_errors_show_next_to_the_close_button(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    srv = server
    alex = org.user("Alex")
    team = org.team("Ops", ("user", alex["id"]))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "open"})
    url = f"/app/threads/{thread['id']}"
    with sign_in(srv, org.key) as c:
        page = c.get(url).text
        assert "Close thread" in page
        r = c.post(f"{url}/close", data={"reason": "x" * 300, "csrf_token": csrf_of(page)})
        assert r.status_code == 422 and 'id="close-error"' in r.text, r.text
        assert org.ok("GET", f"/threads/{thread['id']}")["status"] == "open"


def test_a_person_posts_to_an_audience_from_the_form(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    srv = server
    alex, sam, cat = org.user("Alex"), org.user("Sam"), org.user("Cat")
    team = org.team("Ops", *(("user", u["id"]) for u in (alex, sam, cat)))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})
    url = f"/app/threads/{thread['id']}"
    with sign_in(srv, _token(org, alex)) as c:
        page = c.get(url).text
        assert '<label for="audience">' in page and f'value="{sam["id"]}"' in page
        form = [
            ("csrf_token", csrf_of(page)),
            ("content", "just for Sam"),
            ("audience", sam["id"]),
            ("audience", alex["id"]),
        ]
        r = c.post(
            f"{url}/messages",
            content="&".join(f"{k}={v}" for k, v in form),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 303, r.text
    got = org.ok("GET", f"/threads/{thread['id']}/messages")["items"]
    assert [(m["content"], sorted(m["audience"])) for m in got] == [
        ("just for Sam", sorted([sam["id"], alex["id"]]))
    ]
    with sign_in(srv, _token(org, cat)) as c:  # not addressed to Cat: left out of Cat's page
        page = c.get(url)
        assert page.status_code == 200 and "just for Sam" not in page.text


def test_the_demo_prints_sign_in_links_for_the_web_app(server: LiveServer) -> None:
    """``demo --keep`` ends with the app's URL and a working sign-in link per person."""
    from rich.console import Console

    from agent_network.demo import Company, _app_links

    acme = Company(server.url, server.admin_key, "Acme")
    alex = acme.call("POST", "/users", json={"name": "Alex Rivera"})
    out = Console(record=True, width=400)
    _app_links(out, server.url, [(acme, {"user": alex})], "thr_x")
    text = out.export_text()
    assert f"Web app: {server.url}/app/" in text
    m = re.search(
        rf"Sign in as Alex Rivera \(Acme\): {re.escape(server.url)}/app/login#key=(\S+)", text
    )
    assert m, text
    with sign_in(server, m.group(1)) as c:  # the token in the link signs Alex in
        assert "signed in with a user token" in c.get("/app/").text
    acme.http.close()
