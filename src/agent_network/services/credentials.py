"""Credentials of an org: org keys, user tokens, agent tokens — issue, list, revoke, rotate.

Secrets are 256-bit random bearer strings shown once at issue/rotation and stored only as
SHA-256. Every act is audited. Only an org key may manage credentials.

A credential may expire: issued with ``expires_in`` seconds it stops authenticating at
``expires_at`` (REST at once; a realtime connection at its next heartbeat or client frame)
unless it is renewed before (:meth:`CredentialService.renew`). The HubClient issues its
agents' and people's tokens this way and renews them while it runs, so the tokens of a process
killed with SIGKILL die on their own.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from agent_network.errors import InvalidRequestError, NotFoundError
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.orgs import PREFIX_OF_KIND
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import (
    ALL_SCOPES,
    Principal,
    epoch_of,
    hash_secret,
    new_secret,
)
from agent_network.services.scope import own_agent, own_user, require_org_key
from agent_network.store.engine import write_transaction
from agent_network.store.tables import credentials

CREDENTIAL_FIELDS = (
    "id",
    "org_id",
    "kind",
    "subject_id",
    "name",
    "scopes",
    "created_at",
    "revoked_at",
    "expires_at",
)
MIN_LIFETIME = 1.0  # seconds
MAX_LIFETIME = 10 * 365 * 86400.0  # seconds (ten years)


def _public(row: Any) -> dict[str, Any]:
    return {k: row.get(k) for k in CREDENTIAL_FIELDS}


def _expiry(expires_in: float | None) -> str | None:
    """The ISO time ``expires_in`` seconds from now; None for None. InvalidRequestError
    outside [MIN_LIFETIME, MAX_LIFETIME]."""
    if expires_in is None:
        return None
    if not MIN_LIFETIME <= expires_in <= MAX_LIFETIME:
        raise InvalidRequestError(
            f"expires_in must be between {MIN_LIFETIME:g} and {MAX_LIFETIME:g} seconds"
        )
    when = datetime.now(UTC) + timedelta(seconds=expires_in)
    return when.isoformat(timespec="microseconds")


def _is_expired(row: Any, now: float) -> bool:
    at = epoch_of(row["expires_at"])
    return at is not None and now >= at


class CredentialService:
    """Issue and manage the org's credentials (never returns a stored secret)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def issue(
        self,
        principal: Principal,
        *,
        kind: str,
        subject_id: str | None = None,
        name: str = "",
        scopes: list[str] | None = None,
        expires_in: float | None = None,
    ) -> dict[str, Any]:
        """Issue a credential. ``kind`` is ``org_key``, ``user_token`` (``subject_id`` = a user of
        the org) or ``agent_token`` (``subject_id`` = an agent of the org); ``scopes`` is
        ``["read"]`` or ``["read", "write"]`` (default); ``expires_in``: seconds until it stops
        authenticating (1 s to ten years; None: never). Returns ``{"credential", "secret"}``;
        the secret is shown this once. NotFoundError for a subject outside the org,
        InvalidRequestError for a bad kind, scopes or lifetime."""
        org_id = require_org_key(principal, "managing credentials")
        if kind not in PREFIX_OF_KIND:
            raise InvalidRequestError("kind must be org_key, user_token or agent_token")
        wanted = set(scopes or ALL_SCOPES)
        if not wanted <= ALL_SCOPES or "read" not in wanted:
            raise InvalidRequestError('scopes must be ["read"] or ["read", "write"]')
        expires_at = _expiry(expires_in)
        async with write_transaction(self.ctx.engine) as conn:
            if kind == "org_key":
                if subject_id not in (None, org_id):
                    raise InvalidRequestError("an org key acts for its own org: omit subject_id")
                subject_id = org_id
            elif subject_id is None:
                raise InvalidRequestError(f"a {kind} needs subject_id (the user or agent id)")
            elif kind == "user_token":
                await own_user(conn, principal, subject_id)
            else:
                await own_agent(conn, principal, subject_id)
            secret = new_secret(PREFIX_OF_KIND[kind])
            row = {
                "id": new_id("cred"),
                "org_id": org_id,
                "kind": kind,
                "subject_id": subject_id,
                "name": name,
                "key_hash": hash_secret(secret),
                "scopes": sorted(wanted),
                "created_at": now_iso(),
                "revoked_at": None,
                "expires_at": expires_at,
            }
            await conn.execute(credentials.insert().values(**row))
            await record(
                conn,
                principal,
                "credential.issue",
                "credential",
                str(row["id"]),
                data={
                    "kind": kind,
                    "subject_id": subject_id,
                    "scopes": row["scopes"],
                    "expires_at": expires_at,
                },
            )
        return {"credential": _public(row), "secret": secret}

    async def list_credentials(
        self, principal: Principal, *, after: Key | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The org's credentials (live and revoked), without secrets or hashes, oldest first
        (a keyset page by ``(created_at, id)`` with ``after``/``limit``)."""
        org_id = require_org_key(principal, "managing credentials")
        async with self.ctx.engine.connect() as conn:
            q = keyset(
                select(credentials).where(credentials.c.org_id == org_id),
                (credentials.c.created_at, credentials.c.id),
                after,
                limit,
            )
            return [_public(r) for r in (await conn.execute(q)).mappings()]

    async def revoke(self, principal: Principal, credential_id: str) -> dict[str, Any]:
        """Revoke a credential at once (idempotent). Revoking the key in use is allowed."""
        org_id = require_org_key(principal, "managing credentials")
        async with write_transaction(self.ctx.engine) as conn:
            row = await self._own(conn, org_id, credential_id)
            if row["revoked_at"] is None:
                await conn.execute(
                    update(credentials)
                    .where(credentials.c.id == credential_id)
                    .values(revoked_at=now_iso())
                )
                await record(conn, principal, "credential.revoke", "credential", credential_id)
            row = _public(await self._own(conn, org_id, credential_id))
        await self.ctx.access_removed()  # before answering: see ServiceContext
        return row

    async def renew(
        self, principal: Principal, credential_id: str, expires_in: float
    ) -> dict[str, Any]:
        """Move a live credential's expiry to ``expires_in`` seconds from now (1 s to ten
        years; a credential without expiry gets one). Returns the credential.
        InvalidRequestError when it is revoked or already expired (issue a new one) or for a
        bad lifetime; NotFoundError for a credential of another org."""
        org_id = require_org_key(principal, "managing credentials")
        expires_at = _expiry(expires_in)
        async with write_transaction(self.ctx.engine) as conn:
            row = await self._own(conn, org_id, credential_id)
            if row["revoked_at"] is not None or _is_expired(row, datetime.now(UTC).timestamp()):
                raise InvalidRequestError(
                    "the credential is revoked or expired; issue a new one instead"
                )
            await conn.execute(
                update(credentials)
                .where(credentials.c.id == credential_id)
                .values(expires_at=expires_at)
            )
            await record(
                conn,
                principal,
                "credential.renew",
                "credential",
                credential_id,
                data={"expires_at": expires_at},
            )
            return _public(await self._own(conn, org_id, credential_id))

    async def rotate(self, principal: Principal, credential_id: str) -> dict[str, Any]:
        """Issue a replacement with the same kind, subject, name, scopes and lifetime (the
        time from issue to expiry, counted from now), and revoke the old one in the same
        transaction. Returns ``{"credential", "secret"}``. InvalidRequestError when the old one
        is revoked or expired."""
        org_id = require_org_key(principal, "managing credentials")
        async with write_transaction(self.ctx.engine) as conn:
            old = await self._own(conn, org_id, credential_id)
            if old["revoked_at"] is not None or _is_expired(old, datetime.now(UTC).timestamp()):
                raise InvalidRequestError(
                    "the credential is revoked or expired; issue a new one instead"
                )
            secret = new_secret(PREFIX_OF_KIND[old["kind"]])
            lifetime = None
            if old["expires_at"] is not None:
                lifetime = (epoch_of(old["expires_at"]) or 0.0) - (
                    epoch_of(old["created_at"]) or 0.0
                )
                lifetime = min(max(lifetime, MIN_LIFETIME), MAX_LIFETIME)
            row = {
                **_public(old),
                "id": new_id("cred"),
                "key_hash": hash_secret(secret),
                "created_at": now_iso(),
                "revoked_at": None,
                "expires_at": _expiry(lifetime),
            }
            await conn.execute(credentials.insert().values(**row))
            await conn.execute(
                update(credentials)
                .where(credentials.c.id == credential_id)
                .values(revoked_at=now_iso())
            )
            await record(
                conn,
                principal,
                "credential.rotate",
                "credential",
                credential_id,
                data={"replacement": row["id"]},
            )
        await self.ctx.access_removed()  # before answering: see ServiceContext
        return {"credential": _public(row), "secret": secret}

    @staticmethod
    async def _own(conn: Any, org_id: str, credential_id: str) -> Any:
        row = (
            (
                await conn.execute(
                    select(credentials).where(
                        credentials.c.id == credential_id, credentials.c.org_id == org_id
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise NotFoundError("credential", credential_id)
        return row
