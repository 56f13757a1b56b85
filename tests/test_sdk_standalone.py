"""The SDK stands alone (issue 14, point 4): ``agent_network.client`` imports and works with
httpx, websockets and pydantic alone, never loading the server.

A fresh interpreter installs an import blocker first (a ``sys.meta_path`` finder that raises
ImportError for the server stack and for every ``agent_network`` module outside the SDK, as a
venv without them would), then imports every SDK module and drives a REST client, the blocking
client and a HubClient through httpx's in-memory ``MockTransport``. Every blocked import it
attempted is reported, so even an import guarded by ``try/except ImportError`` fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# what an SDK-only install lacks: the server's third-party stack (rich and click: httpx's
# optional command line, absent without ``httpx[cli]``)
SERVER_STACK = (
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "structlog",
    "pydantic_settings",
    "pydantic_ai",
    "typer",
    "rich",
    "click",
    "cryptography",
    "greenlet",
)
# what the SDK may load: its three dependencies and theirs
ALLOWED_TOP_LEVEL = {
    "agent_network",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "sniffio",
    "idna",
    "certifi",
    "websockets",
    "pydantic",
    "pydantic_core",
    "typing_extensions",
    "typing_inspection",
    "annotated_types",
}

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = set(json.loads(sys.argv[1]))
    attempts = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            server_module = name.startswith("agent_network.") and not (
                name == "agent_network.client" or name.startswith("agent_network.client.")
            )
            if top in BLOCKED or server_module:
                attempts.append(name)
                raise ImportError(f"{name} is blocked: the SDK must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    before = set(sys.modules)

    import anyio
    import httpx

    import agent_network.client as sdk

    for info in pkgutil.iter_modules(sdk.__path__):
        importlib.import_module(f"agent_network.client.{info.name}")

    def answer(request):
        if request.url.path == "/api/v1/health":
            return httpx.Response(200, json={"status": "ok", "version": "x"})
        if request.url.path == "/api/v1/teams":
            return httpx.Response(200, json=[])
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    class OneClientLink:
        token = "key"

        def __init__(self):
            self.client = sdk.AsyncClient(
                "http://sdk.invalid", "key", transport=httpx.MockTransport(answer)
            )

        def rest(self, token):
            return self.client

        def follow(self, token, thread_id, *, after=None, cursor=None):
            raise NotImplementedError

        async def ack(self, token, thread_id, seq, cursor):
            return None

    async def main():
        link = OneClientLink()
        async with link.client as client:
            assert (await client.health()).status == "ok"
            assert await client.teams.list() == []
            try:
                await client.threads.get("thr_missing")
            except sdk.NotFound:
                pass
            else:
                raise AssertionError("a 404 must raise NotFound")
            realtime = client.realtime()
            assert isinstance(realtime, sdk.Realtime)
        hub = sdk.HubClient(link, token_ttl=None)
        assert hub.rest is link.client and hub.agents == {}
        assert sdk.Resume(capabilities=["x"]).capabilities == ["x"]

    anyio.run(main)
    blocking = sdk.Client("http://sdk.invalid", "key")
    blocking.close()

    loaded = sorted(
        {m.split(".")[0] for m in set(sys.modules) - before}
        - set(sys.stdlib_module_names)
    )
    server = sorted(
        m for m in sys.modules
        if m.startswith("agent_network.") and not m.startswith("agent_network.client")
    )
    print(json.dumps({"attempts": attempts, "loaded": loaded, "server": server}))
    """
)


def _run_sdk_only() -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SERVER_STACK)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"the SDK failed without the server stack:\n{proc.stderr}"
    result: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_sdk_imports_and_works_without_the_server_stack() -> None:
    result = _run_sdk_only()
    server_attempts = [
        name
        for name in result["attempts"]
        if name.split(".")[0] not in ("rich", "click")  # httpx's optional CLI, tried by httpx
    ]
    assert server_attempts == [], f"the SDK tried to import the server: {server_attempts}"
    assert result["server"] == []
    extra = [
        name
        for name in result["loaded"]
        if name not in ALLOWED_TOP_LEVEL and not name.startswith("_")
    ]
    assert extra == [], f"the SDK loaded more than httpx, websockets and pydantic: {extra}"


def test_teams_and_networks_share_one_base_class() -> None:
    """Issue 14, point 6: ``Teams`` and ``Networks`` differ only by their path; every call they
    share is declared once, on ``TeamLike``, and still recorded per class in ENDPOINTS."""
    from agent_network.client.rest import ENDPOINTS, Networks, TeamLike, Teams

    shared = {name for name, attr in vars(TeamLike).items() if hasattr(attr, "endpoint")}
    assert {"create", "list", "get", "update", "add_member", "members"} <= shared
    for cls, base in ((Teams, "/teams"), (Networks, "/networks")):
        assert issubclass(cls, TeamLike) and cls.base == base
        assert shared.isdisjoint(vars(cls)), f"{cls.__name__} redefines a shared call"
        recorded = {e.name: e.path for e in ENDPOINTS if e.name.startswith(f"{cls.__name__}.")}
        for name in shared:
            assert recorded[f"{cls.__name__}.{name}"].startswith(base)
    assert {e.name for e in ENDPOINTS if e.name.startswith("TeamLike.")} == set()
    assert {"Teams.delete", "Networks.join", "Networks.leave", "Networks.close"} <= {
        e.name for e in ENDPOINTS
    }
