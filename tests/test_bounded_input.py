"""Every input is bounded before it is read whole (issue 13, point 4).

Real server (uvicorn on 127.0.0.1), real sockets: oversized REST bodies with and without a
``Content-Length`` get 413 with the project's error body, JSON nested too deep gets 422
``json_too_deep`` on REST and an error frame on the WebSocket (which stays open), an oversized
WebSocket message closes the socket with 1009, and the server goes on serving.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from agent_network.json_limits import MAX_JSON_DEPTH, JsonTooDeepError, json_depth, parse_json
from conftest import LiveServer, Org, assert_error

MIB = 1_048_576


def nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def deep_text(depth: int) -> str:
    return '{"k":' * depth + "1" + "}" * depth


def thread_of(org: Org) -> tuple[str, str]:
    ann = org.user("Ann")
    team = org.team("T", ("user", ann["id"]))
    tid = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
    return str(ann["id"]), str(tid)


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    ann, tid = thread_of(org)
    big = {"content": "x" * (2 * MIB), "user_id": ann}
    r = org.http.post(f"/threads/{tid}/messages", json=big)
    error = assert_error(r, 413, "body_too_large")
    assert "1048576 bytes" in error["message"] and error["details"] == {"max_bytes": MIB}
    # nothing was written, and the server serves on
    assert org.ok("GET", f"/threads/{tid}/messages")["items"] == []
    ok = org.http.post(f"/threads/{tid}/messages", json={"content": "hi", "user_id": ann})
    assert ok.status_code == 201


def test_a_chunked_body_is_cut_off_at_the_limit(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    _, tid = thread_of(org)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = (
            f"POST /api/v1/threads/{tid}/messages HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {org.key}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"x" * 65536
        sent = 0
        try:
            for _ in range(64):  # 4 MiB offered, the server stops reading after 1 MiB
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed the connection
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent >= MIB
    assert org.ok("GET", f"/threads/{tid}/messages")["items"] == []


def test_knowledge_uploads_have_their_own_larger_limit(server: LiveServer, make_org: Any) -> None:
    org = make_org("Acme")
    doc = {"documents": [{"name": "big.md", "content": "word " * 400_000}]}  # 2 MB
    r = org.http.post("/knowledge", json=doc)
    assert r.status_code == 201, r.text[:300]
    r = org.http.post("/threads/nope/messages", json={"content": "x" * (2 * MIB)})
    assert_error(r, 413, "body_too_large")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 10_000])
def test_rest_json_nested_too_deep_is_refused_with_422(
    server: LiveServer, make_org: Any, depth: int
) -> None:
    org = make_org("Acme")
    ann, tid = thread_of(org)
    body = '{"content": "hi", "user_id": "' + ann + '", "data": ' + deep_text(depth) + "}"
    r = org.http.post(
        f"/threads/{tid}/messages",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    error = assert_error(r, 422, "json_too_deep")
    assert error["details"] == {"max_depth": MAX_JSON_DEPTH}
    assert org.ok("GET", f"/threads/{tid}/messages")["items"] == []
    assert org.http.get("/orgs/me").status_code == 200


def test_websocket_frame_nested_too_deep_gets_an_error_and_the_socket_stays(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    _, tid = thread_of(org)
    url = server.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {org.key}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send('{"type": "ping", "x": ' + deep_text(10_000) + "}")
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "error" and frame["error"]["code"] == "json_too_deep", frame
        ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "ref": "p"}
        ws.send(json.dumps({"type": "join", "thread_id": tid, "ref": "j"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "joined"


def test_websocket_message_over_the_limit_closes_with_1009(
    server: LiveServer, make_org: Any
) -> None:
    org = make_org("Acme")
    url = server.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {org.key}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"type": "ping", "pad": "x" * (2 * MIB)}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert org.http.get("/orgs/me").status_code == 200


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(min_value=0, max_value=3 * MAX_JSON_DEPTH))
def test_parse_json_accepts_exactly_the_documents_within_the_depth(depth: int) -> None:
    text = json.dumps(nested(depth))
    assert json_depth(json.loads(text), limit=10**6) == depth
    assert json_depth(json.loads(text)) == min(depth, MAX_JSON_DEPTH + 1)  # stops counting
    if depth <= MAX_JSON_DEPTH:
        assert parse_json(text) == nested(depth)
    else:
        with pytest.raises(JsonTooDeepError):
            parse_json(text)
