"""The web app's pages for an agent's rule and resume, protocol-thread creation, and the org's
credentials: over plain HTTP (each change checked through the API, errors next to their field,
nothing half-written, another org's ids not found), and one walk through them in a real
headless chromium at 360 px (keyboard, copy button, no CSP violation)."""

from __future__ import annotations

import re
from typing import Any

import httpx

from conftest import LiveServer, Org, all_envelopes
from web_helpers import artefacts_dir, chromium, csrf_of, sign_in  # noqa: F401  (the fixture)

SECRET_RX = re.compile(r'id="issued-secret" class="mono" readonly value="([^"]+)"')


def _post(c: httpx.Client, url: str, page_url: str, **fields: Any) -> httpx.Response:
    """Post a form of the page at ``page_url`` (with its CSRF token); lists repeat a field."""
    data: dict[str, Any] = {"csrf_token": csrf_of(c.get(page_url).text)}
    for k, v in fields.items():
        data[k] = [str(x) for x in v] if isinstance(v, list) else str(v)
    return c.post(url, data=data)


def _location(r: httpx.Response, prefix: str) -> str:
    assert r.status_code == 303, r.text
    loc = r.headers["location"]
    assert loc.startswith(prefix), loc
    return loc.removeprefix(prefix)


# ----------------------------------------------------------------------------- rule and resume


def test_agent_resume_and_rule_from_the_agent_page(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    alex = acme.user("Alex Rivera")
    with sign_in(server, acme.key) as a:
        # create with a resume (one capability a line)
        r = _post(
            a,
            "/app/agents",
            "/app/agents",
            name="Ops",
            lookup_key="ops",
            model="test",
            resume_capabilities="rollout status\nbilling",
            resume_domains="operations",
            resume_summary="Knows the rollout plan.",
        )
        agent_id = _location(r, "/app/agents/")
        resume = acme.ok("GET", f"/agents/{agent_id}")["resume"]
        assert resume["capabilities"] == ["rollout status", "billing"]
        assert resume["domains"] == ["operations"]
        assert resume["summary"] == "Knows the rollout plan."
        page = f"/app/agents/{agent_id}"
        html = a.get(page).text
        assert 'for="edit-resume-capabilities"' in html and "rollout status\nbilling" in html
        # edit: change the summary; a too-long summary is refused next to its field
        base = {"name": "Ops", "lookup_key": "ops", "model": "test", "metadata": "{}"}
        r = _post(a, f"{page}/edit", page, **base, resume_summary="x" * 4001)
        assert r.status_code == 422 and 'id="edit-resume-summary-error"' in r.text, r.text
        assert acme.ok("GET", f"/agents/{agent_id}")["resume"]["summary"] == resume["summary"]
        r = _post(a, f"{page}/edit", page, **base, resume_domains="ops\nsre", resume_summary="s")
        assert r.status_code == 200 and "Saved." in r.text
        resume = acme.ok("GET", f"/agents/{agent_id}")["resume"]
        assert (resume["capabilities"], resume["domains"]) == ([], ["ops", "sre"])
        # all empty clears it
        _post(a, f"{page}/edit", page, **base)
        assert acme.ok("GET", f"/agents/{agent_id}")["resume"] is None

        # the rule: defaults shown, then replaced with names resolved to ids
        html = a.get(page).text
        assert 'id="h-rule"' in html and 'id="rule-inbound-from"' in html
        assert 'for="rule-rate-messages"' in html
        r = _post(
            a,
            f"{page}/rule",
            page,
            inbound_from="org:self\nAlex Rivera",
            outbound_to="*",
            rate_messages="5",
            rate_per_seconds="60",
            inbox_cap="3",
            allowed_adapters="open, discussion",
        )
        assert r.status_code == 200 and "Rule saved" in r.text, r.text
        rule = acme.ok("GET", f"/agents/{agent_id}/rule")
        assert rule["inbound_from"] == ["org:self", alex["id"]]
        assert rule["rate"] == {"messages": 5, "per_seconds": 60.0}
        assert (rule["inbox_cap"], rule["allowed_adapters"]) == (3, ["open", "discussion"])
        assert rule["max_concurrent_threads"] is None
        html = a.get(page).text
        assert alex["id"] in html and "Alex Rivera" in html  # who the id is
        # a name nobody has: refused next to its field, text kept, nothing written
        r = _post(a, f"{page}/rule", page, inbound_from="Nobody Here", outbound_to="*")
        assert r.status_code == 422 and 'id="rule-inbound-from-error"' in r.text, r.text
        assert "Nobody Here" in r.text
        r = _post(a, f"{page}/rule", page, inbound_from="*", rate_messages="5")
        assert r.status_code == 422 and 'id="rule-rate-error"' in r.text, r.text
        r = _post(a, f"{page}/rule", page, inbound_from="*", inbox_cap="-1")
        assert r.status_code == 422 and 'id="rule-inbox-cap-error"' in r.text, r.text
        assert acme.ok("GET", f"/agents/{agent_id}/rule") == rule
        # without the CSRF token: refused
        assert a.post(f"{page}/rule", data={"inbound_from": "*"}).status_code == 403
        assert acme.ok("GET", f"/agents/{agent_id}/rule") == rule
    with sign_in(server, globex.key) as g:
        # another org's agent: the not-found page, for the page and the rule form
        assert g.get(page).status_code == 404
        r = g.post(f"{page}/rule", data={"csrf_token": csrf_of(g.get("/app/agents").text)})
        assert r.status_code == 404
    assert acme.ok("GET", f"/agents/{agent_id}/rule") == rule


# ----------------------------------------------------------------------------- protocol threads


def test_protocol_threads_from_the_team_page(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    alex, pat = acme.user("Alex Rivera"), acme.user("Pat")
    bot = acme.agent("Ops", "ops", model="test")
    team = acme.team("Ops team", ("user", alex["id"]), ("user", pat["id"]), ("agent", bot["id"]))
    page = f"/app/teams/{team['id']}"
    people = [f"user:{alex['id']}", f"agent:{bot['id']}"]
    with sign_in(server, acme.key) as a:
        html = a.get(page).text
        assert 'id="protocol-thread"' in html and 'for="proto-adapter"' in html
        assert 'value="consulting"' in html and 'value="round_robin"' in html
        # consulting: Alex asks the agent
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="ask ops",
            adapter="consulting",
            participants=people,
            initiator=f"user:{alex['id']}",
            ttl="3600",
        )
        thread_id = _location(r, "/app/threads/")
        thread = acme.ok("GET", f"/threads/{thread_id}")
        assert (thread["title"], thread["adapter"]) == ("ask ops", "consulting")
        assert a.get(f"/app/threads/{thread_id}").status_code == 200
        # round robin: a workflow over the participants, initiator first, no acks needed
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="standup",
            adapter="round_robin",
            participants=[f"agent:{bot['id']}", f"user:{alex['id']}", f"user:{pat['id']}"],
            initiator=f"user:{alex['id']}",
            max_turns="6",
            no_acks="1",
        )
        rr_id = _location(r, "/app/threads/")
        rr = acme.ok("GET", f"/threads/{rr_id}")
        assert rr["adapter"] == "workflow" and rr["status"] == "active", rr
        created = all_envelopes(acme.http, rr_id)[0]
        graph = created["data"]["graph"]
        assert graph["max_turns"] == 6
        assert graph["order"] == [alex["id"], bot["id"], pat["id"]]
        before = len(acme.ok("GET", f"/teams/{team['id']}/threads"))
        # refusals next to their field, the form kept, nothing created
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="three",
            adapter="consulting",
            participants=[*people, f"user:{pat['id']}"],
        )
        assert r.status_code == 422 and 'id="proto-participants-error"' in r.text, r.text
        assert 'value="three"' in r.text and '<details id="protocol-thread" open>' in r.text
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="rr",
            adapter="round_robin",
            participants=people,
        )
        assert r.status_code == 422 and 'id="proto-max-turns-error"' in r.text, r.text
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="wf",
            adapter="workflow",
            participants=people,
            graph="{nope",
        )
        assert r.status_code == 422 and 'id="proto-graph-error"' in r.text, r.text
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="late",
            adapter="discussion",
            participants=people,
            ttl="-5",
        )
        assert r.status_code == 422 and 'id="proto-ttl-error"' in r.text, r.text
        assert len(acme.ok("GET", f"/teams/{team['id']}/threads")) == before
        # Pat is invited to a conversation: the thread page offers "Decline" with a reason
        r = _post(
            a,
            f"{page}/threads",
            page,
            protocol="1",
            title="chat",
            adapter="conversation",
            participants=[f"user:{alex['id']}", f"user:{pat['id']}"],
        )
        chat_id = _location(r, "/app/threads/")
        chat_page = f"/app/threads/{chat_id}"
        html = a.get(chat_page).text
        assert f'for="reject-reason-{pat["id"]}"' in html, html
        r = _post(
            a, f"{chat_page}/reject", chat_page, member=f"user:{pat['id']}", reason="on leave"
        )
        assert r.status_code < 400, r.text
        chat = acme.ok("GET", f"/threads/{chat_id}")
        assert chat["status"] in ("closing", "closed")
        rejected = [e for e in all_envelopes(acme.http, chat_id) if e["type"] == "thread.reject"]
        assert [e["data"].get("reason") for e in rejected] == ["on leave"], rejected
        # the plain form still opens an open thread
        r = _post(a, f"{page}/threads", page, title="plain")
        plain_id = _location(r, "/app/threads/")
        assert acme.ok("GET", f"/threads/{plain_id}")["adapter"] == "open"


# ----------------------------------------------------------------------------- credentials


def test_credentials_page_issue_rotate_revoke(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    alex = acme.user("Alex Rivera")
    bot = acme.agent("Ops", "ops", model="test")
    api = "/api/v1"
    with sign_in(server, acme.key) as a:
        html = a.get("/app/credentials").text
        assert 'href="/app/credentials"' in html and "signed in with it" in html
        assert 'for="new-kind"' in html and 'for="new-subject-id"' in html
        # a token without its subject: refused next to the field, nothing issued
        count = len(acme.ok("GET", "/credentials"))
        r = _post(a, "/app/credentials", "/app/credentials", kind="agent_token", subject_id="")
        assert r.status_code == 422 and 'id="new-subject-id-error"' in r.text, r.text
        r = _post(
            a,
            "/app/credentials",
            "/app/credentials",
            kind="user_token",
            subject_id=alex["id"],
            expires_hours="abc",
        )
        assert r.status_code == 422 and 'id="new-expires-hours-error"' in r.text, r.text
        assert len(acme.ok("GET", "/credentials")) == count
        # a read-only user token for Alex, expiring: the secret shown once with a copy button
        r = _post(
            a,
            "/app/credentials",
            "/app/credentials",
            kind="user_token",
            subject_id=alex["id"],
            name="alex laptop",
            expires_hours="2",
            read_only="1",
        )
        assert r.status_code == 201 and 'data-copy="#issued-secret"' in r.text, r.text
        m = SECRET_RX.search(r.text)
        assert m
        secret = m.group(1)
        assert secret not in a.get("/app/credentials").text
        listed = {c["name"]: c for c in acme.ok("GET", "/credentials")}
        cred = listed["alex laptop"]
        assert (cred["kind"], cred["subject_id"], cred["scopes"]) == (
            "user_token",
            alex["id"],
            ["read"],
        )
        assert cred["expires_at"] is not None
        # renew: a new expiry two days out; a bad number refused next to the row
        r = _post(a, f"/app/credentials/{cred['id']}/renew", "/app/credentials", hours="48")
        assert _location(r, "/app/credentials") == ""
        renewed = next(c for c in acme.ok("GET", "/credentials") if c["id"] == cred["id"])
        assert renewed["expires_at"] > cred["expires_at"]
        r = _post(a, f"/app/credentials/{cred['id']}/renew", "/app/credentials", hours="x")
        assert r.status_code == 422 and f'id="error-{cred["id"]}"' in r.text, r.text
        assert f'for="renew-{cred["id"]}"' in r.text
        with httpx.Client(base_url=server.url + api, timeout=30) as h:
            auth = {"Authorization": f"Bearer {secret}"}
            assert h.get("/threads", headers=auth).status_code == 200
            # rotate: a new secret, the old one stops at once
            r = _post(a, f"/app/credentials/{cred['id']}/rotate", "/app/credentials")
            assert r.status_code == 201 and f"<code>{cred['id']}</code> is revoked" in r.text
            m = SECRET_RX.search(r.text)
            assert m
            new_secret = m.group(1)
            assert h.get("/threads", headers=auth).status_code == 401
            new_auth = {"Authorization": f"Bearer {new_secret}"}
            assert h.get("/threads", headers=new_auth).status_code == 200
            new_id = next(
                c["id"]
                for c in acme.ok("GET", "/credentials")
                if c["name"] == "alex laptop" and c["revoked_at"] is None
            )
            # rotating the revoked one again: refused next to its row
            r = _post(a, f"/app/credentials/{cred['id']}/rotate", "/app/credentials")
            assert r.status_code == 422 and f'id="error-{cred["id"]}"' in r.text, r.text
            # revoke the new one
            r = _post(a, f"/app/credentials/{new_id}/revoke", "/app/credentials")
            assert _location(r, "/app/credentials") == ""
            assert h.get("/threads", headers=new_auth).status_code == 401
        # an agent token too
        r = _post(
            a, "/app/credentials", "/app/credentials", kind="agent_token", subject_id=bot["id"]
        )
        assert r.status_code == 201 and "agent token" in r.text
        assert a.post(f"/app/credentials/{new_id}/revoke", data={}).status_code == 403
        ours = acme.ok("GET", "/credentials")
    acme_key_id = next(c["id"] for c in ours if c["kind"] == "org_key")
    with sign_in(server, globex.key) as g:
        # another org's credential: not found, and it stays live
        page = g.get("/app/credentials").text
        assert acme_key_id not in page and alex["id"] not in page
        csrf = csrf_of(page)
        for action in ("rotate", "revoke"):
            r = g.post(f"/app/credentials/{acme_key_id}/{action}", data={"csrf_token": csrf})
            assert r.status_code == 404
    assert acme.ok("GET", "/credentials") == ours
    # a person's token signs in but cannot manage credentials: told why, no form
    token = acme.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": alex["id"]})[
        "secret"
    ]
    with sign_in(server, token) as u:
        html = u.get("/app/credentials").text
        assert "use an org key" in html and 'id="new-kind"' not in html


# ----------------------------------------------------------------------------- people


def test_people_auto_ack_and_delete(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    with sign_in(server, acme.key) as a:
        r = _post(a, "/app/people", "/app/people", name="Sam Auto", auto_ack="1")
        assert _location(r, "/app/people") == ""
        sam = next(u for u in acme.ok("GET", "/users") if u["name"] == "Sam Auto")
        assert sam["auto_ack"] is True
        html = a.get("/app/people").text
        assert "Stop auto-ack" in html and f'action="/app/people/{sam["id"]}/delete"' in html
        _post(a, f"/app/people/{sam['id']}/auto-ack", "/app/people", on="0")
        assert acme.ok("GET", f"/users/{sam['id']}")["auto_ack"] is False
        _post(a, f"/app/people/{sam['id']}/auto-ack", "/app/people", on="1")
        assert acme.ok("GET", f"/users/{sam['id']}")["auto_ack"] is True
        assert a.post(f"/app/people/{sam['id']}/delete", data={}).status_code == 403
    with sign_in(server, globex.key) as g:
        r = _post(g, f"/app/people/{sam['id']}/delete", "/app/people")
        assert r.status_code == 404
    assert acme.ok("GET", f"/users/{sam['id']}")["name"] == "Sam Auto"
    with sign_in(server, acme.key) as a:
        r = _post(a, f"/app/people/{sam['id']}/delete", "/app/people")
        assert _location(r, "/app/people") == ""
        assert "Sam Auto" not in a.get("/app/people").text
    assert acme.ok("GET", "/users") == []


# ----------------------------------------------------------------------------- in a browser


def test_rule_credentials_and_protocol_thread_in_a_browser_at_360px(
    chromium: Any,  # noqa: F811
    module_server: LiveServer,
) -> None:
    server = module_server
    acme = Org(server, "Acme Browser")
    alex = acme.user("Alex Rivera")
    bot = acme.agent("Ops", "ops", model="test")
    team = acme.team("Ops team", ("user", alex["id"]), ("agent", bot["id"]))
    ctx = chromium.new_context(base_url=server.url, viewport={"width": 360, "height": 740})
    ctx.set_default_timeout(20_000)
    problems: list[str] = []
    page = ctx.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    failed: list[str] = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    try:
        page.goto("/app/login")
        page.get_by_label("Key").fill(acme.key)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        # the rule, edited with labels and the keyboard
        page.goto(f"/app/agents/{bot['id']}")
        page.get_by_label("Reacts to messages from").fill("org:self")
        page.get_by_label("Inbox cap").fill("4")
        page.get_by_label("Inbox cap").press("Enter")
        page.get_by_text("Rule saved").wait_for()
        assert acme.ok("GET", f"/agents/{bot['id']}/rule")["inbox_cap"] == 4
        _no_sideways_scroll(page)
        page.locator("#rule").screenshot(
            path=str(artefacts_dir() / "agent-rule-360px.png"), caret="initial"
        )
        # credentials: issue, the secret shown once, copy it
        page.goto("/app/credentials")
        page.get_by_label("Kind").select_option("user_token")
        page.get_by_label("Acts as").select_option(alex["id"])
        page.get_by_label("Name").fill("phone")
        page.get_by_role("button", name="Issue").click()
        secret = page.locator("#issued-secret").input_value()
        with httpx.Client(base_url=server.url, timeout=30) as h:
            me = h.get("/api/v1/threads", headers={"Authorization": f"Bearer {secret}"})
            assert me.status_code == 200, me.text  # the secret shown is the token issued
        page.get_by_role("button", name="Copy").click()
        page.get_by_role("button", name="Copied").wait_for()
        _no_sideways_scroll(page)
        page.screenshot(path=str(artefacts_dir() / "credentials-360px.png"), caret="initial")
        # a protocol thread from the team page
        page.goto(f"/app/teams/{team['id']}")
        page.get_by_text("Open a protocol thread").click()
        page.get_by_label("Title", exact=True).fill("ask ops")
        page.get_by_label("Adapter").select_option("consulting")
        page.get_by_role("checkbox", name="Alex Rivera").check()
        page.get_by_role("checkbox", name="Ops").check()
        with page.expect_navigation():
            page.get_by_role("button", name="Open protocol thread").click()
        assert "/app/threads/" in page.url
        assert "consulting" in page.content()
        # no CSP violation, no script error; the only failed load is the browser's favicon
        assert not [p for p in problems if "Failed to load resource" not in p], problems
        assert all(u.endswith("/favicon.ico") for u in failed), failed
    finally:
        ctx.close()
        acme.http.close()


def _no_sideways_scroll(page: Any) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360 + 1, f"the page is {width}px wide at 360px"
