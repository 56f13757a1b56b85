"""Egress policy: what an org lets its agents and people post into networks (real HTTP).

Org A (member) and org B (host) share one network thread; A also has an internal team thread.
Every test reads back through the other org and the audit logs to prove what was written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from agent_network.services.egress_check import apply_egress
from agent_network.services.egress_rules import EMPTY_POLICY, EgressRefusedError
from agent_network.services.policy import load_egress_policy
from agent_network.store.engine import create_engine, database_url
from conftest import LiveServer, Org, all_envelopes, assert_error

VISA_CARD = "4111 1111 1111 1111"  # passes Luhn (a well-known test number)
BAD_LUHN_CARD = "4111 1111 1111 1112"  # one digit off: fails Luhn
AMEX_DASHED = "3782-822463-10005"  # passes Luhn


@dataclass
class World:
    a: Org
    b: Org
    ann: dict[str, Any]  # A's user, in the network and in A's team
    ben: dict[str, Any]  # B's user, in the network
    net_thread: str
    team_thread: str

    def post(self, content: str, thread: str | None = None) -> Any:
        """A posts as Ann (raw response)."""
        return self.a.http.post(
            f"/threads/{thread or self.net_thread}/messages",
            json={"content": content, "user_id": self.ann["id"]},
        )

    def b_post(self, content: str) -> Any:
        return self.b.http.post(
            f"/threads/{self.net_thread}/messages",
            json={"content": content, "user_id": self.ben["id"]},
        )

    def b_sees(self) -> list[str]:
        """Message contents of the network thread as org B reads them."""
        items = all_envelopes(self.b.http, self.net_thread, messages_only=True)
        return [m["content"] for m in items]


@pytest.fixture
def world(make_org: Any) -> World:
    a, b = make_org("Org A"), make_org("Org B")
    ann, ben = a.user("Ann"), b.user("Ben")
    net = b.ok("POST", "/networks", json={"name": "Shared"})
    b.ok("POST", f"/networks/{net['id']}/members", json={"user_id": ben["id"]})
    code = b.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    a.ok("POST", "/networks/join", json={"code": code, "user_ids": [ann["id"]]})
    net_thread = b.ok("POST", f"/networks/{net['id']}/threads", json={"title": "deal"})["id"]
    team = a.team("A internal", ("user", ann["id"]))
    team_thread = a.ok("POST", f"/teams/{team['id']}/threads", json={"title": "inside"})["id"]
    return World(a, b, ann, ben, net_thread, team_thread)


def put_policy(org: Org, *rules: dict[str, Any]) -> Any:
    return org.http.put("/policy/egress", json={"rules": list(rules)})


def rule(name: str, kind: str, action: str, pattern: str | None = None) -> dict[str, Any]:
    return {"name": name, "kind": kind, "action": action, "pattern": pattern}


def audit(org: Org, **params: Any) -> list[dict[str, Any]]:
    return list(org.ok("GET", "/audit", params={"limit": 1000, **params}))


def audit_text(org: Org) -> str:
    r = org.http.get("/audit/export")
    assert r.status_code == 200, r.text
    return r.text


# ------------------------------------------------------------------------ policy resource


def test_policy_defaults_to_no_rules_and_round_trips(world: World) -> None:
    a = world.a
    builtin = {"org_secrets": "refuse", "key_formats": "redact", "team_threads": False}
    assert a.ok("GET", "/policy/egress") == {
        "rules": [],
        "updated_at": None,
        "defaults": builtin,
        "defaults_off": [],
    }
    rules = [
        rule("cards", "card_number", "refuse"),
        rule("codenames", "regex", "redact", r"PRJ-\d{4}"),
    ]
    put = put_policy(a, *rules)
    assert put.status_code == 200, put.text
    assert put.json()["rules"] == rules
    got = a.ok("GET", "/policy/egress")
    assert got["rules"] == rules and got["updated_at"] == put.json()["updated_at"]
    # each org has its own policy; B's is still empty
    assert world.b.ok("GET", "/policy/egress")["rules"] == []
    # the change is audited with names/kinds/actions
    (rec,) = audit(a, action="policy.egress_update")
    assert rec["data"]["rules"] == [
        {"name": "cards", "kind": "card_number", "action": "refuse"},
        {"name": "codenames", "kind": "regex", "action": "redact"},
    ]
    assert rec["data"]["defaults"] == builtin and got["defaults"] == builtin
    # replacing with no rules clears it
    assert put_policy(a).json()["rules"] == []
    assert world.post(f"card {VISA_CARD}").status_code == 201


@pytest.mark.parametrize(
    ("rules", "needle"),
    [
        ([rule("x", "phone", "refuse")], "kind"),
        ([rule("x", "email", "shout")], "action"),
        ([rule("x", "email", "redact"), rule("x", "secret", "refuse")], "duplicate"),
        ([rule("x", "regex", "refuse", "(unclosed")], "not a valid regular expression"),
        ([rule("x", "regex", "refuse", None)], "pattern is required"),
        ([rule("x", "regex", "refuse", "a" * 501)], "longer than 500"),
        ([rule("x", "regex", "refuse", r"(a+)+$")], "nests an unbounded quantifier"),
        ([rule("x", "regex", "refuse", r"(\w+\s?)*!")], "nests an unbounded quantifier"),
        ([rule("x", "regex", "refuse", r"(ab)\1")], "back-references"),
        ([rule("x", "regex", "refuse", r"x*")], "empty string"),
        ([rule("x", "email", "refuse", r"@")], "only for kind 'regex'"),
        ([rule("", "email", "refuse")], "name"),
        ([rule("bad]name", "email", "refuse")], "name"),
    ],
)
def test_bad_policy_bodies_are_422_and_change_nothing(
    world: World, rules: list[dict[str, Any]], needle: str
) -> None:
    a = world.a
    assert put_policy(a, rule("keep", "email", "refuse")).status_code == 200
    err = assert_error(put_policy(a, *rules), 422, "invalid_request")
    assert needle in err["message"], err
    assert [r["name"] for r in a.ok("GET", "/policy/egress")["rules"]] == ["keep"]


def test_slow_regex_is_refused_by_the_probe(world: World) -> None:
    # no nested quantifier, but cubic backtracking on a long run of word characters
    err = assert_error(
        put_policy(world.a, rule("slow", "regex", "refuse", r"\w+\w+\w+\.")), 422, "invalid_request"
    )
    assert "backtracks too much" in err["message"] and "'slow'" in err["message"]
    assert world.a.ok("GET", "/policy/egress")["rules"] == []


def test_malformed_bodies_and_non_org_callers(world: World, server: LiveServer) -> None:
    a = world.a
    for body in ({}, {"rules": "x"}, {"rules": [{"name": "x"}]}, {"rules": [], "extra": 1}):
        assert_error(a.http.put("/policy/egress", json=body), 422, "invalid_request")
    with server.client(server.admin_key) as admin:
        assert_error(admin.get("/policy/egress"), 403, "permission_denied")
        assert_error(admin.put("/policy/egress", json={"rules": []}), 403, "permission_denied")


# ------------------------------------------------------------------------ detectors


@pytest.mark.parametrize(
    ("kind", "leaks", "harmless"),
    [
        ("email", ["write to jane.doe+deals@example.co.uk today"], ["no address @ here"]),
        (
            "card_number",
            [f"card {VISA_CARD} exp 12/27", f"amex {AMEX_DASHED}", "4111111111111111"],
            [f"card {BAD_LUHN_CARD}", "order 1234 5678", "call 555-123-4567"],
        ),
        (
            "secret",
            [
                "use sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
                "AWS AKIAIOSFODNN7EXAMPLE works",
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
                "DB_PASSWORD=hunter22 in prod",
                'config {"api_key": "zx81-secret"}',
                "token an_usr_Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OTA",
            ],
            ["the password policy is strict", "ask Sam about skiing"],
        ),
    ],
)
def test_each_detector_refuses_and_redacts(
    world: World, kind: str, leaks: list[str], harmless: list[str]
) -> None:
    assert put_policy(world.a, rule("stop", kind, "refuse")).status_code == 200
    for text in leaks:
        err = assert_error(world.post(text), 422, "egress_refused")
        assert "'stop'" in err["message"] and err["details"] == {"rules": ["stop"]}
        for word in text.split():
            if any(ch.isdigit() for ch in word) or "@" in word or len(word) > 12:
                assert word not in json.dumps(err), (word, err)
    for text in harmless:
        assert world.post(text).status_code == 201, text
    assert world.b_sees() == harmless  # nothing refused reached the thread

    assert put_policy(world.a, rule("scrub", kind, "redact")).status_code == 200
    for text in leaks:
        r = world.post(text)
        assert r.status_code == 201, r.text
        assert "[redacted:scrub]" in r.json()["content"], r.json()
    seen = world.b_sees()[len(harmless) :]
    assert len(seen) == len(leaks)
    for text, got in zip(leaks, seen, strict=True):
        assert got != text and "[redacted:scrub]" in got
    # the surrounding words survive redaction
    if kind == "card_number":
        assert seen[0] == "card [redacted:scrub] exp 12/27"
    if kind == "email":
        assert seen == ["write to [redacted:scrub] today"]


def test_card_numbers_need_a_valid_luhn_check_digit(world: World) -> None:
    put_policy(world.a, rule("cards", "card_number", "redact"))
    ok = world.post(f"pay {BAD_LUHN_CARD} or {VISA_CARD}")
    assert ok.status_code == 201
    assert ok.json()["content"] == f"pay {BAD_LUHN_CARD} or [redacted:cards]"
    # a card followed by its CVV in one run of digit groups is still found
    cvv = world.post(f"{VISA_CARD} 123").json()["content"]
    assert VISA_CARD not in cvv and "[redacted:cards]" in cvv


def test_own_org_key_posted_by_mistake_never_reaches_the_other_org_or_the_audit_log(
    world: World,
) -> None:
    a, b = world.a, world.b
    key = a.key
    assert key.startswith("an_org_")
    put_policy(a, rule("creds", "secret", "refuse"))
    err = assert_error(world.post(f"here is our key {key} enjoy"), 422, "egress_refused")
    assert key not in json.dumps(err)
    put_policy(a, rule("creds", "secret", "redact"))
    r = world.post(f"oops: {key}")
    assert r.status_code == 201 and r.json()["content"] == "oops: [redacted:creds]"
    # everything B can read afterwards, and both audit logs, are free of the key
    assert world.b_post("thanks").status_code == 201
    for path in (
        f"/threads/{world.net_thread}/messages",
        f"/threads/{world.net_thread}/envelopes",
        f"/threads/{world.net_thread}",
        "/threads",
    ):
        got = b.http.get(path)
        assert got.status_code == 200 and key not in got.text, path
    assert key not in audit_text(a) and key not in audit_text(b)
    # the WAL stays verifiable: the redacted text is what was appended
    assert b.ok("GET", f"/threads/{world.net_thread}/verify")["ok"] is True


def test_regex_rule_and_mixed_actions(world: World) -> None:
    put_policy(
        world.a,
        rule("codenames", "regex", "redact", r"(?i)project\s+falcon"),
        rule("emails", "email", "redact"),
        rule("keys", "secret", "refuse"),
    )
    r = world.post("Project  Falcon: mail bo@example.org or BO@example.org")
    assert r.status_code == 201
    assert r.json()["content"] == (
        "[redacted:codenames]: mail [redacted:emails] or [redacted:emails]"
    )
    # a refuse rule wins over redact rules matching the same message
    err = assert_error(
        world.post("project falcon key sk-abcdefghijklmnopqrstuvwx"), 422, "egress_refused"
    )
    assert err["details"] == {"rules": ["keys"]}


# ------------------------------------------------------------------------ where it applies


def test_policy_applies_to_network_threads_only(world: World) -> None:
    put_policy(world.a, rule("cards", "card_number", "refuse"), rule("mail", "email", "redact"))
    text = f"card {VISA_CARD} for ann@example.com"
    inside = world.post(text, thread=world.team_thread)
    assert inside.status_code == 201 and inside.json()["content"] == text
    assert_error(world.post(text), 422, "egress_refused")
    assert [e["resource_id"] for e in audit(world.a, action="egress.*")] == [world.net_thread]


def test_the_senders_org_policy_applies_not_the_other_orgs(world: World) -> None:
    a, b = world.a, world.b
    put_policy(b, rule("b-cards", "card_number", "refuse"), rule("b-mail", "email", "redact"))
    # B's policy does not filter A's posts
    text = f"A pays with {VISA_CARD}, mail a@example.com"
    r = world.post(text)
    assert r.status_code == 201 and r.json()["content"] == text
    # ...but it does filter B's own
    assert_error(world.b_post(f"B pays {VISA_CARD}"), 422, "egress_refused")
    assert world.b_post("B: b@example.com").json()["content"] == "B: [redacted:b-mail]"
    # and A's policy filters A only
    put_policy(a, rule("a-mail", "email", "redact"))
    assert world.post("x@example.com").json()["content"] == "[redacted:a-mail]"
    assert world.b_post("y@example.com").json()["content"] == "[redacted:b-mail]"
    # each org's egress audit records stay in its own log
    assert {e["reason"] for e in audit(a, action="egress.*")} == {"a-mail"}
    assert {e["reason"] for e in audit(b, action="egress.*")} == {"b-cards", "b-mail"}


def test_agent_token_posts_are_filtered_too(world: World, server: LiveServer) -> None:
    a = world.a
    bot = a.agent("A Bot", "abot")
    net_id = a.ok("GET", f"/threads/{world.net_thread}")["team_id"]
    a.ok("POST", f"/networks/{net_id}/members", json={"agent_id": bot["id"]})
    token = a.ok("POST", "/credentials", json={"kind": "agent_token", "subject_id": bot["id"]})
    put_policy(a, rule("mail", "email", "redact"))
    with server.client(token["secret"]) as agent_http:
        r = agent_http.post(
            f"/threads/{world.net_thread}/messages", json={"content": "ping me@example.com"}
        )
    assert r.status_code == 201, r.text
    assert r.json()["content"] == "ping [redacted:mail]"
    assert r.json()["sender"]["id"] == bot["id"]
    (rec,) = audit(a, action="egress.redacted")
    assert rec["principal_kind"] == "agent"
    assert rec["principal_id"] == token["credential"]["id"]
    assert rec["data"]["sender"] == {"kind": "agent", "id": bot["id"]}


# ------------------------------------------------------------------------ audit of egress


def test_refusals_and_redactions_are_audited_without_the_matched_text(world: World) -> None:
    a = world.a
    put_policy(a, rule("cards", "card_number", "refuse"), rule("mail", "email", "redact"))
    assert_error(world.post(f"card {VISA_CARD}"), 422, "egress_refused")
    env = world.post("mail zed@example.com").json()
    refused, redacted = audit(a, action="egress.*")
    assert refused["action"] == "egress.refused" and refused["outcome"] == "refused"
    assert refused["reason"] == "cards" and refused["resource_id"] == world.net_thread
    assert refused["resource_kind"] == "thread"
    assert refused["data"]["rules"] == ["cards"]
    assert refused["data"]["sender"] == {"kind": "user", "id": world.ann["id"]}
    assert redacted["action"] == "egress.redacted" and redacted["outcome"] == "accepted"
    assert redacted["reason"] == "mail" and redacted["data"]["envelope_id"] == env["id"]
    # the refusal is also a refused envelope.message in A's log
    (post,) = audit(a, action="envelope.message", outcome="refused")
    assert post["reason"].startswith("egress_refused: ") and "'cards'" in post["reason"]
    log = audit_text(a)
    for secret in (VISA_CARD, VISA_CARD.replace(" ", ""), "zed@example.com"):
        assert secret not in log
    # B's log has none of it
    assert audit(world.b, action="egress.*") == []
    assert audit(world.b, action="envelope.message") == []


# ------------------------------------------------------------------------ the runner's two calls


def test_loader_and_pure_function_for_the_runner(world: World, server: LiveServer) -> None:
    """What the in-process runner calls before its own ``Hub.append``."""
    put_policy(world.a, rule("mail", "email", "redact"), rule("keys", "secret", "refuse"))

    async def load() -> tuple[Any, Any, Any]:
        engine = create_engine(database_url(server.db))
        try:
            return (
                await load_egress_policy(engine, world.a.id, world.net_thread),
                await load_egress_policy(engine, world.a.id, world.team_thread),
                await load_egress_policy(engine, world.b.id, world.net_thread),
            )
        finally:
            await engine.dispose()

    net, team, other = anyio.run(load)
    assert [r.name for r in net.rules] == ["mail", "keys"]
    assert team == EMPTY_POLICY and other.rules == ()
    assert apply_egress(net, "to a@example.com") == ("to [redacted:mail]", ["mail"])
    assert apply_egress(team, "to a@example.com") == ("to a@example.com", [])
    with pytest.raises(EgressRefusedError, match="'keys'") as info:
        apply_egress(net, "AKIAIOSFODNN7EXAMPLE")
    assert info.value.code == "egress_refused" and info.value.status == 422
    assert info.value.rules == ["keys"] and "AKIA" not in str(info.value)
