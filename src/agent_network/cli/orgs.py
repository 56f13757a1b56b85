"""``orgs`` (platform admin), ``credentials`` and ``audit``: over the API, through the SDK."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer
from rich.text import Text

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    handles_errors,
    out,
    plain,
    show,
    show_record,
    typer_app,
)

orgs_app = typer_app("Orgs of the platform (admin key), and the caller's own org.")
credentials_app = typer_app("Org keys, user tokens and agent tokens of the caller's org.")
audit_app = typer_app("The caller org's audit log (org key).")

ORG_COLUMNS = ["id", "name", "created_at"]
CREDENTIAL_COLUMNS = [
    "id",
    "kind",
    "subject_id",
    "name",
    "scopes",
    "created_at",
    "expires_at",
    "revoked_at",
]
AUDIT_COLUMNS = [
    "id",
    "created_at",
    "action",
    "outcome",
    "principal_kind",
    "principal_id",
    "resource_kind",
    "resource_id",
    "reason",
]


@orgs_app.command("list")
@handles_errors
def orgs_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """Every org, oldest first (admin key)."""
    with api(url, token) as client:
        show(client.orgs.list(), ORG_COLUMNS, json_output=json_output)


@orgs_app.command("me")
@handles_errors
def orgs_me(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The org the credential belongs to."""
    with api(url, token) as client:
        show_record(client.orgs.me(), json_output=json_output)


@orgs_app.command("create")
@handles_errors
def orgs_create(
    name: Annotated[str, typer.Argument(help="the org's name")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create an org (admin key); prints its id and its first org key (shown once)."""
    with api(url, token) as client:
        created = client.orgs.create(name)
    if json_output:
        show_record(created, json_output=True)
        return
    out().print(Text(f"org {created.org.id} ({created.org.name})"))
    out().print(Text(f"org key (shown once, keep it): {created.secret}"))


@orgs_app.command("issue-key")
@handles_errors
def orgs_issue_key(
    org_id: Annotated[str, typer.Argument(help="the org's id (org_...)")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "issued by the platform admin",
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Issue a new org key for an org (admin key): the way back in for an org that lost its key."""
    with api(url, token) as client:
        issued = client.orgs.issue_key(org_id, name=name)
    if json_output:
        show_record(issued, json_output=True)
        return
    out().print(Text(f"credential {issued.credential.id} for org {org_id}"))
    out().print(Text(f"org key (shown once, keep it): {issued.secret}"))


@credentials_app.command("list")
@handles_errors
def credentials_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The org's credentials, without secrets."""
    with api(url, token) as client:
        show(client.credentials.list(), CREDENTIAL_COLUMNS, json_output=json_output)


@credentials_app.command("issue")
@handles_errors
def credentials_issue(
    kind: Annotated[
        Literal["org_key", "user_token", "agent_token"],
        typer.Argument(help="org_key, user_token or agent_token"),
    ],
    subject: Annotated[
        str | None, typer.Option("--subject", help="the user or agent a token acts as (id)")
    ] = None,
    name: Annotated[str, typer.Option(help="a label")] = "",
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="read or write; repeatable [default: both]")
    ] = None,
    expires_in: Annotated[
        float | None, typer.Option(help="seconds until it stops authenticating [default: never]")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Issue a credential; its secret is printed once."""
    with api(url, token) as client:
        issued = client.credentials.issue(
            kind,
            subject_id=subject,
            name=name,
            scopes=tuple(scope or ("read", "write")),
            expires_in=expires_in,
        )
    if json_output:
        show_record(issued, json_output=True)
        return
    out().print(Text(f"credential {issued.credential.id} ({kind})"))
    out().print(Text(f"secret (shown once, keep it): {issued.secret}"))


@credentials_app.command("revoke")
@handles_errors
def credentials_revoke(
    credential_id: Annotated[str, typer.Argument(help="the credential's id (cred_...)")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Revoke a credential at once."""
    with api(url, token) as client:
        show(client.credentials.revoke(credential_id), CREDENTIAL_COLUMNS, json_output=json_output)


@credentials_app.command("rotate")
@handles_errors
def credentials_rotate(
    credential_id: Annotated[str, typer.Argument(help="the credential's id (cred_...)")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Replace a credential by a new secret (same kind, subject, name, scopes and lifetime) and
    revoke the old one, atomically; the new secret is printed once."""
    with api(url, token) as client:
        issued = client.credentials.rotate(credential_id)
    if json_output:
        show_record(issued, json_output=True)
        return
    out().print(Text(f"credential {issued.credential.id} replaces {credential_id} (revoked)"))
    out().print(Text(f"secret (shown once, keep it): {issued.secret}"))


@credentials_app.command("renew")
@handles_errors
def credentials_renew(
    credential_id: Annotated[str, typer.Argument(help="the credential's id (cred_...)")],
    expires_in: Annotated[
        float,
        typer.Option(min=1, help="seconds from now until it stops authenticating"),
    ],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Move a live credential's expiry to --expires-in seconds from now."""
    with api(url, token) as client:
        renewed = client.credentials.renew(credential_id, expires_in)
    show(renewed, CREDENTIAL_COLUMNS, json_output=json_output)


SinceOption = Annotated[str | None, typer.Option(help="ISO-8601 time, inclusive lower bound")]
UntilOption = Annotated[str | None, typer.Option(help="ISO-8601 time, upper bound")]
ActionOption = Annotated[str | None, typer.Option(help="action, exact or a prefix ending in *")]
PrincipalOption = Annotated[str | None, typer.Option("--principal", help="principal id")]
ResourceOption = Annotated[str | None, typer.Option("--resource", help="resource id")]
OutcomeOption = Annotated[
    Literal["accepted", "refused"] | None, typer.Option(help="accepted or refused")
]
AfterOption = Annotated[int, typer.Option(help="only records with a larger id (paging)")]


@audit_app.command("list")
@handles_errors
def audit_list(
    since: SinceOption = None,
    until: UntilOption = None,
    action: ActionOption = None,
    principal: PrincipalOption = None,
    resource: ResourceOption = None,
    outcome: OutcomeOption = None,
    after_id: AfterOption = 0,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="at most this many records (left out: every matching one)"),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Audit records oldest first, filtered, every page fetched; resume with --after-id (the
    last id shown)."""
    with api(url, token) as client:
        records = client.audit.list(
            since=since,
            until=until,
            action=action,
            principal_id=principal,
            resource_id=resource,
            outcome=outcome,
            after_id=after_id,
            limit=limit,
        )
    show(records, AUDIT_COLUMNS, json_output=json_output)


@audit_app.command("export")
@handles_errors
def audit_export(
    since: SinceOption = None,
    until: UntilOption = None,
    action: ActionOption = None,
    principal: PrincipalOption = None,
    resource: ResourceOption = None,
    outcome: OutcomeOption = None,
    after_id: AfterOption = 0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Every matching record as JSON lines (one object a line), streamed as it comes."""
    with api(url, token) as client:
        for record in client.audit.export(
            since=since,
            until=until,
            action=action,
            principal_id=principal,
            resource_id=resource,
            outcome=outcome,
            after_id=after_id,
        ):
            typer.echo(json.dumps(plain(record), ensure_ascii=False))


def register(app: typer.Typer) -> None:
    """Add the ``orgs``, ``credentials`` and ``audit`` groups to ``app``."""
    app.add_typer(orgs_app, name="orgs")
    app.add_typer(credentials_app, name="credentials")
    app.add_typer(audit_app, name="audit")
