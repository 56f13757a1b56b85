"""Commands that work on this machine: ``serve``, ``admin-key``, ``demo``, ``doctor`` and
``runner`` (the offline ``db`` group is :mod:`agent_network.cli.db`).

Where the local state lives has one name, ``--data-dir`` (a folder; its database is
``<data-dir>/agent-network.db``), on ``serve``, ``admin-key``, ``db`` and ``demo``. A database
URL (or another file) is given with ``AGENT_NETWORK_DATABASE``; the old ``--db`` option is
kept, hidden, for scripts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import anyio
import typer
from rich.markup import escape
from rich.text import Text

from agent_network.cli.common import (
    DEFAULT_URL,
    URL_ENV,
    TokenOption,
    UrlOption,
    connection,
    fail,
    out,
    print_json,
    warn,
)
from agent_network.config import Settings

DATABASE_FILE = "agent-network.db"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help=f"folder of the local state; the database is <data-dir>/{DATABASE_FILE} "
        "[default: .agent-network; env AGENT_NETWORK_DATABASE names a file or URL instead]",
        show_default=False,
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="database URL (postgresql://user@host:5432/name, for several servers on one "
        "database) or SQLite file; overrides --data-dir [env AGENT_NETWORK_DATABASE]",
        show_default=False,
    ),
]


def database(data_dir: Path | None, db: str | None) -> str:
    """The database to open: ``--db`` (a URL or a SQLite file), else
    ``<data_dir>/agent-network.db``, else ``AGENT_NETWORK_DATABASE`` or the default of
    :class:`Settings`."""
    if db:
        return db
    if data_dir is not None:
        return str(data_dir / DATABASE_FILE)
    return Settings().database


def shown_database(database_: str) -> str:
    """``database_`` as it may be printed: a URL's password replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in database_:
        return database_  # a SQLite file path
    try:
        return make_url(database_).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return database_


def open_database_failed(database_: str, exc: BaseException) -> NoReturn:
    """Exit 1 with one line saying the database ``database_`` cannot be opened and why (the
    driver's own reason, not a traceback)."""
    reason = getattr(exc, "orig", None) or exc
    detail = " ".join(str(reason).split())
    if isinstance(reason, OSError):
        detail = f"{type(reason).__name__}: {detail}"
    fail(f"cannot open the database {shown_database(database_)}: {detail}")


def make_data_dir(data_dir: Path | None) -> None:
    """Create ``data_dir`` (and its parents) when given; exits 1 naming it when it cannot be
    made (no permission, a file in the way)."""
    if data_dir is None:
        return
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the data folder {data_dir}: {exc.strerror or exc}")


def _database_errors() -> tuple[type[BaseException], ...]:
    """What opening a database raises when it is unreachable or refuses us."""
    from sqlalchemy.exc import DBAPIError

    return (OSError, DBAPIError)


def _settings(database_: str, **extra: object) -> Settings:
    changes = {k: v for k, v in {"database": database_, **extra}.items() if v is not None}
    return Settings().model_copy(update=changes)


def uses_local_model(model: str | None) -> bool:
    """Whether ``model`` (None: the default) resolves to the bundled local model."""
    from agent_network.runtime.models import resolve_model_name

    return resolve_model_name(None, model).startswith("local:")


def print_checks(checks: list[Any], *, only_problems: bool = False) -> None:
    """The doctor's checks as lines: a mark, the name, the detail, then the fix command."""
    console = out()
    for check in checks:
        if only_problems and check.ok:
            continue
        mark = (
            "[green]ok[/]  "
            if check.ok
            else ("[yellow]warn[/]" if check.warning else "[red]FAIL[/]")
        )
        console.print(f"{mark} [bold]{escape(check.name)}[/]: {escape(str(check.detail))}")
        if not check.ok and check.fix:
            console.print(f"       fix: [bold]{escape(str(check.fix))}[/]")


def startup_check(what: str) -> bool:
    """The doctor's local-model checks before ``what`` starts; the process-wide model worker
    stays up. Prints one line when all is well, else the problems and their fixes. Returns
    whether the local model can run."""
    from agent_network.doctor import failed, run_checks
    from agent_network.runtime.model_supervisor import get_supervisor

    console = out()
    checks = run_checks(supervisor=get_supervisor())
    problems = failed(checks)
    if problems:
        console.print(f"[red]The local model cannot run here; {what} goes on without it:[/]")
        print_checks(checks, only_problems=True)
        console.print(
            "Agents on the local model will fail (audited as routine.failed) until it is "
            "fixed; agents on other models are not affected."
        )
        return False
    generation = next(c for c in checks if c.name == "generation")
    console.print(Text(f"Local model ready: {generation.detail}"))
    print_checks([c for c in checks if c.warning])
    return True


def serve(
    data_dir: DataDirOption = None,
    db: DbOption = None,
    host: Annotated[str | None, typer.Option(help="bind address [default: 127.0.0.1]")] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="TCP port, 0-65535 (0: any free port) [default: 8321]"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="default model for agents without one, e.g. 'test'")
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            help="debug, info (with the access log), warning, error or critical; text on a "
            "terminal, JSON lines otherwise",
        ),
    ] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="server processes sharing the port (more than 1 needs a PostgreSQL database); "
            "each runs its own in-process runner",
        ),
    ] = 1,
) -> None:
    """Run the API server on the embedded database (REST under /api/v1).

    The address is bound before anything is announced: a port in use is an error (exit 1)
    and no banner, admin key or database change comes before it. ``--workers N`` starts N
    processes on the one port (PostgreSQL only: on SQLite it is an error, exit 2).
    """
    from agent_network.api import create_app
    from agent_network.api.server import bind, serve_workers
    from agent_network.api.server import serve as serve_app
    from agent_network.cli.logs import configure_logging
    from agent_network.services import create_admin_key, has_admin_key
    from agent_network.store.engine import create_engine, database_url, upgrade_schema

    if log_level.lower() not in LOG_LEVELS:
        fail(f"unknown --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}", 2)
    settings = _settings(database(data_dir, db), host=host, port=port, model=model)
    if workers > 1 and not database_url(settings.database).startswith("postgresql"):
        fail(
            f"--workers {workers} needs a PostgreSQL database (--db postgresql://... or "
            "AGENT_NETWORK_DATABASE): server processes on one SQLite file would each cache and "
            "order threads alone. Use --workers 1 with SQLite.",
            2,
        )
    try:
        sock = bind(settings.host, settings.port)
    except (OSError, ValueError) as exc:
        fail(f"cannot listen on {settings.host}:{settings.port}: {exc}")
    configure_logging(log_level.lower())
    try:
        bound_port = int(sock.getsockname()[1])
        make_data_dir(data_dir)

        async def bootstrap() -> str | None:
            engine = create_engine(database_url(settings.database))
            try:
                await upgrade_schema(engine)
                if await has_admin_key(engine):
                    return None
                return await create_admin_key(engine)
            finally:
                await engine.dispose()

        try:
            key = anyio.run(bootstrap)
        except _database_errors() as exc:
            open_database_failed(settings.database, exc)
        if settings.run_routines and uses_local_model(settings.model):
            startup_check("the server")
        url = f"http://{settings.host}:{bound_port}"
        out().print(
            Text.assemble(
                "Agent Network serving on ",
                (url, "bold"),
                f" (API {url}/api/v1, docs {url}/api/v1/docs), "
                f"database {shown_database(settings.database)}",
            )
        )
        if key:
            out().print(
                Text.assemble("Platform admin key (shown once, keep it): ", (key, "bold yellow"))
            )
        if workers > 1:
            # the workers are spawned: they read the same settings from the environment
            os.environ.update(
                {
                    "AGENT_NETWORK_DATABASE": settings.database,
                    "AGENT_NETWORK_HOST": settings.host,
                    "AGENT_NETWORK_PORT": str(bound_port),
                    WORKER_LOG_LEVEL_ENV: log_level.lower(),
                    **({"AGENT_NETWORK_MODEL": settings.model} if settings.model else {}),
                }
            )
            out().print(f"{workers} server processes share the port")
            serve_workers(
                "agent_network.cli.local:worker_app",
                workers=workers,
                sock=sock,
                ws_max_size=settings.max_body_bytes,
                log_level=log_level.lower(),
            )
            return
        serve_app(
            create_app(settings.model_copy(update={"port": bound_port})),
            host=settings.host,
            port=bound_port,
            ws_max_size=settings.max_body_bytes,
            log_level=log_level.lower(),
            sock=sock,
        )
    finally:
        sock.close()


WORKER_LOG_LEVEL_ENV = "AGENT_NETWORK_WORKER_LOG_LEVEL"
"""Log level handed to the worker processes of ``serve --workers`` (set by ``serve``)."""


def worker_app() -> Any:
    """The app of one ``serve --workers`` process: logging as ``serve`` configured it, settings
    from the environment (``AGENT_NETWORK_*``, set by ``serve``). A uvicorn app factory."""
    from agent_network.api import create_app
    from agent_network.cli.logs import configure_logging

    configure_logging(os.environ.get(WORKER_LOG_LEVEL_ENV, "info"))
    return create_app(Settings())


def admin_key(data_dir: DataDirOption = None, db: DbOption = None) -> None:
    """Create a new platform admin key and print it (it is stored hashed)."""
    from agent_network.services import create_admin_key
    from agent_network.store.engine import create_engine, database_url, upgrade_schema

    settings = _settings(database(data_dir, db))
    make_data_dir(data_dir)

    async def make() -> str:
        engine = create_engine(database_url(settings.database))
        try:
            await upgrade_schema(engine)
            return await create_admin_key(engine)
        finally:
            await engine.dispose()

    try:
        key = anyio.run(make)
    except _database_errors() as exc:
        open_database_failed(settings.database, exc)
    typer.echo(key)


def demo(
    data_dir: Annotated[Path, typer.Option(help="folder of the demo's state (wiped first)")] = Path(
        ".agent-network/demo"
    ),
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port of the demo server (0: any free port)")
    ] = 0,
    model: Annotated[
        str | None, typer.Option(help="model for both agents (default: the bundled local model)")
    ] = None,
    examples: Annotated[
        Path | None, typer.Option(help="folder holding demo/ (default: the repository's examples)")
    ] = None,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep",
            help="leave the server running afterwards (until Ctrl-C) and print the web app's "
            "URL with sign-in links for Alex and Sam",
        ),
    ] = False,
) -> None:
    """Two companies' agents collaborate in one shared network thread (the main job)."""
    from agent_network.demo import run_demo

    raise typer.Exit(
        run_demo(
            data_dir=data_dir,
            port=port,
            model=model,
            examples=examples,
            console=out(),
            keep=keep,
        )
    )


def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
    no_generate: Annotated[
        bool, typer.Option("--no-generate", help="skip the one-token generation")
    ] = False,
) -> None:
    """Check this machine: Python, packages, the local model's packages, weights and build, and a
    one-token generation in a model worker. Exit status 1 when something must be fixed."""
    from agent_network.doctor import failed, run_checks

    checks = run_checks(generate=not no_generate)
    if json_output:
        print_json({"ok": not failed(checks), "checks": [c.as_dict() for c in checks]})
    else:
        print_checks(checks)
        problems = failed(checks)
        if problems:
            out().print(f"[red]{len(problems)} problem(s): run the fix command(s) above.[/]")
        else:
            out().print("[green]Everything needed to run Agent Network is here.[/]")
    raise typer.Exit(1 if failed(checks) else 0)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def check_reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url`` answers ``GET /api/v1/health`` with 200, else why not (one line)."""
    import httpx

    try:
        response = httpx.get(f"{url}/api/v1/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if response.status_code != 200:
        return f"GET /api/v1/health answered {response.status_code}"
    return None


def wait_reachable(url: str, timeout: float) -> str | None:
    """None once ``url`` answers ``GET /api/v1/health`` (tried every second for up to
    ``timeout`` seconds), else why the last try failed. The first failure is reported on
    stderr at once, so a wrong URL is never a silent wait."""
    deadline = time.monotonic() + timeout
    problem = check_reachable(url, timeout=min(5.0, max(timeout, 0.5)))
    if problem is None:
        return None
    warn(f"cannot reach the server at {url} ({problem}); trying for {timeout:g} s more")
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        problem = check_reachable(url, timeout=min(5.0, max(deadline - time.monotonic(), 0.5)))
        if problem is None:
            return None
    return problem


def runner(
    url: UrlOption = None,
    token: TokenOption = None,
    runner_id: Annotated[
        str | None,
        typer.Option(
            help="id in claims (default: stable per host, user, server and credential, so a "
            "restarted runner takes back its own claims at once)"
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            max=3600,
            help="claim lease in seconds, renewed while busy [default: AGENT_NETWORK_CLAIM_LEASE "
            "or 10]",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="triggers answered at once")] = 2,
    relist: Annotated[
        float, typer.Option(min=0.1, help="seconds between re-reading agents and threads")
    ] = 10.0,
    poll_wait: Annotated[
        float, typer.Option(min=0, max=60, help="long-poll seconds per request")
    ] = 20.0,
    model: Annotated[
        str | None,
        typer.Option(help="model for agents without one [env AGENT_NETWORK_MODEL], e.g. 'test'"),
    ] = None,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--import",
            help="Python module to import first (e.g. one calling register_model); repeatable",
        ),
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            max=3600,
            help="seconds to wait for the server to answer GET /api/v1/health at start, "
            "then exit 1",
        ),
    ] = 30.0,
) -> None:
    """Run the participate and triage routines of the agents a credential owns, here.

    The credential is an org key (every agent of the org) or an agent token (that agent).
    Follows their threads over REST (long-poll), claims each trigger with a lease so that
    several runners (and the server's in-process runner) share the work, and posts each reply
    once. Stops cleanly on SIGTERM / SIGINT; a crashed runner's claims are taken back when it
    starts again on the same host, else they expire after the lease. Exit 1 at once when the
    server does not answer GET /api/v1/health within --connect-timeout seconds (it says so at
    once and keeps trying until then: a server that is restarting is waited for).
    """
    import importlib
    import signal

    from agent_network.client import ApiError, AsyncClient
    from agent_network.runtime.identity import RunnerIdInUseError
    from agent_network.runtime.remote import RemoteRunner

    conn = connection(url, token)
    for name in plugin or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            fail(f"cannot import {name!r}: {exc}", 2)
    problem = wait_reachable(conn.url, connect_timeout)
    if problem is not None:
        fail(
            f"cannot reach the server at {conn.url} ({problem}): start it with "
            f"'agent-network serve' or pass --url / {URL_ENV}"
        )
    default_model = model or Settings().model
    if uses_local_model(default_model):
        startup_check("the runner")

    async def run() -> int:
        refused: list[BaseException] = []
        in_use: list[BaseException] = []
        try:
            async with (
                AsyncClient(conn.url, conn.token) as client,
                anyio.create_task_group() as tg,
            ):
                remote = RemoteRunner(
                    client,
                    runner_id=runner_id,
                    lease_seconds=lease,
                    workers=workers,
                    relist_seconds=relist,
                    poll_wait=poll_wait,
                    default_model=default_model,
                )

                async def stop_on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            typer.echo(f"runner {remote.runner_id} stopping")
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(stop_on_signal)
                await tg.start(remote.run)
                typer.echo(f"runner {remote.runner_id} running against {conn.url}")
        except* ApiError as group:
            refused.extend(_leaves(group))
        except* RunnerIdInUseError as group:
            in_use.extend(_leaves(group))
        if in_use:
            typer.echo(f"runner not started: {in_use[0]}", err=True)
            return 2
        if refused:
            typer.echo(f"runner stopped: the server refused it: {refused[0]}", err=True)
            return 1
        typer.echo("runner stopped")
        return 0

    raise typer.Exit(anyio.run(run))


def register(app: typer.Typer) -> None:
    """Add this module's commands and groups to ``app``."""
    app.command()(serve)
    app.command("admin-key")(admin_key)
    app.command()(demo)
    app.command()(doctor)
    app.command()(runner)


__all__ = ["DEFAULT_URL", "check_reachable", "database", "register"]
