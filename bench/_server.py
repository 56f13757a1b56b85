"""What the benchmark scripts share: a real server process on loopback and /proc readings.

:class:`ServerProcess` starts ``agent-network serve``'s server (``GracefulServer`` with the
startup heap frozen, over ``create_app(Settings(database=<db>, model="test"))``) as a separate
Python process on 127.0.0.1 and a free port, after migrating the database and creating a
platform admin key on it; ``org(...)`` bootstraps an org with a user in a team over REST.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from agent_network.services import create_admin_key
from agent_network.store.engine import create_engine, database_url, upgrade_schema

SERVER_CODE = """
import sys
import uvicorn
from agent_network.api import create_app
from agent_network.api.server import GracefulServer
from agent_network.config import Settings
app = create_app(Settings(database=sys.argv[1], model="test", run_routines=sys.argv[3] == "1"))
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                        backlog=4096)
GracefulServer(config, freeze_gc=True).run()  # as `agent-network serve` does
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ok(r: httpx.Response) -> Any:
    """The JSON body of a 2xx response (None when empty); RuntimeError naming the call otherwise."""
    if r.status_code >= 300:
        raise RuntimeError(f"{r.request.method} {r.request.url} -> {r.status_code} {r.text}")
    return r.json() if r.content else None


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in KiB (from /proc/<pid>/status)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = float(value.split()[0])
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by ``pid`` (default: this process), all threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def bootstrap(db: Path) -> str:
    """Migrate ``db`` and create a platform admin key on it (before the server starts)."""
    engine = create_engine(database_url(db))
    await upgrade_schema(engine)
    key = await create_admin_key(engine)
    await engine.dispose()
    return key


@dataclass
class Org:
    """An org bootstrapped over REST: its key, a user, a team holding the user, a client."""

    key: str
    user_id: str
    team_id: str
    http: httpx.Client = field(repr=False)

    def new_thread(self, title: str) -> str:
        """Open a thread in the team; returns its id."""
        r = self.http.post(f"/teams/{self.team_id}/threads", json={"title": title})
        return str(ok(r)["id"])


class ServerProcess:
    """A server in its own process, for the duration of a ``with`` block.

    ``work`` holds the database (``an.db``) and the server's log (``server.log``, whose tail is
    written to stderr when the block raises). ``base`` is the REST root, ``ws_url`` the
    WebSocket endpoint, ``pid`` the server process, ``admin_key`` a platform admin key, and
    ``startup_s`` the seconds until ``/health`` answered. ``run_routines`` starts the
    in-process runner too. RuntimeError when the server exits early or is not healthy in
    ``timeout`` seconds.
    """

    def __init__(self, work: Path, *, run_routines: bool = False, timeout: float = 60) -> None:
        self.work = work
        self.db = work / "an.db"
        self.log_path = work / "server.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/v1/ws"
        self.run_routines = run_routines
        self.timeout = timeout
        self.admin_key = ""
        self.startup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[httpx.Client] = []

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None, "the server is not running"
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        self.admin_key = asyncio.run(bootstrap(self.db))
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SERVER_CODE,
                    str(self.db),
                    str(self.port),
                    "1" if self.run_routines else "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self._stop(failed=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop(failed=exc is not None)

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.timeout:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited early with code {self._proc.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not healthy within {self.timeout:g} s")

    def _stop(self, *, failed: bool) -> None:
        for client in self._clients:
            client.close()
        if failed and self.log_path.exists():
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def client(self, key: str) -> httpx.Client:
        """A REST client acting with ``key`` (closed with the server)."""
        http = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        self._clients.append(http)
        return http

    def org(self, name: str = "bench") -> Org:
        """Create org ``name`` with a user in a team; returns them with a client on its key."""
        key = ok(self.client(self.admin_key).post("/orgs", json={"name": name}))["secret"]
        http = self.client(key)
        user = ok(http.post("/users", json={"name": f"{name} user"}))
        team = ok(http.post("/teams", json={"name": f"{name} team"}))
        ok(http.post(f"/teams/{team['id']}/members", json={"user_id": user["id"]}))
        return Org(key, user["id"], team["id"], http)
