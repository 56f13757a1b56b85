"""A private PostgreSQL cluster for tests and benchmarks: ``initdb`` into a temporary folder with
the Debian PostgreSQL binaries, ``postgres`` on a free 127.0.0.1 port, stopped (and the folder
removed) on :meth:`PgCluster.stop`.

Used by ``tests/conftest.py`` (one cluster per pytest process, so per xdist worker) and by
``bench/scale.py``. When ``AGENT_NETWORK_TEST_PG`` holds a server URL
(``postgresql://user@host:port``), that server is used instead and nothing is started.

Runs as root too: PostgreSQL refuses to, so the cluster then runs as the ``postgres`` system user
(created by Debian's ``postgresql`` package, which ``scripts/setup`` installs when missing).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["PgCluster", "find_bin_dir", "postgres_available"]


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``AGENT_NETWORK_PG_BIN``, the newest
    ``/usr/lib/postgresql/<major>/bin``, or ``$PATH``; None when PostgreSQL is not installed."""
    env = os.environ.get("AGENT_NETWORK_PG_BIN")
    if env:
        return Path(env)
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted(
            (p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
            key=lambda p: int(p.name) if p.name.isdigit() else 0,
        )
        if majors:
            return majors[-1] / "bin"
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_available() -> bool:
    """True when a server URL is configured or the binaries to start one are installed."""
    return bool(os.environ.get("AGENT_NETWORK_TEST_PG")) or find_bin_dir() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL server for the life of a test session or a benchmark run.

    ``start()`` returns the server URL ``postgresql://postgres@127.0.0.1:<port>``;
    ``create_database()`` makes a fresh, empty database on it and returns its URL (plain
    ``postgresql://``: :func:`agent_network.store.engine.database_url` adds the async driver).
    Raises RuntimeError when PostgreSQL is not installed or the server does not start in 60 s.
    """

    def __init__(self, *, max_connections: int = 400) -> None:
        self.max_connections = max_connections
        self.url = os.environ.get("AGENT_NETWORK_TEST_PG", "").rstrip("/")
        self._owned = not self.url
        self._dir: Path | None = None
        self._user: str | None = None
        self._bin: Path | None = None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        """Start the server (or adopt ``AGENT_NETWORK_TEST_PG``); returns its URL."""
        if not self._owned:
            return self.url
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL is not installed: run scripts/setup (it installs Debian's postgresql "
                "package) or set AGENT_NETWORK_TEST_PG to a server URL"
            )
        self._bin = bin_dir
        self._dir = Path(tempfile.mkdtemp(prefix="an-pg-"))
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
        data = self._dir / "data"
        self._run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        port = _free_port()
        options = " ".join(
            [
                f"-p {port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self._dir}",
                f"-c max_connections={self.max_connections}",
                "-c shared_buffers=64MB",
                "-c fsync=on",
                "-c synchronous_commit=on",
            ]
        )
        self._run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self._dir / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self.url = f"postgresql://postgres@127.0.0.1:{port}"
        return self.url

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (a fresh ``t_<hex>`` name unless given; a copy of ``template`` when
        named) and return its URL."""
        import psycopg  # test-only dependency, imported where used

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            sql = f'CREATE DATABASE "{name}"'
            if template:
                sql += f' TEMPLATE "{template}"'
            conn.execute(sql)
        return f"{self.url}/{name}"

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        import psycopg  # test-only dependency, imported where used

        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server this object started and remove its folder (no-op for an adopted one)."""
        if not self._owned or self._dir is None or self._bin is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(
                str(self._bin / "pg_ctl"),
                "-D",
                str(self._dir / "data"),
                "-m",
                "immediate",
                "stop",
                check=False,
            )
        deadline = time.monotonic() + 10
        while (self._dir / "data" / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
