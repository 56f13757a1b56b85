"""Shared fixtures: a real server (uvicorn on 127.0.0.1) over a real database.

The database engine is a test parameter: ``engine`` is ``"sqlite"`` unless the test (or its
module, ``pytestmark``) carries ``pytest.mark.engines("sqlite", "postgresql")``; then the test
runs once per engine, ids ``test_x[sqlite]`` and ``test_x[postgresql]``. An engine named as a
keyword (``engines("sqlite", postgresql="reads the SQLite file")``) is reported as skipped with
that reason. ``AGENT_NETWORK_TEST_ENGINES`` (comma-separated, default ``sqlite,postgresql``)
narrows which engines run. The fixtures ``db``, ``server``, ``module_server`` and
:func:`world` follow ``engine``: ``db`` is a SQLite file :class:`~pathlib.Path` or a
``postgresql://`` URL string (a fresh database on the private cluster of ``tests/pgcluster.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from agent_network.api import create_app
from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.runtime.runner import Runner
from agent_network.services import ServiceContext, Services, create_admin_key
from agent_network.store.engine import create_engine, database_url, upgrade_schema
from pgcluster import PgCluster, postgres_available

ENGINES = ("sqlite", "postgresql")
"""The database engines the suites can run on."""

TestDb = Path | str
"""A test database: a SQLite file path, or a ``postgresql://`` URL."""


def is_postgres(db: TestDb) -> bool:
    """True when ``db`` is a PostgreSQL URL (not a SQLite path)."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def selected_engines() -> tuple[str, ...]:
    """The engines ``AGENT_NETWORK_TEST_ENGINES`` lets run (default: all of :data:`ENGINES`)."""
    raw = os.environ.get("AGENT_NETWORK_TEST_ENGINES", ",".join(ENGINES))
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = set(names) - set(ENGINES)
    if unknown:
        raise pytest.UsageError(f"AGENT_NETWORK_TEST_ENGINES: unknown engine(s) {sorted(unknown)}")
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "engines(*names, **skipped): run the test once per database engine named "
        "(sqlite, postgresql); an engine given as keyword=reason is reported skipped with it",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``engine`` from the closest ``engines`` marker (module scope, so a
    ``module_server`` is shared per engine)."""
    if "engine" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is None:
        return
    unknown = (set(marker.args) | set(marker.kwargs)) - set(ENGINES)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown engine(s) {unknown}")
    wanted = selected_engines()
    params = []
    for name in ENGINES:
        if name not in wanted:
            continue
        if name in marker.kwargs:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(marker.kwargs[name])))
        elif name in marker.args:
            marks = []
            if name == "postgresql" and not postgres_available():
                marks.append(pytest.mark.skip("PostgreSQL is not installed (scripts/setup)"))
            params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("engine", params, scope="module")


def sqlite_only(reason: str) -> Callable[[Any], Any]:
    """Mark a test as SQLite-only: its ``[postgresql]`` variant is reported skipped with
    ``reason`` (say why the test cannot apply to PostgreSQL)."""

    def mark(fn: Any) -> Any:
        fn = pytest.mark.engines("sqlite", postgresql=reason)(fn)
        return pytest.mark.usefixtures("engine")(fn)

    return mark


@pytest.fixture(scope="module")
def engine() -> str:
    """The database engine of this test: ``"sqlite"`` unless parametrized by the ``engines``
    marker (see the module docstring)."""
    return "sqlite"


def settings_for(db: TestDb, **settings: Any) -> dict[str, Any]:
    """``Settings`` keyword arguments for ``db``: a PostgreSQL database has no file to keep the
    secret key beside, so a fresh Fernet key is given unless one is."""
    if is_postgres(db) and not settings.get("secret_key"):
        from cryptography.fernet import Fernet

        settings["secret_key"] = Fernet.generate_key().decode()
    return settings


def sync_url(db: TestDb) -> str:
    """A synchronous SQLAlchemy URL for ``db`` (pysqlite, or psycopg for PostgreSQL)."""
    if is_postgres(db):
        return "postgresql+psycopg://" + str(db).split("://", 1)[1]
    return f"sqlite:///{db}"


def _sql(
    db: TestDb, query: str, params: dict[str, Any] | list[dict[str, Any]]
) -> tuple[list[tuple[Any, ...]], int]:
    import sqlalchemy

    eng = sqlalchemy.create_engine(sync_url(db), poolclass=sqlalchemy.pool.NullPool)
    try:
        with eng.begin() as conn:
            result = conn.execute(sqlalchemy.text(query), params)
            rows = [tuple(r) for r in result] if result.returns_rows else []
            return rows, result.rowcount
    finally:
        eng.dispose()


def sql_rows(db: TestDb, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run one SQL query on ``db`` outside the server (a synchronous SQLAlchemy connection,
    committed) and return its rows. ``:name`` binds ``params``. For tests that look at the
    stored rows on either engine."""
    return _sql(db, query, params)[0]


def sql_execute(db: TestDb, query: str, **params: Any) -> int:
    """Run one SQL write on ``db`` outside the server (committed); returns the rows it
    changed. ``:name`` binds ``params``. For tests that tamper with stored rows."""
    return _sql(db, query, params)[1]


def sql_execute_many(db: TestDb, query: str, rows: list[dict[str, Any]]) -> None:
    """Run one SQL write once per dict of ``rows`` (``:name`` binds its keys), in one committed
    transaction on ``db`` outside the server. For tests that seed many rows fast."""
    _sql(db, query, rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A uvicorn server in a background thread over ``db`` (a SQLite path or a PostgreSQL URL,
    already migrated or not); ``restart()`` keeps the database."""

    def __init__(self, db: TestDb, **settings: Any) -> None:
        self.db = db
        self.settings = settings_for(db, **settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = anyio.run(self._bootstrap)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def _bootstrap(self) -> str:
        engine = create_engine(database_url(self.db))
        await upgrade_schema(engine)
        key = await create_admin_key(engine)
        await engine.dispose()
        return key

    @property
    def app(self) -> Any:
        assert self._server is not None
        return self._server.config.app

    def start(self) -> None:
        settings = Settings(database=str(self.db), model="test", **self.settings)
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            ws_max_size=settings.max_body_bytes,  # as `agent-network serve` runs it
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._server.started:
                return
            if not self._thread.is_alive():
                raise RuntimeError("server failed to start")
            time.sleep(0.02)
        raise RuntimeError("server did not start within 30 s")

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), "server did not stop"
        self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=60)

    def wait_runner_idle(self, timeout: float = 60) -> None:
        """Block until the in-process runner has no queued or running job."""
        runner = self.app.state.runner
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if runner._pending == 0:
                time.sleep(0.05)
                if runner._pending == 0:
                    return
        raise TimeoutError("runner still busy")


@pytest.fixture
def server(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> Iterator[LiveServer]:
    """A live server of this test over a fresh database of ``engine``."""
    if engine == "postgresql":
        srv = LiveServer(request.getfixturevalue("pg_db"))
    else:
        srv = LiveServer(tmp_path / "an.db")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Org:
    """An org created through the API, with a client holding its key."""

    def __init__(self, srv: LiveServer, name: str) -> None:
        with srv.client(srv.admin_key) as admin:
            r = admin.post("/orgs", json={"name": name})
            assert r.status_code == 201, r.text
            body = r.json()
        self.id: str = body["org"]["id"]
        self.key: str = body["secret"]
        self.name = name
        self.http = srv.client(self.key)

    def ok(self, method: str, url: str, **kw: Any) -> Any:
        r = self.http.request(method, url, **kw)
        assert r.status_code < 300, f"{method} {url} -> {r.status_code} {r.text}"
        return r.json() if r.content else None

    def user(self, name: str) -> dict[str, Any]:
        return dict(self.ok("POST", "/users", json={"name": name}))

    def agent(self, name: str, key: str, **kw: Any) -> dict[str, Any]:
        return dict(self.ok("POST", "/agents", json={"name": name, "lookup_key": key, **kw}))

    def team(self, name: str, *member_ids: tuple[str, str]) -> dict[str, Any]:
        team = dict(self.ok("POST", "/teams", json={"name": name}))
        for kind, mid in member_ids:
            self.ok("POST", f"/teams/{team['id']}/members", json={f"{kind}_id": mid})
        return team


@pytest.fixture
def make_org(server: LiveServer) -> Iterator[Any]:
    orgs: list[Org] = []

    def make(name: str) -> Org:
        org = Org(server, name)
        orgs.append(org)
        return org

    yield make
    for org in orgs:
        org.http.close()


# ---------------------------------------------------------------------------------------------
# Helpers shared by the API, isolation, WAL, runner and knowledge tests (appended).


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``r`` is the error body ``{"error": {"code": code, "message": ...}}``, ``status``;
    returns the error without its ``request_id`` (checked to match the ``X-Request-ID`` header:
    it differs per request by design, so two answers compare on what they say)."""
    if r.status_code >= 500 and status < 500:
        # Let the server thread finish logging its traceback first: on Python 3.11 formatting
        # two tracebacks at once in two threads can crash pytest (ast recursion-depth SystemError).
        time.sleep(0.5)
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code}: {r.text}"
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    error = dict(body["error"])
    request_id = error.pop("request_id", None)
    assert request_id is None or request_id == r.headers.get("x-request-id"), body
    return error


def all_envelopes(http: httpx.Client, thread_id: str, *, messages_only: bool = False) -> list[Any]:
    """Every envelope (or only messages) of a thread, paging with ``after``/``next_after``."""
    path = "messages" if messages_only else "envelopes"
    out: list[Any] = []
    after = 0
    while True:
        r = http.get(f"/threads/{thread_id}/{path}", params={"after": after, "limit": 1000})
        assert r.status_code == 200, r.text
        body = r.json()
        out.extend(body["items"])
        if body["next_after"] == after:
            return out
        after = body["next_after"]


def settle(srv: LiveServer, http: httpx.Client, *thread_ids: str, quiet: float = 0.3) -> None:
    """Wait until the runner is idle and none of ``thread_ids`` grows for ``quiet`` seconds."""
    deadline = time.monotonic() + 60
    last: list[int] | None = None
    while time.monotonic() < deadline:
        srv.wait_runner_idle()
        seqs = [http.get(f"/threads/{t}").json()["last_seq"] for t in thread_ids]
        if seqs == last:
            return
        last = seqs
        time.sleep(quiet)
    raise TimeoutError("threads kept growing")


@pytest.fixture(scope="module")
def module_server(
    request: pytest.FixtureRequest, engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One live server for a whole test module (for property tests creating fresh orgs), per
    ``engine``."""
    pg: tuple[PgCluster, str] | None = None
    if engine == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database(template=request.getfixturevalue("pg_template"))
        pg = (cluster, url)
        srv = LiveServer(url)
    else:
        srv = LiveServer(tmp_path_factory.mktemp("module-server") / "an.db")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        if pg is not None:
            pg[0].drop_database(pg[1].rsplit("/", 1)[1])


def open_network(
    host: Org,
    guests: dict[Org, list[tuple[str, str]]],
    *host_members: tuple[str, str],
    name: str = "Net",
) -> dict[str, Any]:
    """A network hosted by ``host`` with ``host_members`` (``(kind, id)``), joined by each guest
    org with the members listed for it. Returns the network."""
    net = dict(host.ok("POST", "/networks", json={"name": name}))
    for kind, mid in host_members:
        host.ok("POST", f"/networks/{net['id']}/members", json={f"{kind}_id": mid})
    for guest, picks in guests.items():
        code = host.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
        guest.ok(
            "POST",
            "/networks/join",
            json={
                "code": code,
                "agent_ids": [i for k, i in picks if k == "agent"],
                "user_ids": [i for k, i in picks if k == "user"],
            },
        )
    return net


# ----------------------------------------------------------------------------- hub-level tests


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file with the project's schema (alembic), migrated once per test session."""
    path = tmp_path_factory.mktemp("migrated") / "template.db"

    async def init() -> None:
        engine = create_engine(database_url(path))
        await upgrade_schema(engine)
        await engine.dispose()

    anyio.run(init)
    return path


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private PostgreSQL server per pytest process (per xdist worker), stopped at the end
    (``tests/pgcluster.py``; ``AGENT_NETWORK_TEST_PG`` adopts a running one instead)."""
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PgCluster) -> str:
    """The name of a database on :func:`pg_cluster` with the project's schema, migrated once."""
    url = pg_cluster.create_database("an_template")

    async def init() -> None:
        engine = create_engine(database_url(url))
        await upgrade_schema(engine)
        await engine.dispose()

    anyio.run(init)
    return "an_template"


@pytest.fixture
def pg_db(pg_cluster: PgCluster, pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of this test (a copy of :func:`pg_template`); its
    URL (``postgresql://...``); dropped after the test."""
    url = pg_cluster.create_database(template=pg_template)
    try:
        yield url
    finally:
        pg_cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def module_db(
    request: pytest.FixtureRequest, engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestDb]:
    """A migrated database shared by a whole test module, per ``engine`` (a SQLite path or a
    PostgreSQL URL, dropped after the module)."""
    if engine == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database(template=request.getfixturevalue("pg_template"))
        try:
            yield url
        finally:
            cluster.drop_database(url.rsplit("/", 1)[1])
        return
    path = tmp_path_factory.mktemp("module-db") / "hub.db"
    shutil.copyfile(request.getfixturevalue("migrated_template"), path)
    yield path


@pytest.fixture
def db(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> TestDb:
    """A fresh, migrated database of this test on ``engine``: a SQLite file (a copy of
    :func:`migrated_template`) or a PostgreSQL URL (:func:`pg_db`)."""
    if engine == "postgresql":
        url: str = request.getfixturevalue("pg_db")
        return url
    migrated_template: Path = request.getfixturevalue("migrated_template")
    path = tmp_path / "hub.db"
    shutil.copyfile(migrated_template, path)
    return path


_registered_models: list[str] = []


def function_model(prefix: str, body: Any) -> str:
    """Register ``FunctionModel(body)`` under a fresh model name ``fn:<prefix>-<hex>`` and return
    the name (to give agents as their model); unregistered after the test."""
    from pydantic_ai.models.function import FunctionModel

    from agent_network.runtime.models import register_model

    name = f"fn:{prefix}-{secrets.token_hex(4)}"
    register_model(name, FunctionModel(body))
    _registered_models.append(name)
    return name


@pytest.fixture(autouse=True)
def _unregister_function_models() -> Iterator[None]:
    yield
    from agent_network.runtime.models import register_model

    while _registered_models:
        register_model(_registered_models.pop(), None)


@dataclass
class World:
    """A hub, the services and a running in-process runner over one database."""

    ctx: ServiceContext
    services: Services
    runner: Runner

    @property
    def hub(self) -> Hub:
        return self.ctx.hub


@contextlib.asynccontextmanager
async def world(db: TestDb, runner_class: type[Runner] = Runner) -> AsyncIterator[World]:
    """Hub, services and a running in-process runner (a ``runner_class``) over ``db`` (a SQLite
    path or a PostgreSQL URL); stops them all on exit."""
    engine = create_engine(database_url(db))
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            settings = Settings(database=str(db), model="test", **settings_for(db))
            ctx = ServiceContext(engine, hub, settings)
            runner = runner_class(ctx)
            async with anyio.create_task_group() as tg:
                await tg.start(runner.run)
                yield World(ctx, Services.create(ctx), runner)
                tg.cancel_scope.cancel()
    finally:
        await engine.dispose()
