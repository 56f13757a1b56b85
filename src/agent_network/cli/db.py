"""``db``: inspect a database file offline, without a server (list, show, verify threads).

An operator's tool: it reads every org's threads straight from the file, no credential. The
database must exist and hold the schema: a missing file is an error (nothing is created).
``thread`` is the old, hidden name of this group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.text import Text

from agent_network.cli.common import fail, out, print_json, show, typer_app
from agent_network.cli.local import DataDirOption, DbOption, database

db_app = typer_app("Inspect a database file offline (no server): list, show, verify threads.")
thread_alias = typer_app("Old name of 'db' (hidden).", hidden=True)


def _open_existing(data_dir: Path | None, db: str | None) -> Any:
    """An engine on an existing, migrated database; exits 1 with a message (and creates
    nothing) when the file is missing or holds no Agent Network schema."""
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy.engine import make_url

    from agent_network.store.engine import create_engine, database_url

    target = database(data_dir, db)
    url = database_url(target)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or not Path(path).is_file():
            fail(
                f"no database at {path or target}: run 'agent-network serve' first, or point "
                "at one with --data-dir (or AGENT_NETWORK_DATABASE)"
            )
    engine = create_engine(url)

    async def has_schema() -> bool:
        try:
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda sync: sa_inspect(sync).get_table_names())
        finally:
            # each command runs its own event loop: pooled asyncpg connections are bound to
            # this one, so none may be handed to the next
            await engine.dispose()
        return "threads" in names

    try:
        ok = anyio.run(has_schema)
    except Exception as exc:
        anyio.run(engine.dispose)
        fail(f"cannot read the database {target}: {exc}")
    if not ok:
        anyio.run(engine.dispose)
        fail(f"{target} is not an Agent Network database (no threads table)")
    return engine


def db_list(
    data_dir: DataDirOption = None,
    db: DbOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every thread in the database with its state (no API, reads the file)."""
    from sqlalchemy import select

    from agent_network.protocol.fold import fold
    from agent_network.store.tables import orgs, teams, threads
    from agent_network.store.wal import read_envelopes

    engine = _open_existing(data_dir, db)

    async def run() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        try:
            async with engine.connect() as conn:
                q = (
                    select(threads.c.id, threads.c.title, teams.c.name, orgs.c.name)
                    .join(teams, teams.c.id == threads.c.team_id)
                    .join(orgs, orgs.c.id == teams.c.org_id)
                    .order_by(threads.c.created_at)
                )
                for tid, title, team, org in (await conn.execute(q)).all():
                    state = fold(tid, await read_envelopes(conn, tid))
                    rows.append(
                        {
                            "thread": tid,
                            "title": title,
                            "team/network": team,
                            "host org": org,
                            "status": state.status,
                            "last seq": state.last_seq,
                        }
                    )
        finally:
            await engine.dispose()
        return rows

    rows = anyio.run(run)
    columns = ["thread", "title", "team/network", "host org", "status", "last seq"]
    show(rows, columns, json_output=json_output)


def db_show(
    thread_id: str,
    data_dir: DataDirOption = None,
    db: DbOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print a thread's envelopes with sender names and orgs (message text printed as is)."""
    from agent_network.services.rendering import render
    from agent_network.store.wal import read_envelopes

    engine = _open_existing(data_dir, db)

    async def run() -> list[dict[str, Any]]:
        try:
            async with engine.connect() as conn:
                envs = await read_envelopes(conn, thread_id)
                return list(await render(conn, envs))
        finally:
            await engine.dispose()

    items = anyio.run(run)
    if not items:
        fail(f"no thread {thread_id!r} in this database")
    if json_output:
        print_json(items)
        return
    console = out()
    for it in items:
        who = f"{it['sender']['name']} ({it['sender']['org_name']})"
        line = Text.assemble((f"{it['seq']:>4}", "dim"), " ", (who, "bold"), ": ")
        if it["type"] == "message":
            line.append(str(it["content"]))
        else:
            line.append(f"{it['type']} {it['data']}", style="dim")
        console.print(line)


def db_verify(
    thread_id: str,
    data_dir: DataDirOption = None,
    db: DbOption = None,
) -> None:
    """Recompute the thread's hash chain; exit 1 and name the first break if any."""
    from agent_network.hub import Hub

    engine = _open_existing(data_dir, db)

    async def run() -> Any:
        try:
            return await Hub(engine).verify(thread_id)
        finally:
            await engine.dispose()

    report = anyio.run(run)
    console = out()
    if report.checked == 0:
        fail(f"no thread {thread_id!r} in this database")
    if report.ok:
        console.print(f"[green]chain intact[/]: {report.checked} envelopes verified")
        raise typer.Exit(0)
    console.print(
        Text.assemble((f"chain broken at seq {report.first_bad_seq}", "red"), f": {report.reason}")
    )
    raise typer.Exit(1)


for group in (db_app, thread_alias):
    group.command("list")(db_list)
    group.command("show")(db_show)
    group.command("verify")(db_verify)


def register(app: typer.Typer) -> None:
    """Add the ``db`` group (and its hidden old name ``thread``) to ``app``."""
    app.add_typer(db_app, name="db")
    app.add_typer(thread_alias, name="thread")
