"""Orgs, their keys, their users, and authentication of bearer credentials."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import (
    ALL_SCOPES,
    Principal,
    epoch_of,
    hash_secret,
    new_secret,
    not_expired,
)
from agent_network.services.scope import own_user, require_org
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, credentials, members, orgs, platform_keys, users

ADMIN_PREFIX = "an_admin"
ORG_PREFIX = "an_org"
USER_PREFIX = "an_usr"
AGENT_PREFIX = "an_agt"
CREDENTIAL_PREFIXES = (ORG_PREFIX + "_", USER_PREFIX + "_", AGENT_PREFIX + "_")
PREFIX_OF_KIND = {"org_key": ORG_PREFIX, "user_token": USER_PREFIX, "agent_token": AGENT_PREFIX}
KIND_OF_CREDENTIAL: dict[str, Any] = {
    "org_key": "org",
    "user_token": "user",
    "agent_token": "agent",
}


async def create_admin_key(engine: AsyncEngine) -> str:
    """Create a platform admin key and return it (shown once; only its hash is stored)."""
    secret = new_secret(ADMIN_PREFIX)
    async with write_transaction(engine) as conn:
        await conn.execute(
            platform_keys.insert().values(
                id=new_id("adk"), key_hash=hash_secret(secret), created_at=now_iso()
            )
        )
    return secret


async def has_admin_key(engine: AsyncEngine) -> bool:
    """True when at least one live platform admin key exists."""
    async with engine.connect() as conn:
        q = select(platform_keys.c.id).where(platform_keys.c.revoked_at.is_(None)).limit(1)
        return (await conn.execute(q)).first() is not None


async def _subject_alive(conn: AsyncConnection, cred: Any) -> bool:
    """A user/agent token works only while its user/agent exists."""
    table = {"user_token": users, "agent_token": agents}.get(cred["kind"])
    if table is None:
        return True
    q = select(table.c.id).where(table.c.id == cred["subject_id"], table.c.deleted_at.is_(None))
    return (await conn.execute(q)).first() is not None


def _clean_name(value: str, what: str) -> str:
    name = value.strip()
    if not name:
        raise InvalidRequestError(f"{what} must not be empty")
    return name


class OrgService:
    """Orgs and users. Every method takes the acting :class:`Principal` first."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def authenticate(self, secret: str) -> Principal:
        """Map a bearer secret to its principal; AuthenticationError if it matches nothing live
        (unknown, revoked, expired, or its user or agent deleted).

        The lookup is by SHA-256 of the secret (an index probe, not a comparison of secrets), so
        its timing reveals nothing about stored secrets. A token whose user or agent was deleted
        no longer authenticates.
        """
        digest = hash_secret(secret)
        async with self.ctx.engine.connect() as conn:
            if secret.startswith(ADMIN_PREFIX + "_"):
                row = (
                    await conn.execute(
                        select(platform_keys.c.id).where(
                            platform_keys.c.key_hash == digest, platform_keys.c.revoked_at.is_(None)
                        )
                    )
                ).first()
                if row is not None:
                    return Principal("admin", None, row[0])
            elif secret.startswith(CREDENTIAL_PREFIXES):
                cred = (
                    (
                        await conn.execute(
                            select(credentials).where(
                                credentials.c.key_hash == digest,
                                credentials.c.revoked_at.is_(None),
                                not_expired(),
                            )
                        )
                    )
                    .mappings()
                    .first()
                )
                if cred is not None and await _subject_alive(conn, cred):
                    return Principal(
                        KIND_OF_CREDENTIAL[cred["kind"]],
                        cred["org_id"],
                        cred["id"],
                        cred["subject_id"],
                        frozenset(cred["scopes"]),
                        epoch_of(cred["expires_at"]),
                    )
        raise AuthenticationError(
            "the credential is not valid (unknown, revoked, expired or mistyped)"
        )

    async def create_org(self, principal: Principal, name: str) -> dict[str, Any]:
        """Create an org (admin only). Returns ``{"org": {...}, "secret": secret}``, the secret
        of its first org key, shown once."""
        if principal.kind != "admin":
            raise PermissionDeniedError("only the platform admin key can create orgs")
        name = _clean_name(name, "org name")
        org_id, secret, ts = new_id("org"), new_secret(ORG_PREFIX), now_iso()
        async with write_transaction(self.ctx.engine) as conn:
            await conn.execute(orgs.insert().values(id=org_id, name=name, created_at=ts))
            await conn.execute(
                credentials.insert().values(
                    id=new_id("cred"),
                    org_id=org_id,
                    kind="org_key",
                    subject_id=org_id,
                    name="initial key",
                    key_hash=hash_secret(secret),
                    scopes=sorted(ALL_SCOPES),
                    created_at=ts,
                )
            )
            await record(conn, principal, "org.create", "org", org_id, org_id=org_id)
        return {"org": {"id": org_id, "name": name, "created_at": ts}, "secret": secret}

    async def list_orgs(
        self, principal: Principal, *, after: Key | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Every org (admin only), oldest first: ``[{id, name, created_at}]`` (a keyset page
        by ``(created_at, id)`` with ``after``/``limit``).

        PermissionDeniedError for any other credential."""
        if principal.kind != "admin":
            raise PermissionDeniedError("only the platform admin key can list orgs")
        async with self.ctx.engine.connect() as conn:
            q = keyset(
                select(orgs.c.id, orgs.c.name, orgs.c.created_at),
                (orgs.c.created_at, orgs.c.id),
                after,
                limit,
            )
            return [dict(r) for r in (await conn.execute(q)).mappings()]

    async def issue_org_key(
        self, principal: Principal, org_id: str, name: str = "issued by the platform admin"
    ) -> dict[str, Any]:
        """Issue a new org key for ``org_id`` (admin only): the way back in for an org that lost
        its key. Other keys of the org stay as they are (the org revokes a lost one itself with
        the new key, ``DELETE /credentials/{id}``).

        Returns ``{"credential": {id, org_id, kind, subject_id, name, scopes, created_at,
        revoked_at, expires_at}, "secret"}``; the secret is shown this once. Recorded in the
        org's audit log as ``credential.issue`` by the admin. PermissionDeniedError for any
        other credential (before the id is looked at), NotFoundError for an unknown org,
        InvalidRequestError for an empty name.
        """
        if principal.kind != "admin":
            raise PermissionDeniedError("only the platform admin key can issue a new org key")
        name = _clean_name(name, "key name")
        secret = new_secret(ORG_PREFIX)
        row: dict[str, Any] = {
            "id": new_id("cred"),
            "org_id": org_id,
            "kind": "org_key",
            "subject_id": org_id,
            "name": name,
            "key_hash": hash_secret(secret),
            "scopes": sorted(ALL_SCOPES),
            "created_at": now_iso(),
            "revoked_at": None,
            "expires_at": None,
        }
        async with write_transaction(self.ctx.engine) as conn:
            found = await conn.execute(select(orgs.c.id).where(orgs.c.id == org_id))
            if found.first() is None:
                raise NotFoundError("org", org_id)
            await conn.execute(credentials.insert().values(**row))
            await record(
                conn,
                principal,
                "credential.issue",
                "credential",
                str(row["id"]),
                org_id=org_id,
                data={"kind": "org_key", "subject_id": org_id, "scopes": row["scopes"]},
            )
        public = {k: v for k, v in row.items() if k != "key_hash"}
        return {"credential": public, "secret": secret}

    async def get_org(self, principal: Principal) -> dict[str, Any]:
        """The caller's own org."""
        org_id = require_org(principal)
        async with self.ctx.engine.connect() as conn:
            row = (await conn.execute(select(orgs).where(orgs.c.id == org_id))).mappings().first()
        if row is None:
            raise NotFoundError("org", org_id)
        return dict(row)

    # ------------------------------------------------------------------ users

    async def create_user(
        self, principal: Principal, name: str, email: str | None, *, auto_ack: bool = False
    ) -> dict[str, Any]:
        """Create a person in the caller's org.

        ``auto_ack`` (default False): the person acknowledges invitations to protocol threads
        automatically (``thread.ack`` written right after ``thread.created``); otherwise they
        stay pending until the person acks or rejects (``POST /threads/{id}/ack|reject``).
        Returns the user dict (id, org_id, name, email, auto_ack, created_at).
        """
        org_id = require_org(principal)
        user_id = new_id("usr")
        row: dict[str, Any] = {
            "id": user_id,
            "org_id": org_id,
            "name": _clean_name(name, "user name"),
            "email": email,
            "auto_ack": bool(auto_ack),
            "created_at": now_iso(),
        }
        async with write_transaction(self.ctx.engine) as conn:
            await conn.execute(users.insert().values(**row))
            await record(conn, principal, "user.create", "user", user_id)
        return row

    async def list_users(
        self, principal: Principal, *, after: Key | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The caller's live users, oldest first (a keyset page by ``(created_at, id)`` with
        ``after``/``limit``)."""
        org_id = require_org(principal)
        async with self.ctx.engine.connect() as conn:
            q = keyset(
                select(users).where(users.c.org_id == org_id, users.c.deleted_at.is_(None)),
                (users.c.created_at, users.c.id),
                after,
                limit,
            )
            return [_user(r) for r in (await conn.execute(q)).mappings()]

    async def get_user(self, principal: Principal, user_id: str) -> dict[str, Any]:
        """One of the caller's users; NotFoundError otherwise."""
        async with self.ctx.engine.connect() as conn:
            return _user(await own_user(conn, principal, user_id))

    async def update_user(
        self, principal: Principal, user_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change ``name``, ``email`` and/or ``auto_ack`` (bool) of one of the caller's users;
        NotFoundError outside the caller's org."""
        async with write_transaction(self.ctx.engine) as conn:
            await own_user(conn, principal, user_id)
            values = {k: v for k, v in changes.items() if k in ("name", "email", "auto_ack")}
            if "auto_ack" in values:
                values["auto_ack"] = bool(values["auto_ack"])
            if "name" in values:
                values["name"] = _clean_name(values["name"], "user name")
            if values:
                await conn.execute(update(users).where(users.c.id == user_id).values(**values))
            await record(conn, principal, "user.update", "user", user_id)
            row = _user(await own_user(conn, principal, user_id))
        self.ctx.config_epoch += 1  # cached post decisions hold the user's old name
        return row

    async def delete_user(self, principal: Principal, user_id: str) -> None:
        """Soft-delete one of the caller's users (their past envelopes stay in the WAL)."""
        async with write_transaction(self.ctx.engine) as conn:
            await own_user(conn, principal, user_id)
            await soft_delete_member(conn, users, user_id)
            await record(conn, principal, "user.delete", "user", user_id)
        await self.ctx.access_removed()  # before answering: see ServiceContext


async def soft_delete_member(conn: AsyncConnection, table: Any, member_id: str) -> None:
    """Mark a user/agent deleted and remove it from every team and network."""
    await conn.execute(update(table).where(table.c.id == member_id).values(deleted_at=now_iso()))
    await conn.execute(members.delete().where(members.c.member_id == member_id))


def _user(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in ("id", "org_id", "name", "email", "created_at")}
    out["auto_ack"] = bool(row["auto_ack"])
    return out
