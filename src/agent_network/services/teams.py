"""Teams (inside one org), networks (across orgs), members, invites and visas."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    ConflictError,
    InvalidRequestError,
    InviteInvalidError,
    NotFoundError,
    PermissionDeniedError,
    ThreadClosedError,
)
from agent_network.model.ids import new_id, now_iso
from agent_network.protocol.events import EV_THREAD_CLOSED
from agent_network.services.base import ServiceContext, record
from agent_network.services.principal import Principal, hash_secret
from agent_network.services.ratelimit import SlidingWindowLimiter
from agent_network.services.roles import ROLES, Standing, require, require_role
from agent_network.services.scope import (
    own_agent,
    own_user,
    require_org,
    system_actor,
    team_visible_to,
    visible_team,
)
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, invites, members, orgs, teams, threads, users, visas

TeamKind = Literal["team", "network"]
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: 32 symbols, 5 bits each
CODE_LENGTH = 12
DEFAULT_INVITE_TTL = 7 * 24 * 3600
TEAM_FIELDS = ("id", "org_id", "kind", "name", "description", "status", "created_at", "closed_at")
INVITE_FIELDS = ("id", "created_at", "expires_at", "max_uses", "uses")
JOIN_LIMIT = 10  # join attempts per window, per client address and per org
JOIN_WINDOW = 60.0  # seconds


def new_join_code() -> str:
    """A random 12-character join code (60 bits from ``secrets``)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(code: str) -> str:
    """Upper-case and strip separators so ``abcd-efgh-jkmn`` matches ``ABCDEFGHJKMN``."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def _team(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in TEAM_FIELDS}


class TeamService:
    """Teams and networks; ``kind`` selects which one every call is about.

    ``join_limit`` join attempts (valid or not) are allowed per ``JOIN_WINDOW`` seconds per client
    address and per org; set it on the instance to change it at run time. The limiter is
    in-process (see :mod:`agent_network.services.ratelimit`).
    """

    join_limit: int = JOIN_LIMIT

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.join_limiter = SlidingWindowLimiter(self.join_limit, JOIN_WINDOW)

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

    async def list_teams(self, principal: Principal, kind: TeamKind) -> list[dict[str, Any]]:
        """Teams (or networks) visible to the caller."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(teams)
                .where(teams.c.kind == kind, team_visible_to(principal))
                .order_by(teams.c.created_at)
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
        self, principal: Principal, kind: TeamKind, team_id: str
    ) -> list[dict[str, Any]]:
        """Members of a visible team/network: kind, id, name, role, org id and org name."""
        async with self.ctx.engine.connect() as conn:
            await visible_team(conn, principal, team_id, kind=kind)
            return await member_list(conn, team_id)

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

    # ------------------------------------------------------- invites and joins

    async def create_invite(
        self,
        principal: Principal,
        network_id: str,
        *,
        expires_in: float = DEFAULT_INVITE_TTL,
        max_uses: int | None = None,
    ) -> dict[str, Any]:
        """Create a join code for a network (host only). The code is returned once, stored hashed.

        ``expires_in`` is in seconds (default 7 days, at most 90 days).
        """
        if not 0 < expires_in <= 90 * 24 * 3600:
            raise InvalidRequestError("expires_in must be between 1 second and 90 days")
        if max_uses is not None and max_uses < 1:
            raise InvalidRequestError("max_uses must be at least 1")
        code = new_join_code()
        expires_at = (datetime.now(UTC) + timedelta(seconds=expires_in)).isoformat(
            timespec="microseconds"
        )
        async with write_transaction(self.ctx.engine) as conn:
            net = await self._owned(
                conn, principal, "network", network_id, need="admin", doing="creating invites to"
            )
            if net["status"] == "closed":
                raise ThreadClosedError("the network is closed; it admits nobody")
            row = {
                "id": new_id("inv"),
                "network_id": network_id,
                "org_id": net["org_id"],
                "code_hash": hash_secret(code),
                "expires_at": expires_at,
                "max_uses": max_uses,
                "uses": 0,
                "created_at": now_iso(),
            }
            await conn.execute(invites.insert().values(**row))
            await record(
                conn,
                principal,
                "invite.create",
                "network",
                network_id,
                data={"invite_id": row["id"]},
            )
        return {
            "id": row["id"],
            "network_id": network_id,
            "join_code": code,
            "expires_at": expires_at,
            "max_uses": max_uses,
        }

    async def list_invites(self, principal: Principal, network_id: str) -> list[dict[str, Any]]:
        """The network's invites, oldest first (host only): id, created_at, expires_at, max_uses,
        uses and revoked. Never the code: only its hash is stored.

        PermissionDeniedError for a member org (it sees the network), NotFoundError otherwise.
        """
        async with self.ctx.engine.connect() as conn:
            await self._owned(
                conn, principal, "network", network_id, need="admin", doing="listing invites of"
            )
            rows = (
                await conn.execute(
                    select(invites)
                    .where(invites.c.network_id == network_id)
                    .order_by(invites.c.created_at, invites.c.id)
                )
            ).mappings()
            return [
                {**{k: r[k] for k in INVITE_FIELDS}, "revoked": r["revoked_at"] is not None}
                for r in rows
            ]

    async def revoke_invite(self, principal: Principal, network_id: str, invite_id: str) -> None:
        """Revoke an invite (host only): its code stops admitting anybody. Orgs it admitted keep
        their visas and members. Revoking a revoked invite changes nothing."""
        async with write_transaction(self.ctx.engine) as conn:
            await self._owned(
                conn, principal, "network", network_id, need="admin", doing="revoking invites of"
            )
            inv = (
                await conn.execute(
                    select(invites.c.id, invites.c.revoked_at).where(
                        invites.c.id == invite_id, invites.c.network_id == network_id
                    )
                )
            ).first()
            if inv is None:
                raise NotFoundError("invite", invite_id)
            if inv.revoked_at is not None:
                return
            await conn.execute(
                update(invites).where(invites.c.id == invite_id).values(revoked_at=now_iso())
            )
            await record(
                conn,
                principal,
                "invite.revoke",
                "network",
                network_id,
                data={"invite_id": invite_id},
            )

    async def join(
        self,
        principal: Principal,
        code: str,
        *,
        agent_ids: list[str] | None = None,
        user_ids: list[str] | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """Join a network with a join code, attaching the caller's chosen agents and users.

        Creates (or reuses) the caller org's live visa; a code is used up only when it admits an
        org, not when a live visa attaches more members. InviteInvalidError for a wrong, expired,
        revoked or used-up code (the same answer for all, revealing nothing about the network).

        ``client`` is the caller's network address (from the API layer; ``None`` when unknown).
        Every attempt, admitted or not, counts against ``join_limit`` per minute for that address
        and for the org; past it RateLimitedError (429) says when to retry, before the code is
        even looked at — so codes cannot be guessed at speed.
        """
        org_id = require_org(principal)
        keys: list[tuple[str, str]] = [("org", org_id)]
        if client:
            keys.append(("client", client))
        self.join_limiter.check(*keys, limit=self.join_limit, what="join attempts")
        async with write_transaction(self.ctx.engine) as conn:
            inv = (
                (
                    await conn.execute(
                        select(invites).where(
                            invites.c.code_hash == hash_secret(normalise_code(code))
                        )
                    )
                )
                .mappings()
                .first()
            )
            now = now_iso()
            if (
                inv is None
                or inv["revoked_at"] is not None
                or inv["expires_at"] <= now
                or (inv["max_uses"] is not None and inv["uses"] >= inv["max_uses"])
            ):
                raise InviteInvalidError("the join code is not valid (wrong, expired or revoked)")
            net = (
                (await conn.execute(select(teams).where(teams.c.id == inv["network_id"])))
                .mappings()
                .one()
            )
            if net["status"] == "closed" or net["deleted_at"] is not None:
                raise InviteInvalidError("the join code is not valid (wrong, expired or revoked)")
            if net["org_id"] == org_id:
                raise ConflictError("your org hosts this network; add members directly instead")
            visa = (
                await conn.execute(
                    select(visas.c.id).where(
                        visas.c.network_id == net["id"],
                        visas.c.org_id == org_id,
                        visas.c.revoked_at.is_(None),
                    )
                )
            ).first()
            if visa is None:
                visa_id = new_id("visa")
                await conn.execute(
                    visas.insert().values(
                        id=visa_id,
                        network_id=net["id"],
                        org_id=org_id,
                        invite_id=inv["id"],
                        created_at=now,
                    )
                )
                # a use is counted when the code admits an org, not when it attaches more members
                await conn.execute(
                    update(invites).where(invites.c.id == inv["id"]).values(uses=invites.c.uses + 1)
                )
            else:
                visa_id = str(visa[0])
            await record(
                conn, principal, "network.join", "network", net["id"], data={"visa_id": visa_id}
            )
            await record(
                conn,
                principal,
                "network.join",
                "network",
                net["id"],
                org_id=net["org_id"],
                data={"visa_id": visa_id, "org_id": org_id},
            )
            attached = []
            for aid in list(agent_ids or []):
                attached.append(
                    await self._add_member(
                        conn,
                        principal,
                        net,
                        agent_id=aid,
                        user_id=None,
                        role="member",
                        visa_id=visa_id,
                    )
                )
            for uid in list(user_ids or []):
                attached.append(
                    await self._add_member(
                        conn,
                        principal,
                        net,
                        agent_id=None,
                        user_id=uid,
                        role="member",
                        visa_id=visa_id,
                    )
                )
        self.ctx.config_epoch += 1  # new members: cached outbound_to checks must be redone
        return {"network": _team(net), "visa_id": visa_id, "members": attached}

    # ----------------------------------------------------------------- visas

    async def list_visas(self, principal: Principal, network_id: str) -> list[dict[str, Any]]:
        """Visas of a visible network, oldest first: the host sees every visa (live and ended),
        a member org only its own. Each: id, network_id, org_id, org_name, created_at, revoked_at,
        end_reason (``revoked`` | ``left`` | None while live) and the members it attached now
        (kind, id, name, role; an ended visa has none)."""
        org_id = require_org(principal)
        async with self.ctx.engine.connect() as conn:
            net = await visible_team(conn, principal, network_id, kind="network")
            await require_role(conn, principal, net, "admin", "listing visas of")
            q = (
                select(visas, orgs.c.name.label("org_name"))
                .join(orgs, orgs.c.id == visas.c.org_id)
                .where(visas.c.network_id == network_id)
                .order_by(visas.c.created_at, visas.c.id)
            )
            if net["org_id"] != org_id:
                q = q.where(visas.c.org_id == org_id)
            rows = list((await conn.execute(q)).mappings())
            attached = await _visa_members(conn, network_id)
        return [_visa(r, attached.get(r["id"], [])) for r in rows]

    async def revoke_visa(self, principal: Principal, network_id: str, visa_id: str) -> None:
        """End an org's visa (host only), removing all of that org's agents and users from the
        network in the same transaction. The WAL keeps what they wrote; the org no longer sees
        the network or its threads (404) until it joins again with a valid code (a new visa).
        Revoking an ended visa changes nothing. Recorded in both orgs' audit logs."""
        async with write_transaction(self.ctx.engine) as conn:
            await self._owned(
                conn, principal, "network", network_id, need="admin", doing="revoking visas of"
            )
            visa = (
                (
                    await conn.execute(
                        select(visas).where(visas.c.id == visa_id, visas.c.network_id == network_id)
                    )
                )
                .mappings()
                .first()
            )
            if visa is None:
                raise NotFoundError("visa", visa_id)
            if visa["revoked_at"] is None:
                await self._end_visa(conn, principal, visa, "revoked", other_org=visa["org_id"])
        await self.ctx.access_removed()  # before answering: see ServiceContext

    async def leave(self, principal: Principal, network_id: str) -> dict[str, Any]:
        """The caller's org leaves a network it joined: its live visa ends (``left``) and its
        agents and users are removed, as with a revocation. ConflictError for the host (close the
        network instead). Returns the ended visa. Recorded in both orgs' audit logs."""
        org_id = require_org(principal)
        async with write_transaction(self.ctx.engine) as conn:
            net = await visible_team(conn, principal, network_id, kind="network")
            if net["org_id"] == org_id:
                raise ConflictError("your org hosts this network; it cannot leave (close it)")
            visa = (
                (
                    await conn.execute(
                        select(visas, orgs.c.name.label("org_name"))
                        .join(orgs, orgs.c.id == visas.c.org_id)
                        .where(
                            visas.c.network_id == network_id,
                            visas.c.org_id == org_id,
                            visas.c.revoked_at.is_(None),
                        )
                    )
                )
                .mappings()
                .first()
            )
            if visa is None:  # visible but no live visa: cannot happen for a non-host
                raise NotFoundError("network", network_id)
            ended = await self._end_visa(conn, principal, visa, "left", other_org=net["org_id"])
        await self.ctx.access_removed()  # before answering: see ServiceContext
        return _visa({**visa, **ended}, [])

    async def _end_visa(
        self,
        conn: AsyncConnection,
        principal: Principal,
        visa: RowMapping,
        reason: Literal["revoked", "left"],
        *,
        other_org: str,
    ) -> dict[str, Any]:
        """Mark ``visa`` ended and remove its org's members from the network; audit the act in
        the acting org's log and in ``other_org``'s."""
        ended = {"revoked_at": now_iso(), "end_reason": reason}
        result = await conn.execute(
            update(visas)
            .where(visas.c.id == visa["id"], visas.c.revoked_at.is_(None))
            .values(**ended)
        )
        if result.rowcount == 0:  # ended concurrently
            raise NotFoundError("visa", visa["id"])
        removed = await conn.execute(
            members.delete().where(
                members.c.team_id == visa["network_id"], members.c.org_id == visa["org_id"]
            )
        )
        action = "network.visa_revoke" if reason == "revoked" else "network.leave"
        data = {
            "visa_id": visa["id"],
            "org_id": visa["org_id"],
            "members_removed": removed.rowcount,
        }
        await record(conn, principal, action, "network", visa["network_id"], data=data)
        await record(
            conn, principal, action, "network", visa["network_id"], org_id=other_org, data=data
        )
        return ended

    async def close_network(self, principal: Principal, network_id: str) -> dict[str, Any]:
        """Close a network (host only): no new threads, messages or members; history stays
        readable by every member org. Each thread gets a ``thread.closed`` envelope."""
        async with write_transaction(self.ctx.engine) as conn:
            net = await self._owned(
                conn, principal, "network", network_id, need="owner", doing="closing"
            )
            if net["status"] != "closed":
                await conn.execute(
                    update(teams)
                    .where(teams.c.id == network_id)
                    .values(status="closed", closed_at=now_iso())
                )
                await record(conn, principal, "network.close", "network", network_id)
            thread_ids = [
                r[0]
                for r in await conn.execute(
                    select(threads.c.id).where(threads.c.team_id == network_id)
                )
            ]
        system = system_actor(principal)
        for tid in thread_ids:
            if (await self.ctx.hub.state(tid)).status != "closed":
                await self.ctx.hub.append(
                    tid,
                    type=EV_THREAD_CLOSED,
                    data={"reason": "network_closed"},
                    sender=system,
                    idempotency_key="network_closed",
                    acted_by=(principal.kind, principal.key_id),
                )
        return await self.get(principal, "network", network_id)


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


def _visa(row: Any, attached: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "network_id": row["network_id"],
        "org_id": row["org_id"],
        "org_name": row["org_name"],
        "created_at": row["created_at"],
        "revoked_at": row["revoked_at"],
        "end_reason": row["end_reason"],
        "members": attached,
    }


async def _visa_members(conn: AsyncConnection, network_id: str) -> dict[str, list[dict[str, Any]]]:
    """Members of ``network_id`` attached through a visa, by visa id (no scope check)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, table in (("agent", agents), ("user", users)):
        q = (
            select(members.c.visa_id, members.c.member_id, members.c.role, table.c.name)
            .join(table, table.c.id == members.c.member_id)
            .where(
                members.c.team_id == network_id,
                members.c.member_kind == kind,
                members.c.visa_id.is_not(None),
            )
            .order_by(members.c.created_at)
        )
        for r in (await conn.execute(q)).mappings():
            out.setdefault(r["visa_id"], []).append(
                {"kind": kind, "id": r["member_id"], "name": r["name"], "role": r["role"]}
            )
    return out


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
