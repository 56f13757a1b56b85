"""Networks across orgs: join codes (invites), joining with a code, visas, leaving and closing a
network. :class:`NetworkAdmission` holds these calls and ``TeamService`` (services/teams.py)
inherits them, so ``services.teams`` serves teams and networks alike. Who may do what:
docs/security.md; where modules live: docs/architecture.md ("Module map and sizes").
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    ConflictError,
    InvalidRequestError,
    InviteInvalidError,
    NotFoundError,
    ThreadClosedError,
)
from agent_network.model.ids import new_id, now_iso
from agent_network.protocol.events import EV_THREAD_CLOSED
from agent_network.services.base import ServiceContext, record
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import Principal, hash_secret
from agent_network.services.ratelimit import RateLimiter
from agent_network.services.roles import require_role
from agent_network.services.scope import (
    require_org,
    system_sender,
    visible_team,
)
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, invites, members, orgs, teams, threads, users, visas

if TYPE_CHECKING:
    from agent_network.services.teams import TeamKind

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: 32 symbols, 5 bits each
CODE_LENGTH = 12
DEFAULT_INVITE_TTL = 7 * 24 * 3600
INVITE_FIELDS = ("id", "created_at", "expires_at", "max_uses", "uses")
JOIN_LIMIT = 10  # join attempts per window, per client address and per org
JOIN_WINDOW = 60.0  # seconds


def new_join_code() -> str:
    """A random 12-character join code (60 bits from ``secrets``)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(code: str) -> str:
    """Upper-case and strip separators so ``abcd-efgh-jkmn`` matches ``ABCDEFGHJKMN``."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


class NetworkAdmission:
    """The network calls of :class:`~agent_network.services.teams.TeamService` (a mixin: it
    uses the service's ``ctx``, join limiter, :meth:`get`, ``_owned`` and ``_add_member``)."""

    ctx: ServiceContext
    join_limit: int
    join_limiter: RateLimiter

    if TYPE_CHECKING:

        async def get(
            self, principal: Principal, kind: TeamKind, team_id: str
        ) -> dict[str, Any]: ...

        async def _owned(
            self,
            conn: AsyncConnection,
            principal: Principal,
            kind: TeamKind,
            team_id: str,
            *,
            need: str,
            doing: str,
        ) -> RowMapping: ...

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
        ) -> dict[str, Any]: ...

        @staticmethod
        def _team(row: Any) -> dict[str, Any]: ...

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

    async def list_invites(
        self,
        principal: Principal,
        network_id: str,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The network's invites, oldest first (host only): id, created_at, expires_at, max_uses,
        uses and revoked (a keyset page by ``(created_at, id)`` with ``after``/``limit``).
        Never the code: only its hash is stored.

        PermissionDeniedError for a member org (it sees the network), NotFoundError otherwise.
        """
        async with self.ctx.engine.connect() as conn:
            await self._owned(
                conn, principal, "network", network_id, need="admin", doing="listing invites of"
            )
            rows = (
                await conn.execute(
                    keyset(
                        select(invites).where(invites.c.network_id == network_id),
                        (invites.c.created_at, invites.c.id),
                        after,
                        limit,
                    )
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
        await self.join_limiter.admit(*keys, limit=self.join_limit, what="join attempts")
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
        return {"network": self._team(net), "visa_id": visa_id, "members": attached}

    # ----------------------------------------------------------------- visas

    async def list_visas(
        self,
        principal: Principal,
        network_id: str,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Visas of a visible network, oldest first (a keyset page by ``(created_at, id)`` with
        ``after``/``limit``): the host sees every visa (live and ended), a member org only its
        own. Each: id, network_id, org_id, org_name, created_at, revoked_at,
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
            )
            if net["org_id"] != org_id:
                q = q.where(visas.c.org_id == org_id)
            q = keyset(q, (visas.c.created_at, visas.c.id), after, limit)
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
        system = system_sender(principal)
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
