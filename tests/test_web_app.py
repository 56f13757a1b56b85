"""The web app over plain HTTP against a live server: offline assets, sign-in sessions, CSRF,
scope (not found), escaping, CSP, and the admin's org keys (API and pages)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import LiveServer, Org, assert_error
from web_helpers import browser_client, csrf_of, sign_in

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "src" / "agent_network" / "web"
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)


def _thread(org: Org, *, title: str = "t") -> tuple[dict[str, Any], dict[str, Any]]:
    user = org.user("Alex")
    team = org.team("Ops", ("user", user["id"]))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": title})
    return user, thread


def _post(org: Org, thread_id: str, user_id: str, content: str) -> None:
    org.ok("POST", f"/threads/{thread_id}/messages", json={"content": content, "user_id": user_id})


def _check_page(r: httpx.Response) -> None:
    """Every page: HTML, the CSP without inline script, and no inline script in the page."""
    assert r.headers["content-type"].startswith("text/html"), r.headers
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    assert not INLINE_SCRIPT.search(r.text), INLINE_SCRIPT.search(r.text)
    assert "Traceback" not in r.text


# ---------------------------------------------------------------------- assets and docs


def test_api_docs_are_served_from_packaged_assets(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/api/v1/docs")
        assert r.status_code == 200
        assert "/app/static/swagger/swagger-ui-bundle.js" in r.text
        assert "/app/static/swagger/swagger-ui.css" in r.text
        # nothing loaded from another host: every src/href is a path on this server
        for url in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert url.startswith("/"), url
        assert "cdn." not in r.text
        for path in (
            "/app/static/swagger/swagger-ui-bundle.js",
            "/app/static/swagger/swagger-ui.css",
            "/app/static/htmx.min.js",
            "/app/static/app.css",
        ):
            asset = c.get(path)
            assert asset.status_code == 200, path
            assert len(asset.content) > 1000, path
        assert c.get("/api/v1/openapi.json").status_code == 200


def test_package_data_ships_every_web_asset() -> None:
    """Every file of src/agent_network/web (templates, static) is matched by the wheel's
    package-data patterns, so an installed app has its pages and assets."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = conf["tool"]["setuptools"]["package-data"]["agent_network"]
    pkg = ROOT / "src" / "agent_network"
    files = [p for p in WEB.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".html" for p in files) and any(p.suffix == ".js" for p in files)
    for f in files:
        if f.suffix == ".py":
            continue
        rel = f.relative_to(pkg).as_posix()
        assert any(_glob_match(rel, pat) for pat in patterns), f"{rel} is not packaged"


def _glob_match(rel: str, pattern: str) -> bool:
    """setuptools' package-data glob: ``*`` never crosses a ``/``."""
    parts, pats = rel.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pats, strict=True)
    )


# ---------------------------------------------------------------------- sign-in and sessions


def test_sign_in_sets_a_safe_session_cookie_and_shows_the_org_home(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme <b>Corp</b>")
    org.agent("Scout", "scout")
    with browser_client(server) as c:
        assert c.get("/app/").headers["location"] == "/app/login"
        login = c.get("/app/login")
        _check_page(login)
        assert '<label for="key">' in login.text
        r = c.post("/app/login", data={"key": org.key, "csrf_token": csrf_of(login.text)})
        assert r.status_code == 303 and r.headers["location"] == "/app/"
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("an_session="))
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/app" in low
        assert "secure" not in low  # plain HTTP here; Secure when the request is HTTPS
        assert org.key not in cookie  # the cookie holds a random session id, not the key
        home = c.get("/app/")
        assert home.status_code == 200
        _check_page(home)
        assert "Acme &lt;b&gt;Corp&lt;/b&gt;" in home.text
        assert "Scout" in home.text and "scout" in home.text


def test_a_wrong_key_is_shown_next_to_the_field(server: LiveServer) -> None:
    with browser_client(server) as c:
        login = c.get("/app/login")
        r = c.post("/app/login", data={"key": "an_org_nope", "csrf_token": csrf_of(login.text)})
        assert r.status_code == 401
        _check_page(r)
        assert 'id="key-error"' in r.text and "not valid" in r.text
        assert "an_session" not in r.headers.get("set-cookie", "")


def test_login_without_its_csrf_token_is_refused(server: LiveServer) -> None:
    with browser_client(server) as c:
        c.get("/app/login")
        r = c.post("/app/login", data={"key": server.admin_key})
        assert r.status_code == 403
        _check_page(r)
        assert "an_session" not in r.headers.get("set-cookie", "")


def test_form_posts_without_the_sessions_csrf_token_are_refused(server: LiveServer) -> None:
    with sign_in(server, server.admin_key) as c:
        for data in ({"name": "Evil"}, {"name": "Evil", "csrf_token": "forged"}):
            r = c.post("/app/admin/orgs", data=data)
            assert r.status_code == 403, r.text
            _check_page(r)
            assert "Form refused" in r.text
        # a JSON body (not a form the app sends) is refused too
        r = c.post("/app/admin/orgs", json={"name": "Evil"})
        assert r.status_code == 403
        _check_page(r)
        # the htmx header is accepted in place of the hidden field
        token = csrf_of(c.get("/app/admin").text)
        ok = c.post("/app/admin/orgs", data={"name": "Good"}, headers={"X-CSRF-Token": token})
        assert ok.status_code == 201
    with server.client(server.admin_key) as admin:
        names = [o["name"] for o in admin.get("/orgs").json()]
    assert "Evil" not in names and "Good" in names


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    with sign_in(server, org.key) as c:
        cookie = c.cookies["an_session"]
        home = c.get("/app/")
        assert home.status_code == 200
        # sign-out needs the CSRF token too
        assert c.post("/app/logout", data={}).status_code == 403
        r = c.post("/app/logout", data={"csrf_token": csrf_of(home.text)})
        assert r.status_code == 303 and r.headers["location"] == "/app/login?signed_out=1"
    with browser_client(server) as replay:
        replay.cookies.set("an_session", cookie)
        r = replay.get("/app/")
        assert r.status_code == 303 and r.headers["location"] == "/app/login"


def test_a_revoked_credential_ends_its_session(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    cred = org.ok("POST", "/credentials", json={"kind": "org_key", "name": "web"})
    with sign_in(server, cred["secret"]) as c:
        assert c.get("/app/").status_code == 200
        org.ok("DELETE", f"/credentials/{cred['credential']['id']}")
        r = c.get("/app/")
        assert r.status_code == 303 and r.headers["location"] == "/app/login"


def test_an_agent_token_cannot_sign_in(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    agent = org.agent("Scout", "scout")
    token = org.ok("POST", "/credentials", json={"kind": "agent_token", "subject_id": agent["id"]})[
        "secret"
    ]
    with browser_client(server) as c:
        login = c.get("/app/login")
        r = c.post("/app/login", data={"key": token, "csrf_token": csrf_of(login.text)})
        assert r.status_code == 403 and "agent token" in r.text


# ---------------------------------------------------------------------- pages and scope


def test_a_user_token_sees_its_teams_and_not_org_administration(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    user, thread = _thread(org, title="ours")
    other_team = org.team("Secret team")
    hidden = org.ok("POST", f"/teams/{other_team['id']}/threads", json={"title": "hidden"})
    token = org.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": user["id"]})
    with sign_in(server, token["secret"]) as c:
        home = c.get("/app/")
        assert home.status_code == 200
        assert "ours" in home.text and "Secret team" not in home.text
        assert c.get(f"/app/threads/{thread['id']}").status_code == 200
        missing = c.get("/app/threads/thr_doesnotexist")
        out_of_scope = c.get(f"/app/threads/{hidden['id']}")
        assert out_of_scope.status_code == missing.status_code == 404
        assert out_of_scope.text == missing.text
        assert c.get("/app/admin").status_code == 404  # the admin pages do not exist for it


def test_another_orgs_thread_shows_the_same_not_found_page(
    server: LiveServer, make_org: Any
) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    _, thread = _thread(acme, title="acme private")
    with sign_in(server, globex.key) as c:
        guessed = c.get(f"/app/threads/{thread['id']}")
        missing = c.get("/app/threads/thr_0000000000")
        unknown = c.get("/app/no/such/page")
        for r in (guessed, missing, unknown):
            assert r.status_code == 404
            _check_page(r)
        assert guessed.text == missing.text == unknown.text
        assert "acme private" not in guessed.text
        bad = c.get(f"/app/threads/{thread['id']}?after=notanumber")
        assert bad.status_code == 404 and bad.text == missing.text


def test_message_text_is_escaped(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    user, thread = _thread(org, title="<img src=x onerror=alert(1)>")
    _post(org, thread["id"], user["id"], "<script>alert('xss')</script> & [/] {{ 7*7 }}")
    with sign_in(server, org.key) as c:
        for path in (f"/app/threads/{thread['id']}", "/app/"):
            r = c.get(path)
            assert r.status_code == 200
            _check_page(r)
            assert "<img src=x" not in r.text
            assert "&lt;img src=x onerror=alert(1)&gt;" in r.text
        page = c.get(f"/app/threads/{thread['id']}").text
        assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt; &amp; [/] {{ 7*7 }}" in page
        assert "<script>alert" not in page


def test_thread_history_is_paged(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    user, thread = _thread(org)
    for i in range(60):
        _post(org, thread["id"], user["id"], f"message number {i:02d}")
    with sign_in(server, org.key) as c:
        newest = c.get(f"/app/threads/{thread['id']}").text
        assert "message number 59" in newest and "message number 00" not in newest
        older = re.search(r'href="(/app/threads/[^"]+)" rel="prev"', newest)
        assert older, "no link to older messages"
        first = c.get(older.group(1).replace("&amp;", "&")).text
        assert "message number 00" in first
        assert 'rel="next"' in first


# ---------------------------------------------------------------------- admin: orgs and keys


def test_admin_lists_orgs_and_issues_a_new_org_key_over_the_api(
    server: LiveServer, make_org: Any
) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    with server.client(server.admin_key) as admin:
        listed = admin.get("/orgs")
        assert listed.status_code == 200
        assert {o["id"] for o in listed.json()} >= {acme.id, globex.id}
        r = admin.post(f"/orgs/{acme.id}/keys", json={"name": "recovery"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["secret"].startswith("an_org_")
        assert body["credential"]["org_id"] == acme.id
        assert body["credential"]["kind"] == "org_key" and "key_hash" not in body["credential"]
        assert admin.post(f"/orgs/{acme.id}/keys").status_code == 201  # body optional
        assert_error(admin.post("/orgs/org_missing/keys", json={}), 404, "not_found")
        assert_error(
            admin.post(f"/orgs/{acme.id}/keys", json={"name": " "}), 422, "invalid_request"
        )
    with server.client(body["secret"]) as new:
        assert new.get("/orgs/me").json()["id"] == acme.id
    # the old key still works; the org sees the issue in its own audit log
    audit = acme.ok("GET", "/audit", params={"action": "credential.issue"})
    assert any(
        a["resource_id"] == body["credential"]["id"] and a["principal_kind"] == "admin"
        for a in audit
    ), audit
    assert not globex.ok("GET", "/audit", params={"action": "credential.issue"})
    # only the admin: an org key (its own org or another) and a user token are refused
    assert_error(acme.http.post(f"/orgs/{acme.id}/keys", json={}), 403, "permission_denied")
    assert_error(acme.http.post(f"/orgs/{globex.id}/keys", json={}), 403, "permission_denied")
    assert_error(acme.http.get("/orgs"), 403, "permission_denied")
    user = acme.user("Alex")
    token = acme.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": user["id"]})
    with server.client(token["secret"]) as c:
        assert_error(c.post(f"/orgs/{acme.id}/keys", json={}), 403, "permission_denied")


def test_admin_pages_create_an_org_and_issue_a_key(server: LiveServer) -> None:
    with sign_in(server, server.admin_key) as c:
        page = c.get("/app/admin")
        assert page.status_code == 200
        _check_page(page)
        assert '<label for="org-name">' in page.text
        empty = c.post("/app/admin/orgs", data={"name": "  ", "csrf_token": csrf_of(page.text)})
        assert empty.status_code == 422 and 'id="org-name-error"' in empty.text
        r = c.post("/app/admin/orgs", data={"name": "Initech", "csrf_token": csrf_of(page.text)})
        assert r.status_code == 201
        key = re.search(r'value="(an_org_[^"]+)"', r.text)
        assert key, r.text
        org_id = re.search(r'action="/app/admin/orgs/(org_[^/]+)/keys"', r.text)
        assert org_id
        issued = c.post(
            f"/app/admin/orgs/{org_id.group(1)}/keys", data={"csrf_token": csrf_of(r.text)}
        )
        assert issued.status_code == 201
        new_key = re.search(r'value="(an_org_[^"]+)"', issued.text)
        assert new_key and new_key.group(1) != key.group(1)
        missing = c.post("/app/admin/orgs/org_nope/keys", data={"csrf_token": csrf_of(r.text)})
        assert missing.status_code == 404
        # the admin has no org home: it is sent to its own page
        assert c.get("/app/").headers["location"] == "/app/admin"
    for k in (key.group(1), new_key.group(1)):
        with server.client(k) as org:
            assert org.get("/orgs/me").json()["name"] == "Initech"


@pytest.mark.parametrize("path", ["/app/", "/app/admin", "/app/threads/thr_x"])
def test_pages_need_a_session(server: LiveServer, path: str) -> None:
    with browser_client(server) as c:
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/app/login"
        assert c.post("/app/admin/orgs", data={"name": "x"}).status_code == 303


def test_the_sdk_lists_orgs_and_issues_an_org_key(server: LiveServer, make_org: Any) -> None:
    from agent_network.client import AsyncClient

    acme = make_org("Acme")

    async def scenario() -> None:
        async with AsyncClient(server.url, server.admin_key) as admin:
            assert acme.id in [o.id for o in await admin.orgs.list()]
            issued = await admin.orgs.issue_key(acme.id, name="recovery")
            assert issued.credential.org_id == acme.id and issued.credential.name == "recovery"
        async with AsyncClient(server.url, issued.secret) as org:
            assert (await org.orgs.me()).id == acme.id

    anyio.run(scenario)


def test_a_person_posts_from_the_thread_page(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    alex, thread = _thread(acme, title="rollout-status")
    url = f"/app/threads/{thread['id']}"
    token = acme.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": alex["id"]})
    with sign_in(server, token["secret"]) as c:
        page = c.get(url)
        assert '<label for="content">' in page.text and 'name="user_id"' not in page.text
        csrf = csrf_of(page.text)
        assert c.post(f"{url}/messages", data={"content": "forged"}).status_code == 403
        empty = c.post(f"{url}/messages", data={"content": "  ", "csrf_token": csrf})
        assert empty.status_code == 422 and 'id="post-error"' in empty.text
        r = c.post(f"{url}/messages", data={"content": "<b>hi</b> from Alex", "csrf_token": csrf})
        assert r.status_code == 303 and r.headers["location"] == f"{url}#post"
        assert "&lt;b&gt;hi&lt;/b&gt; from Alex" in c.get(url).text
    with sign_in(server, acme.key) as c:
        page = c.get(url)
        assert '<label for="user-id">Post as</label>' in page.text
        csrf = csrf_of(page.text)
        nobody = c.post(f"{url}/messages", data={"content": "who?", "csrf_token": csrf})
        assert nobody.status_code == 422 and "choose the person" in nobody.text
        assert ">who?</textarea>" in nobody.text  # the text is kept
        r = c.post(
            f"{url}/messages",
            data={"content": "org key, as Alex", "user_id": alex["id"], "csrf_token": csrf},
        )
        assert r.status_code == 303
    with sign_in(server, globex.key) as c:
        csrf = csrf_of(c.get("/app/").text)
        r = c.post(f"{url}/messages", data={"content": "intruder", "csrf_token": csrf})
        assert r.status_code == 404 and "Not found" in r.text
    posted = acme.ok("GET", f"/threads/{thread['id']}/messages")["items"]
    assert [(m["content"], m["sender"]["id"]) for m in posted] == [
        ("<b>hi</b> from Alex", alex["id"]),
        ("org key, as Alex", alex["id"]),
    ]
