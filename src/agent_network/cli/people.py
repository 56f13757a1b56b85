"""``users`` (the caller org's people and their sign-in tokens) and ``secrets`` (an agent's
write-only secrets), over the API through the SDK.

A secret's value is read from ``--value`` or, when that is left out, from standard input (a
pipe, or typed without echo on a terminal); it is never printed, not even with ``--json``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.text import Text

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    fail,
    handles_errors,
    out,
    report_done,
    show,
    show_record,
    typer_app,
)

users_app = typer_app("People (users) of the caller's org, and their sign-in tokens.")
secrets_app = typer_app("Secrets of an agent: write-only values (names listed, never values).")

USER_COLUMNS = ["id", "name", "email", "auto_ack", "created_at"]
SECRET_COLUMNS = ["name", "agent_id", "created_at", "updated_at"]
MAX_SECRET_BYTES = 16_384

UserId = Annotated[str, typer.Argument(help="the user's id (usr_...)")]
AgentId = Annotated[str, typer.Argument(help="the agent's id (agt_...)")]
SecretName = Annotated[str, typer.Argument(help="the secret's name, e.g. GITHUB_TOKEN")]


def _deleted(kind: str, ident: str, json_output: bool) -> None:
    report_done({"deleted": ident}, f"deleted {kind} {ident}", json_output=json_output)


# ---------------------------------------------------------------------------------------------
# users


@users_app.command("list")
@handles_errors
def users_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The caller org's people."""
    with api(url, token) as client:
        show(client.users.list(), USER_COLUMNS, json_output=json_output)


@users_app.command("show")
@handles_errors
def users_show(
    user_id: UserId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """One person, every field."""
    with api(url, token) as client:
        show_record(client.users.get(user_id), json_output=json_output)


@users_app.command("create")
@handles_errors
def users_create(
    name: Annotated[str, typer.Argument(help="the person's name")],
    email: Annotated[str | None, typer.Option(help="e-mail address (optional)")] = None,
    auto_ack: Annotated[
        bool,
        typer.Option(
            "--auto-ack/--no-auto-ack",
            help="acknowledge invitations to protocol threads automatically",
        ),
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Add a person to the caller's org (org key)."""
    with api(url, token) as client:
        user = client.users.create(name, email=email, auto_ack=auto_ack)
    show(user, USER_COLUMNS, json_output=json_output)


@users_app.command("delete")
@handles_errors
def users_delete(
    user_id: UserId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a person; their past messages stay in the threads' history."""
    with api(url, token) as client:
        client.users.delete(user_id)
    _deleted("user", user_id, json_output)


@users_app.command("token")
@handles_errors
def users_token(
    user_id: UserId,
    name: Annotated[str, typer.Option(help="a label for the token")] = "",
    read_only: Annotated[bool, typer.Option("--read-only", help="the token may only read")] = False,
    expires_in: Annotated[
        float | None,
        typer.Option(min=1, help="seconds until it stops authenticating [default: never]"),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Issue a sign-in token for a person (org key): for the web app, the SDK or this CLI. The
    secret is printed once."""
    scopes = ("read",) if read_only else ("read", "write")
    with api(url, token) as client:
        issued = client.credentials.issue(
            "user_token", subject_id=user_id, name=name, scopes=scopes, expires_in=expires_in
        )
    if json_output:
        show_record(issued, json_output=True)
        return
    out().print(Text(f"credential {issued.credential.id} (user_token for {user_id})"))
    out().print(Text(f"token (shown once, keep it): {issued.secret}"))


# ---------------------------------------------------------------------------------------------
# secrets


def _secret_value(value: str | None) -> str:
    """The value given with ``--value``, else read from stdin (no echo on a terminal); exits 2
    when it is empty or too long."""
    if value is None:
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass("secret value (not shown): ")
        else:
            value = sys.stdin.read()
            value = value[:-1] if value.endswith("\n") else value
    if not value:
        fail("the secret value is empty: give --value or pipe it on stdin", 2)
    if len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        fail(f"the secret value is longer than {MAX_SECRET_BYTES} bytes", 2)
    return value


@secrets_app.command("set")
@handles_errors
def secrets_set(
    agent_id: AgentId,
    name: SecretName,
    value: Annotated[
        str | None,
        typer.Option(
            "--value",
            help="the value [default: read from stdin; prompted without echo on a terminal]",
            show_default=False,
        ),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create or replace an agent's secret (org key). The value is never printed back."""
    secret = _secret_value(value)
    with api(url, token) as client:
        stored = client.agents.secrets.put(agent_id, name, secret)
    show(stored, SECRET_COLUMNS, json_output=json_output)


@secrets_app.command("list")
@handles_errors
def secrets_list(
    agent_id: AgentId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """The names of an agent's secrets (never their values)."""
    with api(url, token) as client:
        show(client.agents.secrets.list(agent_id), SECRET_COLUMNS, json_output=json_output)


@secrets_app.command("delete")
@handles_errors
def secrets_delete(
    agent_id: AgentId,
    name: SecretName,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete an agent's secret."""
    with api(url, token) as client:
        client.agents.secrets.delete(agent_id, name)
    _deleted("secret", name, json_output)


def register(app: typer.Typer) -> None:
    """Add the ``users`` and ``secrets`` groups to ``app``."""
    app.add_typer(users_app, name="users")
    app.add_typer(secrets_app, name="secrets")
