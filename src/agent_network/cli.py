"""The ``agent-network`` command line (Typer + Rich).

- ``serve``: run the API server (prints its URL, and the admin key on first start).
- ``admin-key``: create another platform admin key.
- ``demo``: the two-company demo (see :mod:`agent_network.demo`).
- ``thread show`` / ``thread verify`` / ``thread list``: inspect a database file offline.
- ``threads verify``: check a thread's hash chain on this machine, from what a running server
  returns to a credential (the server is not trusted).
- ``runner``: run the routines of a credential's agents in a separate process (remote runner).
- ``doctor``: check Python, packages and the bundled local model (one token in a worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.table import Table

from agent_network.config import Settings

app = typer.Typer(
    help="Agent Network: durable threads for AI agents across organizations.",
    no_args_is_help=True,
    add_completion=False,
)
thread_app = typer.Typer(help="Inspect threads in a database file (offline).", no_args_is_help=True)
app.add_typer(thread_app, name="thread")
threads_app = typer.Typer(
    help="Threads on a running server, through the API.", no_args_is_help=True
)
app.add_typer(threads_app, name="threads")
knowledge_app = typer.Typer(help="Attach knowledge to a running server.", no_args_is_help=True)
app.add_typer(knowledge_app, name="knowledge")
KNOWLEDGE_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
console = Console()

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="SQLite file or database URL [env AGENT_NETWORK_DATABASE]"),
]


def _uses_local_model(model: str | None) -> bool:
    from agent_network.runtime.models import resolve_model_name

    return resolve_model_name(None, model).startswith("local:")


def _print_checks(checks: list[Any], *, only_problems: bool = False) -> None:
    """The doctor's checks as lines: a mark, the name, the detail, then the fix command."""
    for check in checks:
        if only_problems and check.ok:
            continue
        mark = (
            "[green]ok[/]  "
            if check.ok
            else ("[yellow]warn[/]" if check.warning else "[red]FAIL[/]")
        )
        console.print(f"{mark} [bold]{check.name}[/]: {check.detail}", highlight=False)
        if not check.ok and check.fix:
            console.print(f"       fix: [bold]{check.fix}[/]", highlight=False)


def _startup_check(what: str) -> bool:
    """The doctor's local-model checks before ``what`` starts; the process-wide model worker
    stays up. Prints one line when all is well, else the problems and their fixes. Returns
    whether the local model can run."""
    from agent_network.doctor import failed, run_checks
    from agent_network.runtime.model_supervisor import get_supervisor

    checks = run_checks(supervisor=get_supervisor())
    problems = failed(checks)
    if problems:
        console.print(f"[red]The local model cannot run here; {what} goes on without it:[/]")
        _print_checks(checks, only_problems=True)
        console.print(
            "Agents on the local model will fail (audited as routine.failed) until it is "
            "fixed; agents on other models are not affected."
        )
        return False
    generation = next(c for c in checks if c.name == "generation")
    console.print(f"Local model ready: {generation.detail}", highlight=False)
    _print_checks([c for c in checks if c.warning])
    return True


def _settings(db: str | None, **extra: object) -> Settings:
    settings = Settings()
    changes = {k: v for k, v in {"database": db, **extra}.items() if v is not None}
    return settings.model_copy(update=changes)


@app.command()
def serve(
    db: DbOption = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port")] = None,
    model: Annotated[
        str | None, typer.Option(help="default model for agents without one, e.g. 'test'")
    ] = None,
) -> None:
    """Run the API server on the embedded database (REST under /api/v1)."""
    from agent_network.api import create_app
    from agent_network.api.server import serve as serve_app
    from agent_network.services import create_admin_key, has_admin_key
    from agent_network.store.engine import create_engine, database_url, upgrade_schema

    settings = _settings(db, host=host, port=port, model=model)

    async def bootstrap() -> str | None:
        engine = create_engine(database_url(settings.database))
        try:
            await upgrade_schema(engine)
            if await has_admin_key(engine):
                return None
            return await create_admin_key(engine)
        finally:
            await engine.dispose()

    key = anyio.run(bootstrap)
    if settings.run_routines and _uses_local_model(settings.model):
        _startup_check("the server")
    url = f"http://{settings.host}:{settings.port}"
    console.print(
        f"Agent Network serving on [bold]{url}[/] (API {url}/api/v1, "
        f"docs {url}/api/v1/docs), database {settings.database}"
    )
    if key:
        console.print(f"Platform admin key (shown once, keep it): [bold yellow]{key}[/]")
    serve_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_body_bytes,
    )


@app.command("admin-key")
def admin_key(db: DbOption = None) -> None:
    """Create a new platform admin key and print it (it is stored hashed)."""
    from agent_network.services import create_admin_key
    from agent_network.store.engine import create_engine, database_url, upgrade_schema

    settings = _settings(db)

    async def make() -> str:
        engine = create_engine(database_url(settings.database))
        try:
            await upgrade_schema(engine)
            return await create_admin_key(engine)
        finally:
            await engine.dispose()

    console.print(anyio.run(make))


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the demo database lives (wiped first)")] = (
        Path(".agent-network/demo")
    ),
    port: Annotated[int, typer.Option(help="TCP port of the demo server (0: any free port)")] = 0,
    model: Annotated[
        str | None, typer.Option(help="model for both agents (default: the bundled local model)")
    ] = None,
    examples: Annotated[
        Path | None, typer.Option(help="folder holding demo/ (default: the repository's examples)")
    ] = None,
) -> None:
    """Two companies' agents collaborate in one shared network thread (the main job)."""
    from agent_network.demo import run_demo

    raise typer.Exit(
        run_demo(data_dir=data_dir, port=port, model=model, examples=examples, console=console)
    )


def _inspect_services(db: str | None):  # type: ignore[no-untyped-def]
    from agent_network.store.engine import create_engine, database_url

    settings = _settings(db)
    return create_engine(database_url(settings.database))


@thread_app.command("list")
def thread_list(db: DbOption = None) -> None:
    """Every thread in the database with its state (no API, reads the file)."""
    from sqlalchemy import select

    from agent_network.protocol.fold import fold
    from agent_network.store.tables import orgs, teams, threads
    from agent_network.store.wal import read_envelopes

    async def run() -> None:
        engine = _inspect_services(db)
        table = Table("thread", "title", "team/network", "host org", "status", "last seq")
        async with engine.connect() as conn:
            q = (
                select(threads.c.id, threads.c.title, teams.c.name, orgs.c.name)
                .join(teams, teams.c.id == threads.c.team_id)
                .join(orgs, orgs.c.id == teams.c.org_id)
                .order_by(threads.c.created_at)
            )
            for tid, title, team, org in (await conn.execute(q)).all():
                state = fold(tid, await read_envelopes(conn, tid))
                table.add_row(tid, title, team, org, state.status, str(state.last_seq))
        await engine.dispose()
        console.print(table)

    anyio.run(run)


@thread_app.command("show")
def thread_show(thread_id: str, db: DbOption = None) -> None:
    """Print a thread's envelopes with sender names and orgs."""
    from agent_network.services.threads import render
    from agent_network.store.wal import read_envelopes

    async def run() -> int:
        engine = _inspect_services(db)
        async with engine.connect() as conn:
            envs = await read_envelopes(conn, thread_id)
            items = await render(conn, envs)
        await engine.dispose()
        if not items:
            console.print(f"[red]no thread {thread_id!r} in this database[/]")
            return 1
        for it in items:
            who = f"{it['sender']['name']} ({it['sender']['org_name']})"
            body = (
                it["content"] if it["type"] == "message" else f"[dim]{it['type']} {it['data']}[/]"
            )
            console.print(f"[dim]{it['seq']:>4}[/] [bold]{who}[/]: {body}")
        return 0

    raise typer.Exit(anyio.run(run))


@thread_app.command("verify")
def thread_verify(thread_id: str, db: DbOption = None) -> None:
    """Recompute the thread's hash chain; exit 1 and name the first break if any."""
    from agent_network.hub import Hub

    async def run() -> int:
        engine = _inspect_services(db)
        report = await Hub(engine).verify(thread_id)
        await engine.dispose()
        if report.checked == 0:
            console.print(f"[red]no thread {thread_id!r} in this database[/]")
            return 1
        if report.ok:
            console.print(f"[green]chain intact[/]: {report.checked} envelopes verified")
            return 0
        console.print(f"[red]chain broken at seq {report.first_bad_seq}[/]: {report.reason}")
        return 1

    raise typer.Exit(anyio.run(run))


@threads_app.command("verify")
def threads_verify(
    thread_id: Annotated[str, typer.Argument(help="the thread's id (thr_...)")],
    url: Annotated[
        str, typer.Option(help="server URL [env AGENT_NETWORK_URL]", envvar="AGENT_NETWORK_URL")
    ] = "http://127.0.0.1:8321",
    token: Annotated[
        str,
        typer.Option(
            help="credential that reads the thread: org key, user or agent token "
            "[env AGENT_NETWORK_TOKEN]",
            envvar="AGENT_NETWORK_TOKEN",
            show_default=False,
        ),
    ] = "",
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check a thread's hash chain here, not on the server.

    Fetches every envelope the credential may read (``GET /threads/{id}/envelopes``, paged),
    with a stub for each one its audience hides, and recomputes every hash locally with
    ``agent_network.client.verify_chain`` (docs/security.md, "The hash chain, byte for byte").
    Exit status 0 when the chain holds; 1 when it breaks or the thread cannot be read (unknown,
    out of scope, bad credential, server unreachable); 2 without a credential.
    """
    import json

    from pydantic import ValidationError

    from agent_network.client import ApiError, AsyncClient, TransportError, verify_chain

    if not token:
        console.print("[red]give the credential with --token or AGENT_NETWORK_TOKEN[/]")
        raise typer.Exit(2)

    async def fetch() -> list[Any]:
        async with AsyncClient(url, token) as client:
            return [e async for e in client.threads.chain(thread_id)]

    try:
        chain = anyio.run(fetch)
    except ValidationError as exc:  # the server sent what no envelope looks like: broken
        reason = f"the server sent a malformed envelope: {exc.errors()[0]['msg']}"
        if json_output:
            typer.echo(json.dumps({"thread_id": thread_id, "ok": False, "reason": reason}))
        else:
            console.print(f"[red]chain broken[/] in thread {thread_id}: {reason}", highlight=False)
        raise typer.Exit(1) from None
    except (ApiError, TransportError) as exc:
        code = getattr(exc, "code", "transport_error")
        if json_output:
            error = {"code": code, "message": str(exc)}
            typer.echo(json.dumps({"thread_id": thread_id, "ok": False, "error": error}))
        else:
            console.print(f"[red]cannot read thread {thread_id}[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None
    report = verify_chain(chain)
    if json_output:
        typer.echo(json.dumps({**report.as_dict(), "thread_id": thread_id}))
        raise typer.Exit(0 if report.ok else 1)
    if report.ok:
        console.print(
            f"[green]chain intact[/]: thread {thread_id}, {report.checked} envelopes verified "
            f"here ({report.checked - report.stubs} recomputed, {report.stubs} hidden from this "
            f"credential checked by their links), last hash {report.last_hash}",
            highlight=False,
        )
        raise typer.Exit(0)
    console.print(
        f"[red]chain broken at seq {report.first_bad_seq}[/] of thread {thread_id}: "
        f"{report.reason}",
        highlight=False,
    )
    raise typer.Exit(1)


@knowledge_app.command("add")
def knowledge_add(
    paths: Annotated[list[Path], typer.Argument(help="text/markdown files or directories")],
    url: Annotated[str, typer.Option(help="server URL")] = "http://127.0.0.1:8321",
    key: Annotated[
        str, typer.Option(help="org key", envvar="AGENT_NETWORK_KEY", show_default=False)
    ] = "",
    agent: Annotated[
        str | None, typer.Option(help="agent id (default: org-wide knowledge)")
    ] = None,
) -> None:
    """Upload files (directories: every .md/.markdown/.txt/.rst file below them) in one call."""
    import httpx

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in KNOWLEDGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            console.print(f"[red]no such file or directory: {p}[/]")
            raise typer.Exit(2)
    if not files:
        console.print("[red]no text or markdown files found[/]")
        raise typer.Exit(2)
    if not key:
        console.print("[red]give the org key with --key or AGENT_NETWORK_KEY[/]")
        raise typer.Exit(2)
    docs = [{"name": f.name, "content": f.read_text(encoding="utf-8")} for f in files]
    path = f"/api/v1/agents/{agent}/knowledge" if agent else "/api/v1/knowledge"
    r = httpx.post(
        url.rstrip("/") + path,
        json={"documents": docs},
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
    )
    if r.status_code != 201:
        console.print(f"[red]{r.status_code}[/]: {r.text}")
        raise typer.Exit(1)
    for doc in r.json():
        console.print(f"{doc['id']}  {doc['name']}  ({doc['chunks']} chunks)")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@app.command()
def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
    no_generate: Annotated[
        bool, typer.Option("--no-generate", help="skip the one-token generation")
    ] = False,
) -> None:
    """Check this machine: Python, packages, the local model's packages, weights and build, and a
    one-token generation in a model worker. Exit status 1 when something must be fixed."""
    import json

    from agent_network.doctor import failed, run_checks

    checks = run_checks(generate=not no_generate)
    if json_output:
        typer.echo(json.dumps({"ok": not failed(checks), "checks": [c.as_dict() for c in checks]}))
    else:
        _print_checks(checks)
        problems = failed(checks)
        if problems:
            console.print(f"[red]{len(problems)} problem(s): run the fix command(s) above.[/]")
        else:
            console.print("[green]Everything needed to run Agent Network is here.[/]")
    raise typer.Exit(1 if failed(checks) else 0)


@app.command()
def runner(
    url: Annotated[str, typer.Option(help="server URL")] = "http://127.0.0.1:8321",
    token: Annotated[
        str,
        typer.Option(
            help="org key (runs every agent of the org) or agent token (runs that agent)",
            envvar="AGENT_NETWORK_TOKEN",
            show_default=False,
        ),
    ] = "",
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
) -> None:
    """Run the participate and triage routines of the agents a credential owns, here.

    Follows their threads over REST (long-poll), claims each trigger with a lease so that
    several runners (and the server's in-process runner) share the work, and posts each reply
    once. Stops cleanly on SIGTERM / SIGINT; a crashed runner's claims are taken back when it
    starts again on the same host, else they expire after the lease.
    """
    import importlib
    import signal

    from agent_network.client import ApiError, AsyncClient
    from agent_network.runtime.identity import RunnerIdInUseError
    from agent_network.runtime.remote import RemoteRunner

    if not token:
        console.print("[red]give the credential with --token or AGENT_NETWORK_TOKEN[/]")
        raise typer.Exit(2)
    for name in plugin or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            console.print(f"[red]cannot import {name!r}: {exc}[/]")
            raise typer.Exit(2) from None
    default_model = model or Settings().model
    if _uses_local_model(default_model):
        _startup_check("the runner")

    async def run() -> int:
        refused: list[BaseException] = []
        in_use: list[BaseException] = []
        try:
            async with AsyncClient(url, token) as client, anyio.create_task_group() as tg:
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
                typer.echo(f"runner {remote.runner_id} running against {url}")
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
