"""The egress default and the org's own secrets (issue 13, points 6 and 7).

Org A (guest) joins org B's network with its user Ann and its agent Leaky, whose model
(a FunctionModel) says whatever the test scripts — e.g. one of A's stored secrets, plain or
encoded. With no policy configured, such a reply into the network thread is refused (the
org-secret detector) or redacted (common key formats), audited without the plaintext, and org B
never sees it over REST or the WebSocket. Loosening needs an explicit flag and is audited.
Secrets are consumed by tools running for the agent (runtime/tools.py): only the agent's own
runner gets them, every reveal is audited, and a revealed value never reaches a thread, a log
line or the audit log. Real servers over real SQLite files; remote runners over HTTP.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import string
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic_ai import RunContext, Tool
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo
from websockets.sync.client import connect

from agent_network.client import AsyncClient
from agent_network.runtime.remote import RemoteRunner
from agent_network.runtime.tools import RunDeps, register_agent_tools
from agent_network.services.egress_check import check_egress, check_message
from agent_network.services.egress_rules import (
    DEFAULT_POLICY,
    KEY_FORMATS,
    ORG_SECRETS,
    EgressRefusedError,
)
from agent_network.services.fingerprints import (
    MIN_SECRET_CHARS,
    SecretIndex,
    fingerprint,
    secret_forms,
)
from conftest import LiveServer, Org, all_envelopes, assert_error, function_model, settle

MARK_SECRET = f"[redacted:{ORG_SECRETS}]"
MARK_KEY = f"[redacted:{KEY_FORMATS}]"
BUILTIN = {"org_secrets": "refuse", "key_formats": "redact", "team_threads": False}


def new_secret() -> str:
    """A random secret with characters that percent-encoding changes ('/', '+')."""
    return f"Vq{secrets.token_urlsafe(12)}/+{secrets.token_hex(4)}"


def encodings(value: str) -> dict[str, str]:
    """The encodings the detector must find, computed here independently of the detector."""
    raw = value.encode()
    return {
        "plain": value,
        "base64": base64.b64encode(raw).decode(),
        "base64url_nopad": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(),
        "hex_upper": raw.hex().upper(),
        "url": quote(value, safe=""),
    }


def table_of(value: str) -> dict[str, str]:
    """The documented set of encodings (docs/security.md), computed here independently."""
    raw = value.encode("utf-8", "surrogatepass")
    b64, url64 = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    return {
        "plain": value,
        "base64": b64,
        "base64_nopad": b64.rstrip("="),
        "base64url": url64,
        "base64url_nopad": url64.rstrip("="),
        "hex": raw.hex(),
        "hex_upper": raw.hex().upper(),
        "url": quote(raw, safe=""),
        "url_plus": quote_plus(raw, safe=""),
    }


def names_of(value: str, form: str) -> set[str]:
    """Every encoding name (of the documented set) that turns ``value`` into ``form``."""
    return {name for name, f in table_of(value).items() if f == form}


class Script:
    """A FunctionModel body that answers ``reply`` (set by the test before each trigger)."""

    def __init__(self) -> None:
        self.reply = "Nothing to add."

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart(self.reply)])


@dataclass
class World:
    srv: LiveServer
    a: Org
    b: Org
    ann: dict[str, Any]
    ben: dict[str, Any]
    leaky: dict[str, Any]
    net_thread: str
    team_thread: str
    secret: str
    script: Any = field(default_factory=Script)
    asked: int = 0

    def ask(self, reply: str, thread: str | None = None) -> None:
        """Script the model's next reply, have Ann post a trigger, wait for the runner."""
        tid = thread or self.net_thread
        self.script.reply = reply
        self.asked += 1
        self.a.ok(
            "POST",
            f"/threads/{tid}/messages",
            json={"content": f"question {self.asked}?", "user_id": self.ann["id"]},
        )
        settle(self.srv, self.a.http, tid)

    def agent_says(self, thread: str | None = None, org: Org | None = None) -> list[str]:
        """What the agent posted in a thread, as ``org`` (default B) reads it."""
        items = all_envelopes((org or self.b).http, thread or self.net_thread, messages_only=True)
        return [m["content"] for m in items if m["sender"]["id"] == self.leaky["id"]]


def audit(org: Org, **params: Any) -> list[dict[str, Any]]:
    return list(org.ok("GET", "/audit", params={"limit": 1000, **params}))


def export(org: Org) -> str:
    r = org.http.get("/audit/export")
    assert r.status_code == 200, r.text
    return r.text


def build_world(srv: LiveServer, make_org: Callable[[str], Org], script: Any = None) -> World:
    """Org A (Ann, the agent Leaky with the secret API_KEY and a participate routine) joins
    org B's network; a network thread and a team thread of A. ``script``: Leaky's model body
    (default a :class:`Script`)."""
    script = script or Script()
    a, b = make_org("Org A"), make_org("Org B")
    ann, ben = a.user("Ann"), b.user("Ben")
    leaky = a.agent("Leaky", "leaky", model=function_model("leaky", script))
    a.ok("POST", f"/agents/{leaky['id']}/routines", json={"name": "participate"})
    secret = new_secret()
    a.ok("PUT", f"/agents/{leaky['id']}/secrets/API_KEY", json={"value": secret})
    net = b.ok("POST", "/networks", json={"name": "Shared"})
    b.ok("POST", f"/networks/{net['id']}/members", json={"user_id": ben["id"]})
    code = b.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    a.ok(
        "POST",
        "/networks/join",
        json={"code": code, "user_ids": [ann["id"]], "agent_ids": [leaky["id"]]},
    )
    net_thread = b.ok(
        "POST", f"/networks/{net['id']}/threads", json={"title": "deal", "agent_budget": 100}
    )["id"]
    team = a.team("A inside", ("user", ann["id"]), ("agent", leaky["id"]))
    team_thread = a.ok(
        "POST", f"/teams/{team['id']}/threads", json={"title": "inside", "agent_budget": 100}
    )["id"]
    return World(srv, a, b, ann, ben, leaky, net_thread, team_thread, secret, script)


@pytest.fixture
def world(server: LiveServer, make_org: Any) -> World:
    return build_world(server, make_org)


@contextmanager
def ws_of(srv: LiveServer, key: str, thread_id: str) -> Iterator[Callable[[str], list[str]]]:
    """A WebSocket of ``key`` joined to ``thread_id`` from seq 0; yields ``until(text)``, which
    reads every frame until a message whose content is ``text`` and returns the raw frames."""
    url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as conn:
        assert json.loads(conn.recv(timeout=10))["type"] == "welcome"
        conn.send(json.dumps({"type": "join", "thread_id": thread_id, "after": 0, "ref": "j"}))

        def until(text: str) -> list[str]:
            frames: list[str] = []
            while True:
                raw = str(conn.recv(timeout=30))
                frames.append(raw)
                frame = json.loads(raw)
                env = frame.get("envelope") or {}
                if frame["type"] == "envelope" and (env.get("data") or {}).get("content") == text:
                    return frames

        yield until


# ----------------------------------------------------------------------------- point 6: runner


def test_the_runner_never_posts_an_org_secret_into_a_network_thread(world: World) -> None:
    """Plain, base64, base64url, hex, HEX, URL-encoded, and glued into a sentence without any
    separator: each reply is refused before the append; B reads none of it over REST or the
    WebSocket; A's audit log says which secret, in which encoding, where — never the value."""
    w = world
    forms = encodings(w.secret)
    cases = [
        (enc, f"Here is what you asked for: {form} (keep it safe).") for enc, form in forms.items()
    ]
    cases.append(("plain", f"Sure:the-key-is{w.secret}andthatisall."))
    with ws_of(w.srv, w.b.key, w.net_thread) as until:
        w.ask("Happy to help with the deal.")  # control: the agent does answer
        assert w.agent_says() == ["Happy to help with the deal."]
        for _enc, reply in cases:
            w.ask(reply)
        assert w.agent_says() == ["Happy to help with the deal."], "a secret reply was posted"
        w.script.reply = "Bye."  # (the agent answers Ben's message too)
        w.b.ok(
            "POST",
            f"/threads/{w.net_thread}/messages",
            json={"content": "the end", "user_id": w.ben["id"]},
        )
        frames = "\n".join(until("the end"))
    # B over REST: every envelope and the thread; B over the WebSocket: every frame
    b_views = [
        w.b.http.get(f"/threads/{w.net_thread}/envelopes", params={"limit": 1000}).text,
        w.b.http.get(f"/threads/{w.net_thread}/messages", params={"limit": 1000}).text,
        w.b.http.get(f"/threads/{w.net_thread}").text,
        frames,
    ]
    for form in forms.values():
        for text in b_views:
            assert form not in text
    # A's audit: one egress.refused per secret reply, naming the secret and the encoding
    refused = audit(w.a, action="egress.refused")
    assert len(refused) == len(cases), json.dumps(refused, indent=1)
    for rec, (enc, reply) in zip(refused, cases, strict=True):
        assert rec["reason"] == ORG_SECRETS and rec["outcome"] == "refused"
        assert rec["resource_id"] == w.net_thread and rec["principal_id"] == w.leaky["id"]
        (match,) = rec["data"]["matches"]
        assert match["rule"] == ORG_SECRETS and match["secret"] == "API_KEY"
        assert match["agent_id"] == w.leaky["id"]
        form = forms[enc]
        assert match["encoding"] in names_of(w.secret, form), (match, enc)
        assert (match["start"], match["end"]) == (reply.index(form), reply.index(form) + len(form))
    log = export(w.a) + export(w.b)
    for form in forms.values():
        assert form not in log
    assert audit(w.b, action="egress.*") == []


def test_redact_team_threads_and_loosening_that_is_never_silent(world: World) -> None:
    w, a = world, world.a
    leak = f"The key:{w.secret}, as promised."
    # team threads: the defaults apply to network threads only, unless the org says so
    w.ask(leak, thread=w.team_thread)
    assert w.agent_says(w.team_thread, org=a) == [leak]
    assert a.ok("GET", "/policy/egress")["defaults"] == BUILTIN
    r = a.http.put("/policy/egress", json={"rules": [], "defaults": {"team_threads": True}})
    assert r.status_code == 200, r.text
    w.ask(leak, thread=w.team_thread)
    assert w.agent_says(w.team_thread, org=a) == [leak]  # nothing new
    (refused,) = audit(a, action="egress.refused")
    assert refused["resource_id"] == w.team_thread and refused["reason"] == ORG_SECRETS
    assert audit(a, action="policy.egress_loosened") == []  # tightening is no loosening

    # redact instead of refuse: a weaker default, audited as a loosening (no flag needed)
    r = a.http.put("/policy/egress", json={"rules": [], "defaults": {"org_secrets": "redact"}})
    assert r.status_code == 200, r.text
    assert r.json()["defaults"] == {**BUILTIN, "org_secrets": "redact"}
    assert r.json()["defaults_off"] == []
    w.ask(leak)
    assert w.agent_says() == [f"The key:{MARK_SECRET}, as promised."]
    (redacted,) = audit(a, action="egress.redacted")
    assert redacted["data"]["matches"] == [
        {
            "rule": ORG_SECRETS,
            "start": leak.index(w.secret),
            "end": leak.index(w.secret) + len(w.secret),
            "agent_id": w.leaky["id"],
            "secret": "API_KEY",
            "encoding": "plain",
        }
    ]
    (loose,) = audit(a, action="policy.egress_loosened")
    assert loose["data"]["loosened"] == ["org_secrets", "team_threads"]

    # turning a default off needs the flag: refused and nothing changes without it
    off = {"org_secrets": "off"}
    err = assert_error(
        a.http.put("/policy/egress", json={"rules": [], "defaults": off}),
        422,
        "loosening_not_acknowledged",
    )
    assert "acknowledge_loosening" in err["message"] and err["details"] == {"off": ["org_secrets"]}
    assert a.ok("GET", "/policy/egress")["defaults"]["org_secrets"] == "redact"
    r = a.http.put(
        "/policy/egress",
        json={"rules": [], "defaults": off, "acknowledge_loosening": True},
    )
    assert r.status_code == 200, r.text
    got = a.ok("GET", "/policy/egress")
    assert got["defaults"]["org_secrets"] == "off" and got["defaults_off"] == ["org_secrets"]
    records = audit(a, action="policy.egress_loosened")
    assert len(records) == 2
    who = records[-1]
    assert who["principal_kind"] == "org" and who["principal_id"]
    assert who["data"]["loosened"] == ["org_secrets"] and who["data"]["acknowledged"] is True
    assert who["data"]["after"]["org_secrets"] == "off"
    # ... and then it is really off (the org chose so, on the record)
    w.ask(leak)
    assert w.agent_says()[-1] == leak
    # a PUT without defaults restores the built-in ones
    assert a.ok("PUT", "/policy/egress", json={"rules": []})["defaults_off"] == []
    w.ask(f"again {w.secret}")
    assert w.agent_says()[-1] == leak


def test_common_key_formats_are_redacted_by_default(world: World) -> None:
    """What a person or an agent posts into a network thread with no policy configured."""
    w = world
    gh = "ghp_" + "A1b2C3d4E5" * 3 + "f6G7h8"
    text = f"token {gh} and AWS AKIAIOSFODNN7EXAMPLE ok"
    r = w.a.http.post(
        f"/threads/{w.net_thread}/messages", json={"content": text, "user_id": w.ann["id"]}
    )
    assert r.status_code == 201, r.text
    assert r.json()["content"] == f"token {MARK_KEY} and AWS {MARK_KEY} ok"
    (rec,) = audit(w.a, action="egress.redacted")
    assert rec["reason"] == KEY_FORMATS
    assert [(m["start"], m["end"]) for m in rec["data"]["matches"]] == [
        (6, 6 + len(gh)),
        (text.index("AKIA"), text.index("AKIA") + 20),
    ]
    assert gh not in export(w.a)
    inside = w.a.http.post(
        f"/threads/{w.team_thread}/messages", json={"content": text, "user_id": w.ann["id"]}
    )
    assert inside.json()["content"] == text  # team threads: not filtered by default
    # an org's own rule still wins a tie (its name marks the span)
    w.a.ok(
        "PUT",
        "/policy/egress",
        json={"rules": [{"name": "keys", "kind": "secret", "action": "redact"}]},
    )
    again = w.a.http.post(
        f"/threads/{w.net_thread}/messages", json={"content": text, "user_id": w.ann["id"]}
    )
    assert again.json()["content"] == "token [redacted:keys] and AWS [redacted:keys] ok"


def test_a_person_posting_the_orgs_secret_is_refused_too(world: World) -> None:
    w = world
    for form in encodings(w.secret).values():
        r = w.a.http.post(
            f"/threads/{w.net_thread}/messages",
            json={"content": f"fyi {form}", "user_id": w.ann["id"]},
        )
        err = assert_error(r, 422, "egress_refused")
        assert err["details"] == {"rules": [ORG_SECRETS]} and form not in r.text
    assert all(w.secret not in c for c in w.agent_says())
    assert w.secret not in export(w.a)


def test_tool_calls_are_checked_like_the_content(world: World) -> None:
    """A secret in a tool call's arguments (a workflow reason or summary a model wrote) is
    refused like one in the content; a key format in a tool result is redacted in place."""
    w = world
    url = f"/threads/{w.net_thread}/messages"
    leak = [{"name": "note", "args": {"text": f"k={w.secret}"}, "result": "ok"}]
    r = w.a.http.post(url, json={"content": "done", "user_id": w.ann["id"], "tool_calls": leak})
    assert_error(r, 422, "egress_refused")
    (rec,) = audit(w.a, action="egress.refused")
    (match,) = rec["data"]["matches"]
    assert match["field"] == "tool_calls[0].args.text" and match["secret"] == "API_KEY"
    assert (match["start"], match["end"]) == (2, 2 + len(w.secret))
    gh = "ghp_" + "Z9" * 18
    calls = [{"name": "lookup", "args": {"q": "x"}, "result": {"token": f"use {gh}"}}]
    r = w.a.http.post(url, json={"content": "done", "user_id": w.ann["id"], "tool_calls": calls})
    assert r.status_code == 201, r.text
    (seen,) = [
        m
        for m in all_envelopes(w.b.http, w.net_thread, messages_only=True)
        if m["content"] == "done"
    ]
    assert seen["data"]["tool_calls"][0]["result"] == {"token": f"use {MARK_KEY}"}
    assert gh not in json.dumps(seen) and w.secret not in export(w.a)


def test_a_secret_written_or_deleted_applies_to_the_next_post_at_once(world: World) -> None:
    w, a = world, world.a
    fresh = new_secret()
    post = lambda: a.http.post(  # noqa: E731
        f"/threads/{w.net_thread}/messages",
        json={"content": f"x{fresh}x", "user_id": w.ann["id"]},
    )
    assert post().status_code == 201  # not a secret yet (and the org's index is now cached)
    a.ok("PUT", f"/agents/{w.leaky['id']}/secrets/OTHER", json={"value": fresh})
    assert_error(post(), 422, "egress_refused")
    a.ok("DELETE", f"/agents/{w.leaky['id']}/secrets/OTHER")
    assert post().status_code == 201


def test_secrets_stored_before_fingerprints_are_fingerprinted_on_first_use(
    server: LiveServer, make_org: Any
) -> None:
    """A row with no fingerprints (written before migration 0010) is still caught: the server
    fingerprints it on first use and stores the MACs; no stored column holds the value."""
    w = build_world(server, make_org)
    with sqlite3.connect(server.db) as conn:
        conn.execute("UPDATE agent_secrets SET fingerprints = NULL")
    server.restart()  # a fresh process context: nothing cached
    w.ask(f"It is {w.secret}.")
    assert w.agent_says() == []
    assert audit(w.a, action="egress.refused")[0]["reason"] == ORG_SECRETS
    with sqlite3.connect(server.db) as conn:
        ((stored, cipher),) = conn.execute("SELECT fingerprints, ciphertext FROM agent_secrets")
    assert stored is not None and json.loads(stored)["forms"]
    for form in encodings(w.secret).values():
        assert form not in stored and form not in cipher
    # the process keeps MACs only: the cached index holds no form of the value
    index = server.app.state.services.ctx.org_secrets._indexes._entries[w.a.id][0]
    kept = repr(index._forms) + repr(index._anchors) + index._key.hex()
    for form in encodings(w.secret).values():
        assert form not in kept and form.encode().hex() not in kept


# ----------------------------------------------------------------------------- detectors


ALPHABET = string.ascii_letters + string.digits + " _-./+=:@é€\n"
TEXT = st.text(alphabet=ALPHABET, max_size=60)
SECRET = st.text(alphabet=ALPHABET, min_size=MIN_SECRET_CHARS, max_size=40).filter(
    lambda s: len(s.strip()) >= MIN_SECRET_CHARS
)
MASTER = b"k" * 32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(SECRET, min_size=1, max_size=3, unique=True),
    before=TEXT,
    after=TEXT,
    pick=st.integers(min_value=0),
)
def test_every_embedding_of_every_form_is_found(
    values: list[str], before: str, after: str, pick: int
) -> None:
    """For random secrets and random text around it, each supported form of each secret is
    found exactly where it was embedded, also glued to its neighbours."""
    index = SecretIndex(
        MASTER,
        "org",
        [("agt", f"S{i}", fingerprint(MASTER, "org", v)) for i, v in enumerate(values)],
    )
    value = values[pick % len(values)]
    forms = secret_forms(value)
    bases = {value, value.strip()}
    expected = {f for b in bases for f in table_of(b).values()}
    assert {f for _, f in forms} == expected
    for _encoding, form in forms:
        text = before + form + after
        start, end = len(before), len(before) + len(form)
        found = index.find(text)
        # found where it was put (or inside a longer form of it that the neighbours complete,
        # e.g. the unpadded base64 followed by '=')
        assert any(m.start <= start and end <= m.end for m in found), (form, text, found)
        for m in found:
            assert any(text[m.start : m.end] == f for v in values for _, f in secret_forms(v))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(SECRET, min_size=1, max_size=3, unique=True), text=st.text(max_size=300))
def test_no_false_positive_on_text_without_any_form(values: list[str], text: str) -> None:
    """A text containing no form of any secret never matches (a false positive would need a
    128-bit MAC collision), and every match reported is exactly a form of a secret."""
    prints = [("agt", f"S{i}", fingerprint(MASTER, "org", v)) for i, v in enumerate(values)]
    index = SecretIndex(MASTER, "org", prints)
    forms = {f for v in values for _, f in secret_forms(v)}
    for m in index.find(text):
        assert text[m.start : m.end] in forms
    assume(not any(f in text for f in forms))
    assert index.find(text) == []
    # another org's key finds nothing, even in a text that holds the forms
    other = SecretIndex(MASTER, "other-org", prints)
    assert other.find(text + "".join(forms)) == []


def test_short_values_are_not_fingerprinted_and_stride_bounds_the_scan() -> None:
    assert secret_forms("1234567") == [] and secret_forms("  1234567  ") == []
    long_index = SecretIndex(MASTER, "o", [("a", "L", fingerprint(MASTER, "o", "x" * 40))])
    assert long_index.stride == 16
    mixed = SecretIndex(
        MASTER,
        "o",
        [
            ("a", "L", fingerprint(MASTER, "o", "x" * 40)),
            ("a", "S", fingerprint(MASTER, "o", "12345678")),
        ],
    )
    assert mixed.stride == 1  # an 8-character secret: every window is sampled
    assert [m.name for m in mixed.find("ab12345678cd")] == ["S"]


@pytest.mark.parametrize(
    "leak",
    [
        "ghp_" + "a" * 36,
        "github_pat_" + "A1" * 20,
        "glpat-" + "x" * 20,
        "xoxb-123456789012-abcdefghij",
        "https://hooks.slack.com/services/T0000/B0000/" + "X" * 24,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "AIza" + "B" * 35,
        "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
        "whsec_" + "q" * 32,
        "SG." + "a" * 22 + "." + "b" * 43,
        "npm_" + "c" * 36,
        "hf_" + "d" * 34,
        "Authorization: Bearer " + "e" * 32,
        "postgres://admin:s3cretpw@db.internal:5432/app",
        "AccountKey=Zm9vYmFyYmF6cXV4",
        "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    ],
)
def test_default_key_formats(leak: str) -> None:
    result = check_egress(DEFAULT_POLICY, f"see {leak} here", None)
    assert leak not in result.content and MARK_KEY in result.content
    assert result.redacted == [KEY_FORMATS]


@pytest.mark.parametrize(
    "harmless",
    [
        "the password policy is strict",
        "Bearer tokens are described in RFC 6750",
        "see https://example.com:8080/path and mail@example.com",
        "skiing in sk-ii",
        "eyJ alone",
    ],
)
def test_default_key_formats_leave_ordinary_text(harmless: str) -> None:
    assert check_egress(DEFAULT_POLICY, harmless, None).content == harmless


def test_check_message_is_all_or_nothing_over_content_and_tool_calls() -> None:
    value = "pa55-w0rd-XYZ"
    index = SecretIndex(MASTER, "o", [("agt_1", "PW", fingerprint(MASTER, "o", value))])
    calls = [{"name": "t", "args": {"a": ["fine", {"b": value}]}, "result": None}]
    with pytest.raises(EgressRefusedError) as info:
        check_message(DEFAULT_POLICY, "harmless", calls, index)
    assert [m.field for m in info.value.matches] == ["tool_calls[0].args.a[1].b"]
    ok = check_message(DEFAULT_POLICY, "AKIAIOSFODNN7EXAMPLE", [{"name": "t", "args": {}}], index)
    assert ok.content == MARK_KEY and ok.tool_calls == [{"name": "t", "args": {}}]
    assert check_message(DEFAULT_POLICY, "hi", None, index).tool_calls is None


def test_org_secret_refusal_carries_the_spans_not_the_value() -> None:
    value = "correct horse battery staple"
    index = SecretIndex(MASTER, "o", [("agt_1", "PASS", fingerprint(MASTER, "o", value))])
    text = f"pw={quote(value)}"
    with pytest.raises(EgressRefusedError) as info:
        check_egress(DEFAULT_POLICY, text, index)
    err = info.value
    assert err.rules == [ORG_SECRETS] and err.details == {"rules": [ORG_SECRETS]}
    (m,) = err.matches
    assert m.to_dict() == {
        "rule": ORG_SECRETS,
        "start": 3,
        "end": len(text),
        "agent_id": "agt_1",
        "secret": "PASS",
        "encoding": "url",
    }
    assert value not in str(err) and quote(value) not in str(err)


# ----------------------------------------------------------------------------- point 7: tools


class ToolThenEcho:
    """A model that calls the ``fetch_key`` tool, then repeats what the tool returned."""

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        last = messages[-1]
        returned = [
            p
            for p in (last.parts if isinstance(last, ModelRequest) else [])
            if isinstance(p, ToolReturnPart)
        ]
        if returned:
            return ModelResponse(parts=[TextPart(f"Done:{returned[0].content}.")])
        if any(t.name == "fetch_key" for t in info.function_tools):
            return ModelResponse(parts=[ToolCallPart("fetch_key", {})])
        return ModelResponse(parts=[TextPart("I have no tool.")])


def key_tool(seen: list[str]) -> Tool[RunDeps]:
    async def fetch_key(ctx: RunContext[RunDeps]) -> str:
        """Fetch the agent's API key (a careless tool: it hands the value to the model)."""
        value = await ctx.deps.secrets.get("API_KEY")
        seen.append(value)
        return f"the key is {value}"

    return Tool(fetch_key, takes_ctx=True)


def test_a_tool_gets_its_agents_secret_and_the_echo_never_leaves(
    server: LiveServer, make_org: Any, capfd: pytest.CaptureFixture[str], caplog: Any
) -> None:
    """In-process runner: the agent's tool reads the agent's own secret at run time (not a
    sibling agent's of the same name), the model repeats it, and the egress default refuses
    the reply. The value is in no thread, no log line of the server process and no audit
    record; the reveal itself is audited by name."""
    caplog.set_level("DEBUG")
    w = build_world(server, make_org, script=ToolThenEcho())
    sibling = w.a.agent("Sibling", "sib")
    sibling_value = new_secret()
    w.a.ok("PUT", f"/agents/{sibling['id']}/secrets/API_KEY", json={"value": sibling_value})
    seen: list[str] = []
    register_agent_tools(w.leaky["id"], [key_tool(seen)])
    try:
        w.ask("unused: the model calls its tool")
    finally:
        register_agent_tools(w.leaky["id"], None)
    assert seen == [w.secret]  # its own secret, not the sibling's
    assert w.agent_says() == [] and w.agent_says(org=w.a) == []
    (revealed,) = audit(w.a, action="secret.revealed")
    assert revealed["principal_kind"] == "agent" and revealed["principal_id"] == w.leaky["id"]
    assert revealed["resource_id"] == w.leaky["id"] and revealed["outcome"] == "accepted"
    assert revealed["data"]["name"] == "API_KEY"
    assert revealed["data"]["thread_id"] == w.net_thread
    (refused,) = audit(w.a, action="egress.refused")
    assert refused["data"]["matches"][0]["secret"] == "API_KEY"
    # nowhere: threads (both orgs), audit logs, the server's log output
    for org in (w.a, w.b):
        for path in (f"/threads/{w.net_thread}/envelopes", "/threads"):
            assert w.secret not in org.http.get(path, params={"limit": 1000}).text
        assert w.secret not in export(org)
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    for form in encodings(w.secret).values():
        assert form not in logged
    assert sibling_value not in logged


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A live server without the in-process runner (only remote runners answer); orgs are
    made on it directly (``make_org`` belongs to the ``server`` fixture)."""
    srv = LiveServer(tmp_path / "quiet.db", run_routines=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def token(org: Org, subject_id: str, **kw: Any) -> dict[str, Any]:
    body = {"kind": "agent_token", "subject_id": subject_id, **kw}
    return dict(org.ok("POST", "/credentials", json=body))


def test_secret_values_reach_only_the_agents_own_runner_under_a_live_claim(
    quiet_server: LiveServer,
) -> None:
    w = build_world(quiet_server, lambda name: Org(quiet_server, name))
    a, leaky = w.a, w.leaky
    other = a.agent("Other", "other")
    own = token(a, leaky["id"])
    trigger = a.ok(
        "POST",
        f"/threads/{w.net_thread}/messages",
        json={"content": "hello", "user_id": w.ann["id"]},
    )
    body = {
        "agent_id": leaky["id"],
        "thread_id": w.net_thread,
        "trigger_seq": trigger["seq"],
        "runner_id": "r1",
        "name": "API_KEY",
    }
    ann_token = a.ok("POST", "/credentials", json={"kind": "user_token", "subject_id": w.ann["id"]})

    def ask(key: str, **change: Any) -> Any:
        with quiet_server.client(key) as http:
            return http.post("/runners/secrets", json={**body, **change})

    # nobody but the agent's own token: org keys (own 403, other org 404), a user token,
    # another agent's token, a read-only token of the agent itself
    assert_error(ask(a.key), 403, "permission_denied")
    assert_error(ask(w.b.key), 404, "not_found")
    assert_error(ask(ann_token["secret"]), 403, "permission_denied")
    assert_error(ask(token(a, other["id"])["secret"]), 404, "not_found")
    assert_error(ask(token(a, leaky["id"], scopes=["read"])["secret"]), 403, "permission_denied")
    # the own token, but no live claim of that runner
    assert_error(ask(own["secret"]), 409, "claim_required")
    with quiet_server.client(own["secret"]) as http:
        claim = {k: body[k] for k in ("agent_id", "thread_id", "trigger_seq", "runner_id")}
        made = http.post("/claims", json={**claim, "lease_seconds": 30})
        assert made.status_code == 201, made.text
        assert_error(ask(own["secret"], runner_id="r2"), 409, "claim_required")
        got = ask(own["secret"])
        assert got.status_code == 200, got.text
        assert got.json() == {"agent_id": leaky["id"], "name": "API_KEY", "value": w.secret}
        assert got.headers["cache-control"] == "no-store"
        assert_error(ask(own["secret"], name="NOPE"), 404, "not_found")
        assert http.post("/claims/complete", json=claim).status_code == 200
    assert_error(ask(own["secret"]), 409, "claim_required")  # the job is over
    # the org key lists names only, as before
    listed = a.http.get(f"/agents/{leaky['id']}/secrets")
    assert [s["name"] for s in listed.json()] == ["API_KEY"] and w.secret not in listed.text
    reveals = audit(a, action="secret.revealed")
    assert [(r["outcome"], r["data"]["name"]) for r in reveals] == [
        ("accepted", "API_KEY"),
        ("refused", "NOPE"),
    ]
    assert reveals[0]["principal_kind"] == "agent"
    assert reveals[0]["principal_id"] == own["credential"]["id"]
    assert reveals[0]["data"]["runner_id"] == "r1"
    assert w.secret not in export(a) and w.secret not in export(w.b)


@asynccontextmanager
async def remote(srv: LiveServer, key: str) -> AsyncIterator[RemoteRunner]:
    async with AsyncClient(srv.url, key) as client:
        runner = RemoteRunner(client, relist_seconds=0.3, poll_wait=1.0)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            yield runner
            tg.cancel_scope.cancel()


def test_a_remote_runners_tool_gets_the_secret_and_the_echo_is_refused(
    quiet_server: LiveServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """A remote runner with the agent's token: its tool reads the secret over
    ``POST /runners/secrets``, the model repeats it, and the server's egress default refuses
    the post; B never sees it."""
    w = build_world(quiet_server, lambda name: Org(quiet_server, name), script=ToolThenEcho())
    own = token(w.a, w.leaky["id"])
    seen: list[str] = []
    register_agent_tools(w.leaky["id"], [key_tool(seen)])

    async def run() -> str:
        async with remote(quiet_server, own["secret"]) as runner:
            w.a.ok(
                "POST",
                f"/threads/{w.net_thread}/messages",
                json={"content": "go", "user_id": w.ann["id"]},
            )
            with anyio.fail_after(60):
                while True:  # the refusal is audited by the server (polled over REST)
                    if audit(w.a, action="egress.refused"):
                        break
                    await anyio.sleep(0.1)
            return runner.runner_id

    try:
        runner_id = anyio.run(run)
    finally:
        register_agent_tools(w.leaky["id"], None)
    assert seen == [w.secret]
    assert w.agent_says() == []
    (revealed,) = audit(w.a, action="secret.revealed")
    assert revealed["principal_id"] == own["credential"]["id"]
    assert revealed["data"]["runner_id"] == runner_id
    (refused,) = audit(w.a, action="egress.refused")
    assert refused["principal_id"] == own["credential"]["id"]
    assert refused["data"]["matches"][0]["secret"] == "API_KEY"
    time.sleep(0.2)
    for org in (w.a, w.b):
        assert w.secret not in export(org)
        assert w.secret not in org.http.get(f"/threads/{w.net_thread}/envelopes").text
    out, err = capfd.readouterr()
    assert w.secret not in out + err
