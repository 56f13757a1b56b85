"""Teams (inside one org) and networks (across orgs): create, rename, delete, members and their
roles. The network-only calls (invites, joins, visas, leaving, closing) are in
``services/networks.py`` and inherited by :class:`TeamService`. Who may do what:
docs/security.md; where modules live: docs/architecture.md ("Module map and sizes").
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ThreadClosedError,
)
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.networks import JOIN_LIMIT, JOIN_WINDOW, NetworkAdmission
from agent_network.services.paging import Key, keyset, keyset_in_memory
from agent_network.services.principal import Principal
from agent_network.services.ratelimit import rate_limiter
from agent_network.services.roles import ROLES, Standing, require, require_role
from agent_network.services.scope import (
    own_agent,
    own_user,
    require_org,
    team_visible_to,
    visible_team,
)
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, members, orgs, teams, threads, users, visas

TeamKind = Literal["team", "network"]
TEAM_FIELDS = ("id", "org_id", "kind", "name", "description", "status", "created_at", "closed_at")


def _team(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in TEAM_FIELDS}


class TeamService(NetworkAdmission):
    """Teams and networks; ``kind`` selects which one every call is about.

    ``join_limit`` join attempts (valid or not) are allowed per ``JOIN_WINDOW`` seconds per client
    address and per org; set it on the instance to change it at run time. The limiter is
    shared by the server processes on PostgreSQL, in-process on SQLite
    (:mod:`agent_network.services.ratelimit`).
    """

    join_limit: int = JOIN_LIMIT

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.join_limiter = rate_limiter(ctx.engine, "join", self.join_limit, JOIN_WINDOW)

    _team = staticmethod(_team)  # for the network calls (services/networks.py)

    async def create(
        self, principal: Principal, kind: TeamKind, name: str, description: str = ""
    ) -> dict[str, Any]:
        """Create a team or a network hosted by the caller's org."""
        org_id = require_org(principal)
        if not name.strip():
            raise InvalidRequestError(f"{kind} name must not be empty")
        row = {
            "id": new_id("net" if kind == "network" else "team"),
            "org_id": org_id,
            "kind": kind,
            "name": name.strip(),
            "description": description,
            "status": "open",
            "created_at": now_iso(),
            "closed_at": None,
        }
        async with write_transaction(self.ctx.engine) as conn:
            await conn.execute(teams.insert().values(**row))
            await record(conn, principal, f"{kind}.create", kind, row["id"])
        return row

    async def list_teams(
        self,
        principal: Principal,
        kind: TeamKind,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Teams (or networks) visible to the caller, oldest first (a keyset page by
        ``(created_at, id)`` with ``after``/``limit``)."""
        async with self.ctx.engine.connect() as conn:
            q = keyset(
                select(teams).where(teams.c.kind == kind, team_visible_to(principal)),
                (teams.c.created_at, teams.c.id),
                after,
                limit,
            )
            return [_team(r) for r in (await conn.execute(q)).mappings()]

    async def get(self, principal: Principal, kind: TeamKind, team_id: str) -> dict[str, Any]:
        """One visible team or network; NotFoundError otherwise."""
        async with self.ctx.engine.connect() as conn:
            return _team(await visible_team(conn, principal, team_id, kind=kind))

    async def _owned(
        self,
        conn: AsyncConnection,
        principal: Principal,
        kind: TeamKind,
        team_id: str,
        *,
        need: str,
        doing: str,
    ) -> RowMapping:
        """The team/network ``team_id`` if the caller sees it (NotFoundError otherwise), its org
        hosts it and the caller acts in it with role ``need`` (PermissionDeniedError naming the
        act ``doing``, e.g. ``"closing"``, otherwise; see :mod:`~agent_network.services.roles`)."""
        row = await visible_team(conn, principal, team_id, kind=kind)
        if row["org_id"] != principal.org_id:
            raise PermissionDeniedError(f"{doing} {kind} {team_id} is for the org that hosts it")
        await require_role(conn, principal, row, need, doing)
        return row

    async def update(
        self, principal: Principal, kind: TeamKind, team_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Rename or re-describe a team/network (host org only; a user token needs role admin).
        NotFoundError outside scope, PermissionDeniedError, InvalidRequestError (empty name)."""
        values = {k: v for k, v in changes.items() if k in ("name", "description")}
        if "name" in values and not str(values["name"]).strip():
            raise InvalidRequestError(f"{kind} name must not be empty")
        async with write_transaction(self.ctx.engine) as conn:
            await self._owned(
                conn, principal, kind, team_id, need="admin", doing="renaming or re-describing"
            )
            if values:
                await conn.execute(update(teams).where(teams.c.id == team_id).values(**values))
            await record(conn, principal, f"{kind}.update", kind, team_id)
            return _team(await visible_team(conn, principal, team_id, kind=kind))

    async def delete(self, principal: Principal, team_id: str) -> None:
        """Delete an org-internal team and hide its threads (their WAL is kept). A user token
        needs role owner. NotFoundError outside scope, PermissionDeniedError."""
        async with write_transaction(self.ctx.engine) as conn:
            await self._owned(conn, principal, "team", team_id, need="owner", doing="deleting")
            ts = now_iso()
            await conn.execute(update(teams).where(teams.c.id == team_id).values(deleted_at=ts))
            await conn.execute(
                update(threads).where(threads.c.team_id == team_id).values(deleted_at=ts)
            )
            await conn.execute(members.delete().where(members.c.team_id == team_id))
            await record(conn, principal, "team.delete", "team", team_id)
        await self.ctx.access_removed()  # before answering: see ServiceContext

    # ---------------------------------------------------------------- members

    async def add_member(
        self,
        principal: Principal,
        kind: TeamKind,
        team_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        role: str = "member",
    ) -> dict[str, Any]:
        """Add one of the caller's own agents or users to a team or network with ``role``.
        Returns the member (kind, id, name, role, org_id); adding an existing member changes
        nothing and returns it with its stored role (change roles with :meth:`set_role`).

        In a network the caller's org must be the host or hold a live visa. Exactly one of
        ``agent_id``/``user_id``. A user token needs role admin, and owner to add an owner;
        in a network it does not host, an org gives only the role ``member``. Raises
        NotFoundError (team or member outside scope), PermissionDeniedError (role),
        InvalidRequestError, ThreadClosedError when the network is closed.
        """
        if (agent_id is None) == (user_id is None):
            raise InvalidRequestError("give exactly one of agent_id or user_id")
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {', '.join(ROLES)}")
        async with write_transaction(self.ctx.engine) as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
            who = await require_role(conn, principal, team, "admin", "adding members to")
            self._check_grant(principal, team, who, role, "adding an owner to")
            if team["status"] == "closed":
                raise ThreadClosedError(f"the {kind} is closed")
            visa_id = None
            if team["org_id"] != principal.org_id:
                visa_id = await self._live_visa_id(conn, team_id, require_org(principal))
            added = await self._add_member(
                conn,
                principal,
                team,
                agent_id=agent_id,
                user_id=user_id,
                role=role,
                visa_id=visa_id,
            )
        self.ctx.config_epoch += 1  # a new member: cached outbound_to checks must be redone
        return added

    @staticmethod
    def _check_grant(
        principal: Principal, team: RowMapping, who: Standing, role: str, doing: str
    ) -> None:
        """Whether the caller may give ``role`` in ``team``: an owner only by an owner (a user
        token; an org key may); admin and owner in a network only by its host org."""
        if role != "member" and team["org_id"] != principal.org_id:
            raise PermissionDeniedError(
                f"giving role {role} in network {team['id']} is for the org that hosts it; "
                "the agents and users a member org brings are members"
            )
        if role == "owner":
            require(who, "owner", doing, team)

    async def _live_visa_id(self, conn: AsyncConnection, network_id: str, org_id: str) -> str:
        row = (
            await conn.execute(
                select(visas.c.id).where(
                    visas.c.network_id == network_id,
                    visas.c.org_id == org_id,
                    visas.c.revoked_at.is_(None),
                )
            )
        ).first()
        if row is None:
            raise NotFoundError("network", network_id)
        return str(row[0])

    async def _add_member(
        self,
        conn: AsyncConnection,
        principal: Principal,
        team: RowMapping,
        *,
        agent_id: str | None,
        user_id: str | None,
        role: str,
        visa_id: str | None,
    ) -> dict[str, Any]:
        if agent_id is not None:
            who = await own_agent(conn, principal, agent_id)
            member_kind = "agent"
        else:
            assert user_id is not None
            who = await own_user(conn, principal, user_id)
            member_kind = "user"
        existing = (
            await conn.execute(
                select(members).where(
                    members.c.team_id == team["id"],
                    members.c.member_kind == member_kind,
                    members.c.member_id == who["id"],
                )
            )
        ).first()
        if existing is None:
            await conn.execute(
                members.insert().values(
                    team_id=team["id"],
                    member_kind=member_kind,
                    member_id=who["id"],
                    org_id=who["org_id"],
                    role=role,
                    visa_id=visa_id,
                    created_at=now_iso(),
                )
            )
            await record(
                conn,
                principal,
                f"{team['kind']}.member_add",
                team["kind"],
                team["id"],
                data={"member_kind": member_kind, "member_id": who["id"]},
            )
        else:
            role = str(existing.role)  # adding again changes nothing, its role included
        return {
            "kind": member_kind,
            "id": who["id"],
            "name": who["name"],
            "role": role,
            "org_id": who["org_id"],
        }

    async def list_members(
        self,
        principal: Principal,
        kind: TeamKind,
        team_id: str,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Members of a visible team/network: kind, id, name, role, org id and org name; agents
        first, each kind by id (a keyset page by ``(kind, id)`` with ``after``/``limit``)."""
        async with self.ctx.engine.connect() as conn:
            await visible_team(conn, principal, team_id, kind=kind)
            found = await member_list(conn, team_id)
        return keyset_in_memory(found, lambda m: (m["kind"], m["id"]), after, limit)

    async def remove_member(
        self, principal: Principal, kind: TeamKind, team_id: str, member_kind: str, member_id: str
    ) -> None:
        """Remove one of the caller's own agents/users from a team or network.

        A user token needs role admin, and owner to remove an owner. The last owner cannot be
        removed: ConflictError (409) — make another member owner first (or delete the team).
        Raises NotFoundError (team, or a member of the caller's org, outside scope),
        PermissionDeniedError (role).
        """
        async with write_transaction(self.ctx.engine) as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
            who = await require_role(conn, principal, team, "admin", "removing members from")
            target = await _own_member(conn, principal, team, member_kind, member_id)
            if target["role"] == "owner":
                require(who, "owner", "removing an owner from", team)
            result = await conn.execute(
                members.delete().where(
                    members.c.team_id == team_id,
                    members.c.member_kind == member_kind,
                    members.c.member_id == member_id,
                    members.c.org_id == require_org(principal),
                    _keeps_an_owner(team_id, member_kind, member_id),
                )
            )
            if result.rowcount == 0:
                raise _last_owner(team, member_kind, member_id)
            await record(
                conn,
                principal,
                f"{kind}.member_remove",
                kind,
                team_id,
                data={"member_kind": member_kind, "member_id": member_id},
            )
        await self.ctx.access_removed()  # before answering: see ServiceContext

    async def set_role(
        self,
        principal: Principal,
        kind: TeamKind,
        team_id: str,
        member_kind: str,
        member_id: str,
        role: str,
    ) -> dict[str, Any]:
        """Change the role (``owner`` | ``admin`` | ``member``) of one of the caller org's
        agents or users in a team or network; returns the member as :meth:`add_member` does.

        A user token needs role admin, and owner to give the role owner or to change an
        owner's role; in a network it does not host, an org gives only the role ``member``.
        The last owner keeps its role: ConflictError (409) — make another member owner first.
        Raises NotFoundError (team, or a member of the caller's org, outside scope),
        PermissionDeniedError (role), InvalidRequestError (unknown role).
        """
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {', '.join(ROLES)}")
        async with write_transaction(self.ctx.engine) as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
            who = await require_role(conn, principal, team, "admin", "changing roles in")
            target = await _own_member(conn, principal, team, member_kind, member_id)
            previous = str(target["role"])
            if previous == "owner":
                require(who, "owner", "changing an owner's role in", team)
            self._check_grant(principal, team, who, role, "giving role owner in")
            if role != previous:
                result = await conn.execute(
                    update(members)
                    .where(
                        members.c.team_id == team_id,
                        members.c.member_kind == member_kind,
                        members.c.member_id == member_id,
                        _keeps_an_owner(team_id, member_kind, member_id),
                    )
                    .values(role=role)
                )
                if result.rowcount == 0:
                    raise _last_owner(team, member_kind, member_id)
                await record(
                    conn,
                    principal,
                    f"{kind}.member_role",
                    kind,
                    team_id,
                    data={
                        "member_kind": member_kind,
                        "member_id": member_id,
                        "role": role,
                        "previous": previous,
                    },
                )
        return {
            "kind": member_kind,
            "id": member_id,
            "name": target["name"],
            "role": role,
            "org_id": target["org_id"],
        }


async def _own_member(
    conn: AsyncConnection, principal: Principal, team: RowMapping, member_kind: str, member_id: str
) -> RowMapping:
    """The member row (with ``name``) of the caller org's ``member_kind`` ``member_id`` in
    ``team``; NotFoundError otherwise (another org's member looks missing too). On PostgreSQL
    the team's row is locked first, so that two changes of its owners are ordered (SQLite
    orders every write transaction already)."""
    await conn.execute(select(teams.c.id).where(teams.c.id == team["id"]).with_for_update())
    who = agents if member_kind == "agent" else users
    row = (
        (
            await conn.execute(
                select(members.c.role, members.c.org_id, who.c.name)
                .join(who, who.c.id == members.c.member_id)
                .where(
                    members.c.team_id == team["id"],
                    members.c.member_kind == member_kind,
                    members.c.member_id == member_id,
                    members.c.org_id == require_org(principal),
                )
            )
        )
        .mappings()
        .first()
    )
    if member_kind not in ("agent", "user") or row is None:
        raise NotFoundError("member", member_id)
    return row


def _keeps_an_owner(team_id: str, member_kind: str, member_id: str) -> Any:
    """SQL condition over ``members``: the row is not an owner, or ``team_id`` has another
    owner — so a statement with it never takes away the last owner, whatever ran since the
    caller read the row."""
    other = members.alias("other_owner")
    return or_(
        members.c.role != "owner",
        exists().where(
            and_(
                other.c.team_id == team_id,
                other.c.role == "owner",
                or_(other.c.member_kind != member_kind, other.c.member_id != member_id),
            )
        ),
    )


def _last_owner(team: RowMapping, member_kind: str, member_id: str) -> ConflictError:
    return ConflictError(
        f"{member_kind} {member_id} is the last owner of {team['kind']} {team['id']}; make "
        "another member owner first"
    )


async def member_list(conn: AsyncConnection, team_id: str) -> list[dict[str, Any]]:
    """Members of ``team_id`` with display names and org names (no scope check)."""
    out: list[dict[str, Any]] = []
    for kind, table in (("agent", agents), ("user", users)):
        q = (
            select(
                members.c.member_id,
                members.c.role,
                members.c.org_id,
                table.c.name,
                orgs.c.name.label("org_name"),
            )
            .join(table, table.c.id == members.c.member_id)
            .join(orgs, orgs.c.id == members.c.org_id)
            .where(members.c.team_id == team_id, members.c.member_kind == kind)
            .order_by(members.c.created_at)
        )
        for r in (await conn.execute(q)).mappings():
            out.append(
                {
                    "kind": kind,
                    "id": r["member_id"],
                    "name": r["name"],
                    "role": r["role"],
                    "org_id": r["org_id"],
                    "org_name": r["org_name"],
                }
            )
    return out
