"""Team roles: what an ``owner``, an ``admin`` and a ``member`` of a team or network may do.

The matrix (published in ``docs/security.md``, section "Team roles") is enforced by the services
(``TeamService``, ``ThreadService``) on every call, after the scope check (an id outside the
caller's scope answers 404 first) and before any state check (closed, last owner: 409):

| act                                                      | role needed (a user token) |
|----------------------------------------------------------|----------------------------|
| read the team/network, its members and threads; post;    | member                     |
| create threads                                           |                            |
| rename, add or remove members (not owners), change roles | admin                      |
| between member and admin, widen threads, set budgets,    |                            |
| close open threads; networks: invites, visas             |                            |
| grant, change or remove the owner role; delete a team;   | owner                      |
| close a network                                          |                            |

Who acts with which role (:func:`standing`):

- an org key acts with full power within its org's scope (role checks do not apply to it);
- a user token acts with its user's stored role in that team or network, except in a network
  hosted by another org, where people of a member org act as members (their org key manages
  what their org brings);
- an agent token always acts as a member, whatever role its agent is stored with.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import PermissionDeniedError
from agent_network.services.principal import Principal
from agent_network.store.tables import members

ROLES = ("owner", "admin", "member")
_RANK = {"member": 0, "admin": 1, "owner": 2}


@dataclass(frozen=True, slots=True)
class Standing:
    """How a principal acts in one team or network: ``role`` (None: an org key, full power)
    and ``note``, why the role is not the stored one (empty when it is)."""

    role: str | None
    note: str = ""

    def may(self, need: str) -> bool:
        """Whether this standing covers role ``need`` (an org key covers every role)."""
        return self.role is None or _RANK[self.role] >= _RANK[need]


async def standing(conn: AsyncConnection, principal: Principal, team: RowMapping) -> Standing:
    """The role ``principal`` acts with in ``team`` (a team or network row it can see).

    None for an org key; ``member`` for an agent token, and for a user token in a network its
    org does not host; otherwise the user's stored role (``member`` if it has no member row,
    which cannot happen for a team the token can see). No scope check here.
    """
    if not principal.is_member_scoped:
        return Standing(None)
    if principal.kind == "agent":
        return Standing("member", "an agent token acts as a member, whatever its agent's role")
    role = (
        await conn.execute(
            select(members.c.role).where(
                members.c.team_id == team["id"],
                members.c.member_kind == "user",
                members.c.member_id == principal.subject_id,
            )
        )
    ).scalar_one_or_none()
    role = str(role) if role in _RANK else "member"
    if team["kind"] == "network" and team["org_id"] != principal.org_id and role != "member":
        return Standing(
            "member",
            f"stored as {role}, but people of a member org act as members in a network "
            "another org hosts",
        )
    return Standing(role)


def needs(role: str) -> str:
    """``admin`` -> ``admin or owner``: the roles that satisfy ``role``, for messages."""
    return {"member": "member", "admin": "admin or owner", "owner": "owner"}[role]


def require(who: Standing, need: str, doing: str, team: RowMapping) -> None:
    """PermissionDeniedError unless ``who`` covers role ``need``. The message names the act
    (``doing``, e.g. ``"adding members to"``), the team or network, the role needed and the
    caller's: ``"adding members to team team_… needs role admin or owner; you are member"``."""
    if who.may(need):
        return
    note = f" ({who.note})" if who.note else ""
    raise PermissionDeniedError(
        f"{doing} {team['kind']} {team['id']} needs role {needs(need)}; you are {who.role}{note}"
    )


async def require_role(
    conn: AsyncConnection, principal: Principal, team: RowMapping, need: str, doing: str
) -> Standing:
    """:func:`standing` then :func:`require`; returns the standing."""
    who = await standing(conn, principal, team)
    require(who, need, doing, team)
    return who
