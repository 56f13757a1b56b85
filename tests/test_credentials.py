"""Credentials: org keys, user and agent tokens, scopes, revocation, rotation; agent secrets."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agent_network.runtime.models import register_model
from conftest import LiveServer, Org, assert_error, settle, sql_rows

pytestmark = pytest.mark.engines("sqlite", "postgresql")


def _client(server: LiveServer, secret: str) -> httpx.Client:
    return server.client(secret)


def _issue(org: Org, **body: Any) -> dict[str, Any]:
    out = org.ok("POST", "/credentials", json=body)
    assert out["secret"].startswith(
        {"org_key": "an_org_", "user_token": "an_usr_", "agent_token": "an_agt_"}[body["kind"]]
    )
    assert "key_hash" not in out["credential"]
    return dict(out)


def _team_thread(org: Org, name: str, *members: tuple[str, str]) -> str:
    team = org.team(name, *members)
    return str(org.ok("POST", f"/teams/{team['id']}/threads", json={"title": name})["id"])


def test_user_token_acts_as_its_user_only(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    alex, robin = a.user("Alex"), a.user("Robin")
    mine = _team_thread(a, "mine", ("user", alex["id"]))
    other = _team_thread(a, "other", ("user", robin["id"]))
    token = _issue(a, kind="user_token", subject_id=alex["id"], name="alex laptop")
    with _client(server, token["secret"]) as http:
        # reads: only the teams and threads Alex belongs to
        assert [t["id"] for t in http.get("/threads").json()] == [mine]
        assert_error(http.get(f"/threads/{other}"), 404, "not_found")
        assert [t["name"] for t in http.get("/teams").json()] == ["mine"]
        # posts as Alex without naming a sender; naming anyone else is refused
        r = http.post(f"/threads/{mine}/messages", json={"content": "hi"})
        assert r.status_code == 201, r.text
        assert r.json()["sender"] == {**r.json()["sender"], "kind": "user", "id": alex["id"]}
        assert_error(
            http.post(f"/threads/{mine}/messages", json={"content": "x", "user_id": robin["id"]}),
            403,
            "permission_denied",
        )
        assert_error(
            http.post(f"/threads/{other}/messages", json={"content": "x"}), 404, "not_found"
        )
        # no administration, no audit log, no credentials, no knowledge
        assert_error(
            http.post("/agents", json={"name": "x", "lookup_key": "x"}), 403, "permission_denied"
        )
        assert_error(http.post("/teams", json={"name": "t"}), 403, "permission_denied")
        for path in ("/audit", "/credentials", "/knowledge"):
            assert_error(http.get(path), 403, "permission_denied")
    # the org sees what was posted, attributed to Alex
    msgs = a.ok("GET", f"/threads/{mine}/messages")["items"]
    assert [(m["content"], m["sender"]["name"]) for m in msgs] == [("hi", "Alex")]


def test_agent_token_acts_as_its_agent(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    bot, other_bot = a.agent("Bot", "bot"), a.agent("Other", "other")
    tid = _team_thread(a, "ops", ("agent", bot["id"]), ("agent", other_bot["id"]))
    token = _issue(a, kind="agent_token", subject_id=bot["id"])
    with _client(server, token["secret"]) as http:
        r = http.post(f"/threads/{tid}/messages", json={"content": "from the runner"})
        assert r.status_code == 201 and r.json()["sender"]["id"] == bot["id"], r.text
        assert_error(
            http.post(
                f"/threads/{tid}/messages", json={"content": "x", "agent_id": other_bot["id"]}
            ),
            403,
            "permission_denied",
        )
        assert_error(http.get(f"/agents/{bot['id']}/secrets"), 403, "permission_denied")
    # deleting the agent kills its token
    a.ok("DELETE", f"/agents/{bot['id']}")
    with _client(server, token["secret"]) as http:
        assert_error(http.get("/threads"), 401, "unauthenticated")


def test_read_only_scope(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    u = a.user("U")
    tid = _team_thread(a, "t", ("user", u["id"]))
    ro = _issue(a, kind="org_key", scopes=["read"], name="dashboard")
    assert ro["credential"]["scopes"] == ["read"]
    with _client(server, ro["secret"]) as http:
        assert http.get(f"/threads/{tid}/messages").status_code == 200
        assert_error(
            http.post(f"/threads/{tid}/messages", json={"content": "x", "user_id": u["id"]}),
            403,
            "permission_denied",
        )
        assert_error(http.post("/users", json={"name": "x"}), 403, "permission_denied")
    assert_error(
        a.http.post("/credentials", json={"kind": "org_key", "scopes": ["write"]}),
        422,
        "invalid_request",
    )


def test_revoke_and_rotate(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    extra = _issue(a, kind="org_key", name="ci")
    with _client(server, extra["secret"]) as http:
        assert http.get("/orgs/me").status_code == 200
    rotated = a.ok("POST", f"/credentials/{extra['credential']['id']}/rotate")
    assert rotated["secret"] != extra["secret"]
    assert rotated["credential"]["name"] == "ci"
    with _client(server, extra["secret"]) as http:
        assert_error(http.get("/orgs/me"), 401, "unauthenticated")
    with _client(server, rotated["secret"]) as http:
        assert http.get("/orgs/me").json()["id"] == a.id
    revoked = a.ok("DELETE", f"/credentials/{rotated['credential']['id']}")
    assert revoked["revoked_at"] is not None
    with _client(server, rotated["secret"]) as http:
        assert_error(http.get("/orgs/me"), 401, "unauthenticated")
    assert_error(
        a.http.post(f"/credentials/{rotated['credential']['id']}/rotate"), 422, "invalid_request"
    )
    listed = a.ok("GET", "/credentials")
    assert {c["id"] for c in listed} >= {extra["credential"]["id"], rotated["credential"]["id"]}
    assert all("secret" not in c and "key_hash" not in c for c in listed)
    actions = [r["action"] for r in a.ok("GET", "/audit")]
    for act in ("credential.issue", "credential.rotate", "credential.revoke"):
        assert act in actions


def test_credentials_do_not_cross_orgs(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    b: Org = make_org("Globex")
    b_user, b_agent = b.user("Sam"), b.agent("Delivery", "delivery")
    b_cred = _issue(b, kind="org_key", name="b")["credential"]
    assert_error(
        a.http.post("/credentials", json={"kind": "user_token", "subject_id": b_user["id"]}),
        404,
        "not_found",
    )
    assert_error(
        a.http.post("/credentials", json={"kind": "agent_token", "subject_id": b_agent["id"]}),
        404,
        "not_found",
    )
    assert_error(a.http.delete(f"/credentials/{b_cred['id']}"), 404, "not_found")
    assert_error(a.http.post(f"/credentials/{b_cred['id']}/rotate"), 404, "not_found")
    assert b_cred["id"] not in {c["id"] for c in a.ok("GET", "/credentials")}
    assert_error(
        a.http.put(f"/agents/{b_agent['id']}/secrets/K", json={"value": "v"}), 404, "not_found"
    )


SECRET_VALUE = "s3cr3t-VALUE-that-must-never-leak-8812"


def test_agent_secrets_are_encrypted_and_never_returned(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    u, bot = a.user("U"), a.agent("Bot", "bot", model="fn:capture-secrets")
    seen: list[str] = []

    def capture(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(repr(messages))
        return ModelResponse(parts=[TextPart("ok")])

    register_model("fn:capture-secrets", FunctionModel(capture))
    try:
        put = a.ok("PUT", f"/agents/{bot['id']}/secrets/CRM_TOKEN", json={"value": SECRET_VALUE})
        assert put["name"] == "CRM_TOKEN" and SECRET_VALUE not in str(put)
        a.ok("PUT", f"/agents/{bot['id']}/secrets/CRM_TOKEN", json={"value": SECRET_VALUE + "2"})
        names = a.ok("GET", f"/agents/{bot['id']}/secrets")
        assert [n["name"] for n in names] == ["CRM_TOKEN"]
        assert_error(
            a.http.put(f"/agents/{bot['id']}/secrets/9bad", json={"value": "v"}),
            422,
            "invalid_request",
        )
        # an agent answering in a thread never gets its secrets in the prompt
        tid = _team_thread(a, "t", ("user", u["id"]), ("agent", bot["id"]))
        a.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "p"})
        a.ok("POST", f"/threads/{tid}/messages", json={"content": "status?", "user_id": u["id"]})
        settle(server, a.http, tid)
        assert seen and all(SECRET_VALUE not in s for s in seen)
        # nothing the org can read contains the value; the database holds only ciphertext
        for path in (
            f"/agents/{bot['id']}",
            f"/agents/{bot['id']}/secrets",
            "/audit",
            f"/threads/{tid}/envelopes",
        ):
            assert SECRET_VALUE not in a.http.get(path).text
        raw = b"".join(
            str(row).encode() for row in sql_rows(server.db, "SELECT * FROM agent_secrets")
        )
        assert SECRET_VALUE.encode() not in raw and b"gAAAA" in raw  # Fernet token prefix
        a.ok("DELETE", f"/agents/{bot['id']}/secrets/CRM_TOKEN")
        assert a.ok("GET", f"/agents/{bot['id']}/secrets") == []
        assert_error(a.http.delete(f"/agents/{bot['id']}/secrets/CRM_TOKEN"), 404, "not_found")
    finally:
        register_model("fn:capture-secrets", None)


@pytest.mark.parametrize("bad", ["an_org_nothing", "an_usr_x", "an_agt_", "garbage", ""])
def test_unknown_credentials_are_401(server: LiveServer, bad: str) -> None:
    with httpx.Client(
        base_url=f"{server.url}/api/v1",
        headers={"Authorization": f"Bearer {bad}"} if bad else {},
        timeout=60,  # httpx's default 5 s ran out on a loaded machine (CI with a llama build)
    ) as http:
        assert_error(http.get("/threads"), 401, "unauthenticated")


def test_expiry_renewal_and_rotation_keep_the_lifetime(server: LiveServer, make_org) -> None:
    a: Org = make_org("Expiring")
    short = _issue(a, kind="org_key", name="short", expires_in=1.5)
    long = _issue(a, kind="org_key", name="long", expires_in=3600)
    cid = short["credential"]["id"]
    issued_at = datetime.fromisoformat(short["credential"]["created_at"])
    expires = datetime.fromisoformat(short["credential"]["expires_at"])
    assert 1.4 <= (expires - issued_at).total_seconds() <= 1.6
    with _client(server, short["secret"]) as http:
        assert http.get("/orgs/me").status_code == 200
        # renewed before it runs out: it lives on past the first expiry
        renewed = a.ok("POST", f"/credentials/{cid}/renew", json={"expires_in": 60})
        assert datetime.fromisoformat(renewed["expires_at"]) > expires
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
        assert http.get("/orgs/me").status_code == 200
        a.ok("POST", f"/credentials/{cid}/renew", json={"expires_in": 1})
        time.sleep(1.3)
        err = assert_error(http.get("/orgs/me"), 401, "unauthenticated")
        assert "expired" in err["message"]
    # an expired credential can be neither renewed nor rotated; nothing changed by trying
    before = {c["id"]: c for c in a.ok("GET", "/credentials")}[cid]
    for path, body in (("renew", {"expires_in": 60}), ("rotate", None)):
        r = a.http.post(f"/credentials/{cid}/{path}", json=body)
        assert_error(r, 422, "invalid_request")
    assert {c["id"]: c for c in a.ok("GET", "/credentials")}[cid] == before
    # bad lifetimes are refused with the field named
    for bad in (0, -5, 10**12, "soon"):
        r = a.http.post("/credentials", json={"kind": "org_key", "expires_in": bad})
        assert_error(r, 422, "invalid_request")
        r = a.http.post(f"/credentials/{long['credential']['id']}/renew", json={"expires_in": bad})
        assert_error(r, 422, "invalid_request")
    # rotation keeps the lifetime (from now); a credential without expiry stays without
    rotated = a.ok("POST", f"/credentials/{long['credential']['id']}/rotate")["credential"]
    lifetime = datetime.fromisoformat(rotated["expires_at"]) - datetime.fromisoformat(
        rotated["created_at"]
    )
    assert abs(lifetime.total_seconds() - 3600) < 1
    plain = _issue(a, kind="org_key", name="plain")
    assert plain["credential"]["expires_at"] is None
    again = a.ok("POST", f"/credentials/{plain['credential']['id']}/rotate")["credential"]
    assert again["expires_at"] is None
    actions = [r["action"] for r in a.ok("GET", "/audit")]
    assert actions.count("credential.renew") == 2
