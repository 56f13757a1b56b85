"""The web app's management pages over plain HTTP: networks (create, invite, join, visas,
close), teams and members with roles, agents and routines, the audit log."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from conftest import LiveServer, Org
from web_helpers import csrf_of, sign_in

CODE_RX = re.compile(r'id="invite-code" class="mono" readonly value="([^"]+)"')


def _post(c: httpx.Client, url: str, page_url: str, **fields: Any) -> httpx.Response:
    """Post a form of the page at ``page_url`` (with its CSRF token); lists repeat a field."""
    csrf = csrf_of(c.get(page_url).text)
    data: dict[str, Any] = {"csrf_token": csrf}
    for k, v in fields.items():
        data[k] = [str(x) for x in v] if isinstance(v, list) else str(v)
    return c.post(url, data=data)


def _id_from(r: httpx.Response, prefix: str) -> str:
    assert r.status_code == 303, r.text
    loc = r.headers["location"]
    assert loc.startswith(prefix), loc
    return loc.removeprefix(prefix).split("#")[0]


def test_networks_from_create_to_invite_join_visa_and_close(
    server: LiveServer, make_org: Any
) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    alex = acme.user("Alex Rivera")
    sam, pat = globex.user("Sam Chen"), globex.user("Pat")
    private = acme.team("Acme private", ("user", alex["id"]))
    secret = acme.ok("POST", f"/teams/{private['id']}/threads", json={"title": "acme-only"})
    with sign_in(server, acme.key) as a:
        # an empty name is refused next to the field, nothing created
        r = _post(a, "/app/networks", "/app/networks", name=" ")
        assert r.status_code == 422 and 'id="name-error"' in r.text
        assert acme.ok("GET", "/networks") == []
        # without the CSRF token: refused
        assert a.post("/app/networks", data={"name": "x"}).status_code == 403
        net_id = _id_from(
            _post(a, "/app/networks", "/app/networks", name="Rollout"), "/app/networks/"
        )
        page = f"/app/networks/{net_id}"
        assert "Rollout" in a.get(page).text
        r = _post(a, f"{page}/members", page, member=f"user:{alex['id']}", role="member")
        assert r.status_code == 303, r.text
        # a thread in the network, opened from its page
        thread_id = _id_from(
            _post(a, f"{page}/threads", page, title="rollout-status"), "/app/threads/"
        )
        # an invite: the code shown once with a copy button, expiry and uses
        r = _post(a, f"{page}/invites", page, hours="2", max_uses="1")
        assert r.status_code == 201, r.text
        assert 'data-copy="#invite-code"' in r.text and "1 use(s)" in r.text
        m = CODE_RX.search(r.text)
        assert m, r.text
        code = m.group(1)
        assert code not in a.get(page).text  # shown once
        bad = _post(a, f"{page}/invites", page, hours="abc")
        assert bad.status_code == 422 and 'id="error-invites"' in bad.text
    with sign_in(server, globex.key) as g:
        # a wrong code: the same refusal next to the field as any invalid code
        r = _post(g, "/app/networks/join", "/app/networks", code="nope", user_ids=[sam["id"]])
        assert r.status_code >= 400 and 'id="join-error"' in r.text, r.text
        r = _post(g, "/app/networks/join", "/app/networks", code=code, user_ids=[sam["id"]])
        assert _id_from(r, "/app/networks/") == net_id
        page = f"/app/networks/{net_id}"
        seen = g.get(page).text
        listed = seen.split('id="members">')[1].split("</ul>")[0]
        assert "Sam Chen" in listed and "Alex Rivera" in listed and "Pat" not in listed
        assert "rollout-status" in seen and "Leave network" in seen
        assert "Make an invite code" not in seen  # invites are the host's
        # Globex never sees Acme's private team or thread: the same not-found page
        for url in (f"/app/teams/{private['id']}", f"/app/threads/{secret['id']}"):
            r = g.get(url)
            assert r.status_code == 404 and "Not found" in r.text and "acme-only" not in r.text
        assert "acme-only" not in g.get("/app/").text
        assert g.get(f"/app/threads/{thread_id}").status_code == 200
        # a second use of a one-use code is refused
        r = _post(g, "/app/networks/join", "/app/networks", code=code, user_ids=[pat["id"]])
        assert r.status_code >= 400 and 'id="join-error"' in r.text
    with sign_in(server, acme.key) as a:
        page = f"/app/networks/{net_id}"
        text = a.get(page).text
        assert "Globex" in text and "Revoke visa" in text
        visa = globex_visa(acme, net_id)
        r = _post(a, f"{page}/revoke-visa", page, visa_id=visa)
        assert r.status_code == 303, r.text
        r = _post(a, f"{page}/revoke-visa", page, visa_id="visa_missing")
        assert r.status_code == 404  # out of scope / unknown: not found
    with sign_in(server, globex.key) as g:
        assert g.get(f"/app/networks/{net_id}").status_code == 404
        assert g.get(f"/app/threads/{thread_id}").status_code == 404
    with sign_in(server, acme.key) as a:
        page = f"/app/networks/{net_id}"
        assert _post(a, f"{page}/close", page).status_code == 303
        assert acme.ok("GET", f"/networks/{net_id}")["status"] == "closed"
        r = _post(a, f"{page}/invites", page, hours="1")
        assert r.status_code == 409 and 'id="error-invites"' in r.text  # closed: admits nobody


def globex_visa(acme: Org, net_id: str) -> str:
    visas = acme.ok("GET", f"/networks/{net_id}/visas")
    return str(next(v["id"] for v in visas if v["end_reason"] is None))


def test_teams_members_and_roles(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    alex, sam = acme.user("Alex"), acme.user("Sam")
    with sign_in(server, acme.key) as a:
        team_id = _id_from(_post(a, "/app/teams", "/app/teams", name="Ops"), "/app/teams/")
        page = f"/app/teams/{team_id}"
        for u in (alex, sam):
            r = _post(a, f"{page}/members", page, member=f"user:{u['id']}", role="owner")
            assert r.status_code == 303, r.text
        assert (
            _post(a, f"{page}/role", page, member=f"user:{sam['id']}", role="admin").status_code
            == 303
        )
        roles = {m["id"]: m["role"] for m in acme.ok("GET", f"/teams/{team_id}/members")}
        assert roles == {alex["id"]: "owner", sam["id"]: "admin"}
        # a bad role: the API's message next to that member's row
        r = _post(a, f"{page}/role", page, member=f"user:{sam['id']}", role="king")
        assert r.status_code == 422 and 'id="error-role"' in r.text
        # the last owner cannot be removed (409 next to the row)
        r = _post(a, f"{page}/remove", page, member=f"user:{alex['id']}")
        assert r.status_code == 409 and 'id="error-remove"' in r.text
        assert _post(a, f"{page}/remove", page, member=f"user:{sam['id']}").status_code == 303
        assert [m["id"] for m in acme.ok("GET", f"/teams/{team_id}/members")] == [alex["id"]]
        # network-only actions do not exist for teams
        assert _post(a, f"{page}/invites", page).status_code == 404


def test_agents_routines_and_write_only_secrets(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    acme.agent("Taken", "taken")
    with sign_in(server, acme.key) as a:
        fields = {"name": "Release bot", "lookup_key": "release-bot", "model": "test"}
        # errors next to their fields, nothing created
        r = _post(a, "/app/agents", "/app/agents", **{**fields, "metadata": "[1"})
        assert r.status_code == 422 and 'id="new-metadata-error"' in r.text, r.text
        assert 'value="Release bot"' in r.text  # the draft is kept
        r = _post(a, "/app/agents", "/app/agents", **{**fields, "name": ""})
        assert r.status_code == 422 and 'id="new-name-error"' in r.text
        r = _post(a, "/app/agents", "/app/agents", **{**fields, "lookup_key": "taken"})
        assert r.status_code == 409 and 'id="new-lookup-key-error"' in r.text, r.text
        assert [x["lookup_key"] for x in acme.ok("GET", "/agents")] == ["taken"]
        agent_id = _id_from(
            _post(
                a,
                "/app/agents",
                "/app/agents",
                **fields,
                identity="You post release status.",
                metadata='{"team": "ops"}',
            ),
            "/app/agents/",
        )
        got = acme.ok("GET", f"/agents/{agent_id}")
        assert (got["model"], got["metadata"], got["identity"]) == (
            "test",
            {"team": "ops"},
            "You post release status.",
        )
        page = f"/app/agents/{agent_id}"
        r = _post(a, f"{page}/edit", page, **{**fields, "name": "Release bot 2", "metadata": "{}"})
        assert r.status_code == 200 and "Saved." in r.text
        assert acme.ok("GET", f"/agents/{agent_id}")["name"] == "Release bot 2"
        # routines: add a participate routine, pause and activate it
        r = _post(a, f"{page}/routines", page, name="answer", preset_name="participate")
        assert r.status_code == 303, r.text
        (routine,) = acme.ok("GET", f"/agents/{agent_id}/routines")
        assert (routine["preset_name"], routine["status"]) == ("participate", "active")
        r = _post(a, f"{page}/routine", page, routine_id=routine["id"], do="pause")
        assert r.status_code == 303
        assert acme.ok("GET", f"/agents/{agent_id}/routines")[0]["status"] == "paused"
        _post(a, f"{page}/routine", page, routine_id=routine["id"], do="activate")
        assert acme.ok("GET", f"/agents/{agent_id}/routines")[0]["status"] == "active"
        r = _post(a, f"{page}/routines", page, name="t", preset_name="triage", config="{}")
        assert r.status_code == 422 and 'id="error-routines"' in r.text, r.text
        # secrets are write-only: the name is listed, the value never shown
        r = _post(a, f"{page}/secret", page, name="GITHUB_TOKEN", value="ghp_supersecret")
        assert r.status_code == 200 and "Secret GITHUB_TOKEN stored." in r.text
        text = a.get(page).text
        assert "GITHUB_TOKEN" in text and "ghp_supersecret" not in text
        r = _post(a, f"{page}/secret", page, name="1bad", value="x")
        assert r.status_code == 422 and 'id="error-secret"' in r.text
        assert _post(a, f"{page}/forget", page, name="GITHUB_TOKEN").status_code == 303
        assert acme.ok("GET", f"/agents/{agent_id}/secrets") == []
    other = make_org("Globex")
    with sign_in(server, other.key) as g:  # another org's agent: not found
        assert g.get(f"/app/agents/{agent_id}").status_code == 404


def test_the_audit_log_filters_pages_and_exports(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    acme.team("Ops")
    for i in range(3):
        acme.user(f"person {i}")
    globex.user("not Acme's")
    with sign_in(server, acme.key) as a:
        r = a.get("/app/audit")
        assert r.status_code == 200 and "team.create" in r.text and "user.create" in r.text
        only = a.get("/app/audit", params={"action": "team.*"})
        assert "team.create" in only.text and "user.create" not in only.text
        bad = a.get("/app/audit", params={"action": "a*b"})
        assert bad.status_code == 422 and 'id="a-action-error"' in bad.text
        bad = a.get("/app/audit", params={"since": "yesterday"})
        assert bad.status_code == 422 and 'id="a-since-error"' in bad.text
        assert (
            'href="/app/audit/export?action=user.%2A"'
            in a.get("/app/audit", params={"action": "user.*"}).text
        )
        export = a.get("/app/audit/export", params={"action": "user.*"})
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("application/x-ndjson")
        assert "attachment" in export.headers["content-disposition"]
        lines = [json.loads(x) for x in export.text.splitlines()]
        api = acme.ok("GET", "/audit", params={"action": "user.*"})
        assert [x["id"] for x in lines] == [x["id"] for x in api] and len(lines) == 3
        assert "not Acme" not in export.text


def test_knowledge_upload_list_search_and_delete(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    bot = acme.agent("Bot", "bot")
    with sign_in(server, acme.key) as a:
        page = f"/app/knowledge?agent={bot['id']}"
        assert 'id="uploader"' in a.get(page).text
        csrf = csrf_of(a.get(page).text)
        up = {"X-Upload": "1", "X-CSRF-Token": csrf}
        # the page's script: one file per request, JSON answers
        r = a.post(
            "/app/knowledge",
            data={"agent_id": bot["id"], "name": "runbook.md", "content": "Rollback with helm."},
            headers=up,
        )
        assert r.status_code == 201, r.text
        assert r.json()["documents"][0]["name"] == "runbook.md"
        empty = a.post(
            "/app/knowledge",
            data={"agent_id": bot["id"], "name": "blank.md", "content": "  "},
            headers=up,
        )
        assert empty.status_code == 422 and "blank.md is empty" in empty.json()["error"]["message"]
        # without the CSRF token: refused
        assert a.post("/app/knowledge", data={"name": "x", "content": "y"}).status_code == 403
        # the form fallback (org-wide), then the lists
        r = _post(a, "/app/knowledge", "/app/knowledge", name="org.txt", content="Org-wide note")
        assert r.status_code == 303, r.text
        docs = acme.ok("GET", f"/agents/{bot['id']}/knowledge")
        assert [d["name"] for d in docs] == ["runbook.md"]
        assert [d["name"] for d in acme.ok("GET", "/knowledge")] == ["org.txt"]
        text = a.get(page).text
        assert "runbook.md" in text and "org.txt" not in text
        hits = a.get("/app/knowledge", params={"agent": bot["id"], "q": "helm rollback"}).text
        assert "Rollback with helm." in hits.split('id="hits"')[1]
        r = _post(a, f"/app/knowledge/{docs[0]['id']}/delete", page, agent_id=bot["id"])
        assert r.status_code == 303
        assert acme.ok("GET", f"/agents/{bot['id']}/knowledge") == []
    with sign_in(server, globex.key) as g:  # another org's agent's knowledge: not found
        assert g.get(f"/app/knowledge?agent={bot['id']}").status_code == 404
        assert "Org-wide note" not in g.get("/app/knowledge", params={"q": "note"}).text
