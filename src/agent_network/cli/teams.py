"""``teams`` and ``networks``: org-internal teams and cross-org networks, over the API."""

from __future__ import annotations

from typing import Annotated, Literal

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

teams_app = typer_app("Teams of the caller's org, their members and roles.")
networks_app = typer_app(
    "Networks across orgs: create, members, invite, invites, join, visas, revoke, leave, close."
)

TEAM_COLUMNS = ["id", "kind", "name", "org_id", "status", "created_at"]
MEMBER_COLUMNS = ["kind", "id", "name", "role", "org_id", "org_name"]
VISA_COLUMNS = ["id", "org_id", "org_name", "created_at", "revoked_at", "end_reason"]
Role = Literal["owner", "admin", "member"]
Kind = Literal["agent", "user"]

TeamId = Annotated[str, typer.Argument(help="the team's id (team_...)")]
NetworkId = Annotated[str, typer.Argument(help="the network's id")]
RoleOption = Annotated[Role, typer.Option(help="owner, admin or member")]


def _member_target(agent: str | None, user: str | None) -> dict[str, str]:
    if (agent is None) == (user is None):
        fail("give exactly one of --agent or --user", 2)
    return {"agent_id": agent} if agent is not None else {"user_id": user or ""}


def _create(
    group: str, name: str, description: str, url: str | None, token: str | None, json_output: bool
) -> None:
    with api(url, token) as client:
        created = getattr(client, group).create(name, description=description)
    show(created, TEAM_COLUMNS, json_output=json_output)


def _members(
    group: str, team_id: str, url: str | None, token: str | None, json_output: bool
) -> None:
    with api(url, token) as client:
        show(getattr(client, group).members(team_id), MEMBER_COLUMNS, json_output=json_output)


def _add_member(
    group: str,
    team_id: str,
    agent: str | None,
    user: str | None,
    role: Role,
    url: str | None,
    token: str | None,
    json_output: bool,
) -> None:
    target = _member_target(agent, user)
    with api(url, token) as client:
        member = getattr(client, group).add_member(team_id, role=role, **target)
    show(member, MEMBER_COLUMNS, json_output=json_output)


@teams_app.command("list")
@handles_errors
def teams_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The teams the caller can see."""
    with api(url, token) as client:
        show(client.teams.list(), TEAM_COLUMNS, json_output=json_output)


@teams_app.command("create")
@handles_errors
def teams_create(
    name: Annotated[str, typer.Argument(help="the team's name")],
    description: Annotated[str, typer.Option(help="what the team is for")] = "",
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a team in the caller's org."""
    _create("teams", name, description, url, token, json_output)


@teams_app.command("members")
@handles_errors
def teams_members(
    team_id: TeamId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """A team's members with their roles."""
    _members("teams", team_id, url, token, json_output)


@teams_app.command("add-member")
@handles_errors
def teams_add_member(
    team_id: TeamId,
    agent: Annotated[str | None, typer.Option("--agent", help="agent id to add")] = None,
    user: Annotated[str | None, typer.Option("--user", help="user id to add")] = None,
    role: RoleOption = "member",
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Add one of the org's agents (--agent) or users (--user) to a team."""
    _add_member("teams", team_id, agent, user, role, url, token, json_output)


@teams_app.command("role")
@handles_errors
def teams_role(
    team_id: TeamId,
    kind: Annotated[Kind, typer.Argument(help="agent or user")],
    member_id: Annotated[str, typer.Argument(help="the member's id")],
    role: Annotated[Role, typer.Argument(help="owner, admin or member")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change a member's role (PATCH members/{kind}/{id})."""
    with api(url, token) as client:
        member = client.teams.set_role(team_id, kind, member_id, role)
    show(member, MEMBER_COLUMNS, json_output=json_output)


def _remove_member(
    group: str,
    team_id: str,
    kind: str,
    member_id: str,
    url: str | None,
    token: str | None,
    json_output: bool,
) -> None:
    with api(url, token) as client:
        getattr(client, group).remove_member(team_id, kind, member_id)
    report_done(
        {"removed": member_id, "kind": kind, "team_id": team_id},
        f"removed {kind} {member_id}",
        json_output=json_output,
    )


MemberKind = Annotated[Kind, typer.Argument(help="agent or user")]
MemberId = Annotated[str, typer.Argument(help="the member's id")]


@teams_app.command("remove-member")
@handles_errors
def teams_remove_member(
    team_id: TeamId,
    kind: MemberKind,
    member_id: MemberId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a member from a team (the last owner cannot be removed)."""
    _remove_member("teams", team_id, kind, member_id, url, token, json_output)


@networks_app.command("list")
@handles_errors
def networks_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The networks the caller's org hosts or belongs to."""
    with api(url, token) as client:
        show(client.networks.list(), TEAM_COLUMNS, json_output=json_output)


@networks_app.command("create")
@handles_errors
def networks_create(
    name: Annotated[str, typer.Argument(help="the network's name")],
    description: Annotated[str, typer.Option(help="what the network is for")] = "",
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a network hosted by the caller's org."""
    _create("networks", name, description, url, token, json_output)


@networks_app.command("members")
@handles_errors
def networks_members(
    network_id: NetworkId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """A network's members, of every member org."""
    _members("networks", network_id, url, token, json_output)


@networks_app.command("add-member")
@handles_errors
def networks_add_member(
    network_id: NetworkId,
    agent: Annotated[str | None, typer.Option("--agent", help="agent id to add")] = None,
    user: Annotated[str | None, typer.Option("--user", help="user id to add")] = None,
    role: RoleOption = "member",
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Add one of the caller org's agents or users to a network it is in."""
    _add_member("networks", network_id, agent, user, role, url, token, json_output)


@networks_app.command("invite")
@handles_errors
def networks_invite(
    network_id: NetworkId,
    expires_in: Annotated[float, typer.Option(help="seconds the code stays valid")] = 7 * 24 * 3600,
    max_uses: Annotated[int | None, typer.Option(help="joins allowed [default: unlimited]")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Make a join code for another org (host only); the code is printed once."""
    with api(url, token) as client:
        invite = client.networks.invites.create(
            network_id, expires_in=expires_in, max_uses=max_uses
        )
    if json_output:
        show_record(invite, json_output=True)
        return
    out().print(Text(f"invite {invite.id}, expires {invite.expires_at.isoformat()}"))
    out().print(Text(f"join code (shown once): {invite.join_code}"))


@networks_app.command("join")
@handles_errors
def networks_join(
    code: Annotated[str, typer.Argument(help="the join code")],
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="agent id to attach; repeatable")
    ] = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", help="user id to attach; repeatable")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Join a network with a code, attaching only the agents and users named."""
    with api(url, token) as client:
        joined = client.networks.join(code, agent_ids=agent or (), user_ids=user or ())
    if json_output:
        show_record(joined, json_output=True)
        return
    out().print(
        Text(f"joined network {joined.network.id} ({joined.network.name}), visa {joined.visa_id}")
    )
    out().print(_members_table(joined.members))


def _members_table(members: list[object]) -> object:
    from agent_network.cli.common import table

    return table(members, MEMBER_COLUMNS)


@networks_app.command("visas")
@handles_errors
def networks_visas(
    network_id: NetworkId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """The orgs admitted into a network (a member org sees its own visa only)."""
    with api(url, token) as client:
        show(client.networks.visas.list(network_id), VISA_COLUMNS, json_output=json_output)


@networks_app.command("revoke")
@handles_errors
def networks_revoke(
    network_id: NetworkId,
    visa_id: Annotated[str, typer.Argument(help="the visa's id")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Revoke an org's visa (host only): its agents and users leave the network at once."""
    with api(url, token) as client:
        client.networks.visas.revoke(network_id, visa_id)
    report_done(
        {"revoked": visa_id, "network_id": network_id},
        f"revoked visa {visa_id}",
        json_output=json_output,
    )


@networks_app.command("remove-member")
@handles_errors
def networks_remove_member(
    network_id: NetworkId,
    kind: MemberKind,
    member_id: MemberId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove one of the caller org's agents or users from a network."""
    _remove_member("networks", network_id, kind, member_id, url, token, json_output)


INVITE_COLUMNS = ["id", "network_id", "uses", "max_uses", "expires_at", "revoked"]


@networks_app.command("invites")
@handles_errors
def networks_invites(
    network_id: NetworkId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """A network's invites (host only): uses, expiry, revoked; never the code."""
    with api(url, token) as client:
        show(client.networks.invites.list(network_id), INVITE_COLUMNS, json_output=json_output)


@networks_app.command("revoke-invite")
@handles_errors
def networks_revoke_invite(
    network_id: NetworkId,
    invite_id: Annotated[str, typer.Argument(help="the invite's id")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Revoke an invite (host only): its code admits nobody any more."""
    with api(url, token) as client:
        client.networks.invites.revoke(network_id, invite_id)
    report_done(
        {"revoked": invite_id, "network_id": network_id},
        f"revoked invite {invite_id}",
        json_output=json_output,
    )


@networks_app.command("leave")
@handles_errors
def networks_leave(
    network_id: NetworkId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """The caller's org leaves a network it joined: its visa ends, its members leave."""
    with api(url, token) as client:
        show(client.networks.leave(network_id), VISA_COLUMNS, json_output=json_output)


@networks_app.command("close")
@handles_errors
def networks_close(
    network_id: NetworkId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Close a network (host only): its threads become read-only."""
    with api(url, token) as client:
        show(client.networks.close(network_id), TEAM_COLUMNS, json_output=json_output)


def register(app: typer.Typer) -> None:
    """Add the ``teams`` and ``networks`` groups to ``app``."""
    app.add_typer(teams_app, name="teams")
    app.add_typer(networks_app, name="networks")
