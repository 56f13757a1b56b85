"""API conventions the web app and the CLI rely on (issue 15): request ids, how to authenticate
after a 401, and CORS that is off unless configured. Against a real server on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from agent_network.api.requests import RequestIdMiddleware
from conftest import LiveServer

ORIGIN = "https://app.example.com"


@pytest.fixture
def cors_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path / "an.db", cors_origins=f"{ORIGIN}, https://other.example.org")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_every_answer_carries_a_request_id_and_errors_repeat_it(server: LiveServer) -> None:
    with server.client() as anonymous:
        ok = anonymous.get("/health")
        assert re.fullmatch(r"[0-9a-f]{32}", ok.headers["x-request-id"])
        missing = anonymous.get("/agents")  # no credential: 401
        assert missing.status_code == 401
        rid = missing.headers["x-request-id"]
        assert rid != ok.headers["x-request-id"]
        assert missing.json()["error"]["request_id"] == rid
        given = anonymous.get("/agents", headers={"X-Request-ID": "lb-7f.3_a"})
        assert given.headers["x-request-id"] == "lb-7f.3_a"
        assert given.json()["error"]["request_id"] == "lb-7f.3_a"
        # an id a client could use to forge log lines is replaced, not echoed
        bad = anonymous.get("/agents", headers={"X-Request-ID": "x" * 65})
        assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])
        unknown = anonymous.get("/no-such-route")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["request_id"] == unknown.headers["x-request-id"]


def test_a_401_says_how_to_authenticate(server: LiveServer) -> None:
    with server.client("an_org_not-a-real-key") as wrong:
        r = wrong.get("/agents")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    with server.client(server.admin_key) as admin:
        assert "www-authenticate" not in admin.get("/orgs").headers


def test_cors_is_off_by_default(server: LiveServer) -> None:
    preflight = httpx.options(
        f"{server.url}/api/v1/agents",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    plain = httpx.get(f"{server.url}/api/v1/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in plain.headers


def test_cors_admits_exactly_the_configured_origins(cors_server: LiveServer) -> None:
    url = f"{cors_server.url}/api/v1/agents"
    asked = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = httpx.options(url, headers={"Origin": ORIGIN, **asked})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    stranger = httpx.options(url, headers={"Origin": "https://evil.example.net", **asked})
    assert stranger.headers.get("access-control-allow-origin") != "https://evil.example.net"
    got = httpx.get(f"{cors_server.url}/api/v1/health", headers={"Origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in got.headers["access-control-expose-headers"].lower()


@pytest.mark.anyio
async def test_log_lines_written_during_a_request_carry_its_id() -> None:
    """The id is bound to structlog's context variables while the request runs."""
    seen: list[object] = []

    async def app(scope: object, receive: object, send: object) -> None:
        seen.append(structlog.contextvars.get_contextvars().get("request_id"))
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    transport = httpx.ASGITransport(app=RequestIdMiddleware(app))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/", headers={"X-Request-ID": "req-1"})
    assert seen == ["req-1"] and r.headers["x-request-id"] == "req-1"
    assert "request_id" not in structlog.contextvars.get_contextvars()  # unbound afterwards
