"""Agent secrets: per-agent values encrypted at rest, listed by name only, never returned.

Encryption is Fernet from the ``cryptography`` package (AES-128-CBC with HMAC-SHA256,
https://github.com/fernet/spec). The key comes from ``AGENT_NETWORK_SECRET_KEY`` (a Fernet key,
``Fernet.generate_key()``); without it the embedded default keeps one in a file beside the SQLite
database (``<db>.secret-key``, mode 0600), created on first use. Secret values never enter a
prompt and no API returns them; they exist for tools and integrations that run for the agent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from agent_network.errors import AgentNetworkError, InvalidRequestError, NotFoundError
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.principal import Principal
from agent_network.services.scope import own_agent, require_org_key
from agent_network.store.engine import write_transaction
from agent_network.store.secrets import upsert_secret
from agent_network.store.tables import agent_secrets

SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
MAX_SECRET_BYTES = 16_384


class SecretKeyError(AgentNetworkError):
    """The server's secret key is missing or wrong (a configuration problem, not the caller's)."""

    code = "secret_key_unavailable"
    status = 500


def load_fernet(configured: str | None, database: str) -> Fernet:
    """The Fernet for ``configured`` (a urlsafe-base64 32-byte key) or for the key file beside
    the SQLite ``database`` path (created 0600 on first use). SecretKeyError if unusable."""
    if configured:
        try:
            return Fernet(configured.encode())
        except ValueError as exc:
            raise SecretKeyError(f"AGENT_NETWORK_SECRET_KEY is not a Fernet key: {exc}") from exc
    if "://" in database and not database.startswith("sqlite"):
        raise SecretKeyError("set AGENT_NETWORK_SECRET_KEY (a Fernet key) for this database")
    path = Path(database.split("///", 1)[-1] + ".secret-key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return Fernet(path.read_bytes().strip())


class SecretService:
    """Set, list (names only) and delete an agent's secrets; org keys only."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._fernet: Fernet | None = None

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            settings = self.ctx.settings
            self._fernet = load_fernet(settings.secret_key, settings.database)
        return self._fernet

    async def put(
        self, principal: Principal, agent_id: str, name: str, value: str
    ) -> dict[str, Any]:
        """Create or replace secret ``name`` of an agent. Returns its name and times only."""
        require_org_key(principal, "managing agent secrets")
        if not SECRET_NAME.match(name):
            raise InvalidRequestError(
                "secret names are 1-100 characters: letters, digits, '_', '.', '-', not starting "
                "with a digit"
            )
        if not value or len(value.encode()) > MAX_SECRET_BYTES:
            raise InvalidRequestError(f"a secret value is 1 to {MAX_SECRET_BYTES} bytes")
        token = self._cipher().encrypt(value.encode()).decode()
        ts = now_iso()
        async with write_transaction(self.ctx.engine) as conn:
            agent = await own_agent(conn, principal, agent_id)
            await upsert_secret(
                conn,
                {
                    "id": new_id("sec"),
                    "org_id": agent["org_id"],
                    "agent_id": agent_id,
                    "name": name,
                    "ciphertext": token,
                    "created_at": ts,
                    "updated_at": ts,
                },
            )
            await record(conn, principal, "secret.put", "agent", agent_id, data={"name": name})
        return {"agent_id": agent_id, "name": name, "updated_at": ts}

    async def list_names(self, principal: Principal, agent_id: str) -> list[dict[str, Any]]:
        """Names and times of an agent's secrets (never values)."""
        require_org_key(principal, "managing agent secrets")
        async with self.ctx.engine.connect() as conn:
            await own_agent(conn, principal, agent_id)
            q = (
                select(agent_secrets.c.name, agent_secrets.c.created_at, agent_secrets.c.updated_at)
                .where(agent_secrets.c.agent_id == agent_id)
                .order_by(agent_secrets.c.name)
            )
            return [dict(r) for r in (await conn.execute(q)).mappings()]

    async def delete(self, principal: Principal, agent_id: str, name: str) -> None:
        """Delete one secret; NotFoundError when the agent has none of that name."""
        require_org_key(principal, "managing agent secrets")
        async with write_transaction(self.ctx.engine) as conn:
            await own_agent(conn, principal, agent_id)
            result = await conn.execute(
                agent_secrets.delete().where(
                    agent_secrets.c.agent_id == agent_id, agent_secrets.c.name == name
                )
            )
            if result.rowcount == 0:
                raise NotFoundError("secret", name)
            await record(conn, principal, "secret.delete", "agent", agent_id, data={"name": name})

    async def reveal(self, org_id: str, agent_id: str, name: str) -> str:
        """Internal (tools running for the agent): decrypt one secret. Never exposed over HTTP."""
        async with self.ctx.engine.connect() as conn:
            token = (
                await conn.execute(
                    select(agent_secrets.c.ciphertext).where(
                        agent_secrets.c.org_id == org_id,
                        agent_secrets.c.agent_id == agent_id,
                        agent_secrets.c.name == name,
                    )
                )
            ).scalar_one_or_none()
        if token is None:
            raise NotFoundError("secret", name)
        try:
            return self._cipher().decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretKeyError("the secret key does not decrypt this secret") from exc
