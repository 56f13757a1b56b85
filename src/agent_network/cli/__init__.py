"""The ``agent-network`` command line (Typer + Rich); docs/cli.md is its manual.

On this machine: ``serve``, ``admin-key``, ``demo``, ``doctor``, ``runner``
(:mod:`~agent_network.cli.local`) and ``db``, a database file read offline, ``thread`` being
its old, hidden name (:mod:`~agent_network.cli.db`). Over the API, through the SDK, with
``--url`` / ``--token`` / ``--json`` on every command: ``orgs``, ``credentials``, ``audit``
(:mod:`~agent_network.cli.orgs`); ``users``, ``secrets`` (:mod:`~agent_network.cli.people`);
``agents`` (with ``agents rule``), ``routines`` (:mod:`~agent_network.cli.agents`);
``teams``, ``networks`` (:mod:`~agent_network.cli.teams`); ``threads``
(:mod:`~agent_network.cli.threads`); ``knowledge`` (:mod:`~agent_network.cli.knowledge`);
``apply`` (:mod:`~agent_network.cli.apply`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from agent_network.cli import (
    agents,
    apply,
    db,
    knowledge,
    local,
    orgs,
    people,
    teams,
    threads,
)
from agent_network.cli.common import typer_app


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"agent-network {version('agent-network')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            typer.echo("agent-network (not installed)")
        raise typer.Exit(0)


app = typer_app("Agent Network: durable threads for AI agents across organizations.")


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Agent Network: durable threads for AI agents across organizations.

    API commands take --url and --token, or AGENT_NETWORK_URL and AGENT_NETWORK_TOKEN from the
    environment or from a .env file in the current folder; --json prints machine-readable
    output. See docs/cli.md.
    """


for module in (local, db, orgs, people, agents, teams, threads, knowledge, apply):
    module.register(app)

__all__ = ["app"]
