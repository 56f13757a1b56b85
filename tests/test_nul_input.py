"""U+0000 in any text input is refused with ``422 nul_character`` on both engines, before
anything is written (PostgreSQL text cannot store it; SQLite could, so the rule is one for both)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect

from agent_network.json_limits import NulCharacterError, has_nul, parse_json
from conftest import LiveServer, Org, assert_error

pytestmark = pytest.mark.engines("sqlite", "postgresql")


def thread_of(org: Org) -> tuple[str, str]:
    ann = org.user("Ann")
    team = org.team("T", ("user", ann["id"]))
    tid = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
    return str(ann["id"]), str(tid)


def test_nul_in_json_bodies_query_and_frames_is_refused(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    ann, tid = thread_of(org)
    for body in (
        {"content": "a\x00b", "user_id": ann},
        {"content": "x", "user_id": ann, "idempotency_key": "k\x00"},
        {"content": "x", "user_id": ann, "data": {"k\x00": 1}},
    ):
        r = org.http.post(f"/threads/{tid}/messages", json=body)
        assert "U+0000" in assert_error(r, 422, "nul_character")["message"]
    assert_error(org.http.post("/users", json={"name": "N\x00"}), 422, "nul_character")
    assert_error(org.http.get("/audit", params={"action": "a\x00"}), 422, "nul_character")
    # nothing was written, and the server serves on
    assert org.ok("GET", f"/threads/{tid}/messages")["items"] == []
    assert [u["name"] for u in org.ok("GET", "/users")] == ["Ann"]
    url = server.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {org.key}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"type": "ping", "ref": "a\x00"}))
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "error" and frame["error"]["code"] == "nul_character", frame
        ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "ref": "p"}
    r = org.http.post(f"/threads/{tid}/messages", json={"content": "fine", "user_id": ann})
    assert r.status_code == 201


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@given(st.recursive(st.text(), lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids)))
def test_parse_json_refuses_exactly_the_documents_holding_nul(doc: Any) -> None:
    holds = any("\x00" in s for s in _strings(doc))
    assert has_nul(doc) is holds
    if holds:
        with pytest.raises(NulCharacterError):
            parse_json(json.dumps(doc))
    else:
        assert parse_json(json.dumps(doc)) == doc
