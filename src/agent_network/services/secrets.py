"""Agent secrets: per-agent values encrypted at rest, listed by name only, never returned to an
API reader; revealed only to the agent's own runner, for the tools it runs.

Encryption is Fernet from the ``cryptography`` package (AES-128-CBC with HMAC-SHA256,
https://github.com/fernet/spec). The key comes from ``AGENT_NETWORK_SECRET_KEY`` (a Fernet key,
``Fernet.generate_key()``); without it the embedded default keeps one in a file beside the SQLite
database (``<db>.secret-key``, mode 0600), created on first use.

Where secrets are consumed: by the tools that run for the agent, at run time
(``runtime/tools.py``). The in-process runner hands each model run a :class:`RunSecrets` for the
job's agent; a remote runner gets values over ``POST /runners/secrets`` with that agent's own
token under a live claim (:meth:`SecretService.reveal_for_runner`). Each reveal is audited as
``secret.revealed`` with the secret's name, never its value. Secret values never enter a prompt,
a log line or an audit record, and no other API returns them.

Egress: when a secret is written, its keyed fingerprints are stored beside the ciphertext
(``agent_secrets.fingerprints``, services/fingerprints.py) so the egress default can find the
value, or a simple encoding of it, in an outgoing message without the plaintext
(:func:`org_secret_index`). Rows written before fingerprints existed (or under another key) are
fingerprinted on first use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from typing import Any

import structlog
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select, update

from agent_network.errors import (
    AgentNetworkError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.cache import DecisionCache
from agent_network.services.claims import ClaimRequiredError, agent_in_thread
from agent_network.services.fingerprints import SecretIndex, fingerprint, is_current
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import Principal
from agent_network.services.scope import (
    credential_in_force,
    own_agent,
    require_org_key,
    visible_thread,
)
from agent_network.store.audit import audit_row, insert_audit
from agent_network.store.claims import stored_claim
from agent_network.store.engine import write_transaction
from agent_network.store.secrets import upsert_secret
from agent_network.store.tables import agent_secrets, agents

log = structlog.get_logger(__name__)

SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
MAX_SECRET_BYTES = 16_384


class SecretKeyError(AgentNetworkError):
    """The server's secret key is missing or wrong (a configuration problem, not the caller's)."""

    code = "secret_key_unavailable"
    status = 500


FINGERPRINT_INFO = b"agent-network egress fingerprints v1"


def load_secret_key(configured: str | None, database: str) -> bytes:
    """The server's Fernet key (its urlsafe-base64 text, as bytes): ``configured``, or the key
    file beside the SQLite ``database`` path (created 0600 on first use). SecretKeyError if
    unusable."""
    if configured:
        key = configured.encode()
        where = "AGENT_NETWORK_SECRET_KEY"
    else:
        if "://" in database and not database.startswith("sqlite"):
            raise SecretKeyError("set AGENT_NETWORK_SECRET_KEY (a Fernet key) for this database")
        path = Path(database.split("///", 1)[-1] + ".secret-key")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        key = path.read_bytes().strip()
        where = str(path)
    try:
        Fernet(key)
    except (ValueError, binascii.Error) as exc:
        raise SecretKeyError(f"{where} is not a Fernet key: {exc}") from exc
    return key


def load_fernet(configured: str | None, database: str) -> Fernet:
    """The Fernet for ``configured`` (a urlsafe-base64 32-byte key) or for the key file beside
    the SQLite ``database`` path (created 0600 on first use). SecretKeyError if unusable."""
    return Fernet(load_secret_key(configured, database))


class OrgSecrets:
    """What one process context knows of its orgs' secrets: the server key (loaded once) and,
    per org, the :class:`~agent_network.services.fingerprints.SecretIndex` of its secrets'
    fingerprints — MACs only, never a value.

    The index of an org is cached like a post decision (services/cache.py): served while no
    secret of the org was written or deleted in this process since it was read (:meth:`changed`)
    and for at most ``DECISION_TTL`` seconds — the bound after which a secret written by another
    server process on the same database is known here.
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._key: bytes | None = None
        self._fernet: Fernet | None = None
        self._master: bytes | None = None
        self._indexes: DecisionCache[SecretIndex] = DecisionCache()
        self._versions: dict[str, int] = {}

    def _load(self) -> None:
        if self._key is None:
            settings = self.ctx.settings
            key = load_secret_key(settings.secret_key, settings.database)
            self._fernet = Fernet(key)
            raw = base64.urlsafe_b64decode(key)
            self._master = hmac.new(raw, FINGERPRINT_INFO, hashlib.sha256).digest()
            self._key = key

    @property
    def fernet(self) -> Fernet:
        """The Fernet of the server key (SecretKeyError if the key is unusable)."""
        self._load()
        assert self._fernet is not None
        return self._fernet

    @property
    def master(self) -> bytes:
        """The master key of the egress fingerprints: HMAC-SHA256(server key, info)."""
        self._load()
        assert self._master is not None
        return self._master

    def fingerprint(self, org_id: str, value: str) -> dict[str, Any]:
        """The fingerprint record of ``value`` for ``org_id`` (services/fingerprints.py)."""
        return fingerprint(self.master, org_id, value)

    def changed(self, org_id: str) -> None:
        """A secret of ``org_id`` was written or deleted (committed): drop its cached index."""
        self._versions[org_id] = self._versions.get(org_id, 0) + 1

    async def index(self, org_id: str) -> SecretIndex:
        """The fingerprints of every secret of ``org_id`` (every agent's, deleted agents'
        included). A row without a current fingerprint record (written before they existed,
        or under another key) is decrypted, fingerprinted and updated here, and the value is
        dropped at once; a row the key cannot decrypt is skipped (logged by id and name)."""
        epoch = (self._versions.get(org_id, 0), 0)  # taken before the read (services/cache.py)
        cached = self._indexes.get(org_id, epoch)
        if cached is not None:
            return cached
        async with self.ctx.engine.connect() as conn:
            rows = list(
                await conn.execute(
                    select(
                        agent_secrets.c.id,
                        agent_secrets.c.agent_id,
                        agent_secrets.c.name,
                        agent_secrets.c.ciphertext,
                        agent_secrets.c.fingerprints,
                    ).where(agent_secrets.c.org_id == org_id)
                )
            )
        if not rows:  # no secrets: nothing to find, and no need of the server key
            index = SecretIndex(b"", org_id, [])
            self._indexes.put(org_id, index, epoch)
            return index
        master = self.master
        entries: list[tuple[str, str, dict[str, Any]]] = []
        backfill: list[tuple[str, str, dict[str, Any]]] = []
        for row_id, agent_id, name, ciphertext, prints in rows:
            if not is_current(prints, master):
                try:
                    value = self.fernet.decrypt(ciphertext.encode()).decode(
                        "utf-8", "surrogatepass"
                    )
                except InvalidToken:
                    log.warning("secrets.undecryptable", secret_id=row_id, name=name)
                    continue
                prints = fingerprint(master, org_id, value)
                del value
                backfill.append((row_id, ciphertext, prints))
            entries.append((agent_id, name, prints))
        if backfill:
            async with write_transaction(self.ctx.engine) as conn:
                for row_id, ciphertext, prints in backfill:
                    row = agent_secrets.c
                    await conn.execute(
                        update(agent_secrets)
                        .where(row.id == row_id, row.ciphertext == ciphertext)
                        .values(fingerprints=prints)
                    )
        index = SecretIndex(master, org_id, entries)
        self._indexes.put(org_id, index, epoch)
        return index


def org_secrets(ctx: ServiceContext) -> OrgSecrets:
    """The :class:`OrgSecrets` of ``ctx`` (made on first use; one per process context)."""
    if ctx.org_secrets is None:
        ctx.org_secrets = OrgSecrets(ctx)
    found: OrgSecrets = ctx.org_secrets
    return found


async def org_secret_index(ctx: ServiceContext, org_id: str) -> SecretIndex:
    """The fingerprints of ``org_id``'s secrets (see :meth:`OrgSecrets.index`)."""
    return await org_secrets(ctx).index(org_id)


class SecretService:
    """Set, list (names only) and delete an agent's secrets (org keys only); reveal one to the
    agent's own runner (:meth:`reveal_for_runner`, :class:`RunSecrets`)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def _cipher(self) -> Fernet:
        return org_secrets(self.ctx).fernet

    async def put(
        self, principal: Principal, agent_id: str, name: str, value: str
    ) -> dict[str, Any]:
        """Create or replace secret ``name`` of an agent. Returns its name and times only.

        Stores the Fernet ciphertext and the value's egress fingerprints (keyed MACs of the
        value and its encodings, services/fingerprints.py), and drops the org's cached
        fingerprint index. InvalidRequestError for a bad name or size, NotFoundError for an
        agent outside the caller's org."""
        org_id = require_org_key(principal, "managing agent secrets")
        if not SECRET_NAME.match(name):
            raise InvalidRequestError(
                "secret names are 1-100 characters: letters, digits, '_', '.', '-', not starting "
                "with a digit"
            )
        if not value or len(value.encode("utf-8", "surrogatepass")) > MAX_SECRET_BYTES:
            raise InvalidRequestError(f"a secret value is 1 to {MAX_SECRET_BYTES} bytes")
        keys = org_secrets(self.ctx)
        token = keys.fernet.encrypt(value.encode("utf-8", "surrogatepass")).decode()
        prints = keys.fingerprint(org_id, value)
        ts = now_iso()
        try:
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
                        "fingerprints": prints,
                        "created_at": ts,
                        "updated_at": ts,
                    },
                )
                await record(conn, principal, "secret.put", "agent", agent_id, data={"name": name})
        finally:
            keys.changed(org_id)
        return {"agent_id": agent_id, "name": name, "updated_at": ts}

    async def list_names(
        self,
        principal: Principal,
        agent_id: str,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Names and times of an agent's secrets (never values), by name (a keyset page with
        ``after``/``limit``)."""
        require_org_key(principal, "managing agent secrets")
        async with self.ctx.engine.connect() as conn:
            await own_agent(conn, principal, agent_id)
            q = keyset(
                select(
                    agent_secrets.c.name, agent_secrets.c.created_at, agent_secrets.c.updated_at
                ).where(agent_secrets.c.agent_id == agent_id),
                (agent_secrets.c.name,),
                after,
                limit,
            )
            return [dict(r) for r in (await conn.execute(q)).mappings()]

    async def delete(self, principal: Principal, agent_id: str, name: str) -> None:
        """Delete one secret; NotFoundError when the agent has none of that name."""
        org_id = require_org_key(principal, "managing agent secrets")
        try:
            async with write_transaction(self.ctx.engine) as conn:
                await own_agent(conn, principal, agent_id)
                result = await conn.execute(
                    agent_secrets.delete().where(
                        agent_secrets.c.agent_id == agent_id, agent_secrets.c.name == name
                    )
                )
                if result.rowcount == 0:
                    raise NotFoundError("secret", name)
                await record(
                    conn, principal, "secret.delete", "agent", agent_id, data={"name": name}
                )
        finally:
            org_secrets(self.ctx).changed(org_id)

    async def reveal(
        self,
        *,
        org_id: str,
        agent_id: str,
        name: str,
        principal_kind: str,
        principal_id: str,
        data: dict[str, Any] | None = None,
    ) -> str:
        """Decrypt secret ``name`` of agent ``agent_id`` (of ``org_id``) for a tool running for
        that agent, and audit it in the org as ``secret.revealed`` (resource: the agent; data:
        the name and ``data``; never the value) by ``principal_kind``/``principal_id``.

        Internal: only :class:`RunSecrets` (the in-process runner) and
        :meth:`reveal_for_runner` (the agent's own remote runner) call it. NotFoundError when
        the agent (live) has no such secret (audited as refused), SecretKeyError when the
        server key does not decrypt it."""
        async with self.ctx.engine.connect() as conn:
            token = (
                await conn.execute(
                    select(agent_secrets.c.ciphertext)
                    .join(agents, agents.c.id == agent_secrets.c.agent_id)
                    .where(
                        agent_secrets.c.org_id == org_id,
                        agent_secrets.c.agent_id == agent_id,
                        agent_secrets.c.name == name,
                        agents.c.deleted_at.is_(None),
                    )
                )
            ).scalar_one_or_none()
        row = audit_row(
            org_id=org_id,
            principal_kind=principal_kind,
            principal_id=principal_id,
            action="secret.revealed",
            resource_kind="agent",
            resource_id=agent_id,
            outcome="accepted" if token is not None else "refused",
            reason=None if token is not None else "no such secret",
            data={"name": name, **(data or {})},
        )
        async with write_transaction(self.ctx.engine) as conn:
            await insert_audit(conn, [row])
        if token is None:
            raise NotFoundError("secret", name)
        try:
            return self._cipher().decrypt(token.encode()).decode("utf-8", "surrogatepass")
        except InvalidToken as exc:
            raise SecretKeyError("the secret key does not decrypt this secret") from exc

    async def names(self, org_id: str, agent_id: str) -> list[str]:
        """Internal: the names of an agent's secrets (for :class:`RunSecrets`)."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(agent_secrets.c.name)
                .where(agent_secrets.c.org_id == org_id, agent_secrets.c.agent_id == agent_id)
                .order_by(agent_secrets.c.name)
            )
            return [str(n) for n in (await conn.execute(q)).scalars()]

    async def reveal_for_runner(
        self,
        principal: Principal,
        *,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        name: str,
    ) -> dict[str, Any]:
        """``POST /runners/secrets``: secret ``name`` of ``agent_id`` for the tools of the
        agent's own remote runner, which holds a live claim (``runner_id``) on trigger
        ``trigger_seq`` of ``thread_id``. Returns ``{"agent_id", "name", "value"}``; audited as
        ``secret.revealed`` (name, thread, trigger seq, runner id — never the value).

        Only the agent's own token may ask (scope first, then role): another agent's token,
        an agent or thread outside the caller's scope get NotFoundError (404); an org key or
        user token of the agent's org PermissionDeniedError (403: org keys write secrets, they
        never read them); the agent no longer in the thread PermissionDeniedError; no live
        claim of ``runner_id`` ClaimRequiredError (409); NotFoundError when the agent has no
        such secret (audited as a refused reveal)."""
        if principal.kind == "agent" and principal.subject_id != agent_id:
            raise NotFoundError("agent", agent_id)  # another agent's token: out of its scope
        if principal.kind != "agent":
            async with self.ctx.engine.connect() as conn:
                await own_agent(conn, principal, agent_id)  # scope first: 404 outside the org
            raise PermissionDeniedError(
                f"a {principal.kind} credential cannot read secret values: they are given only "
                "to the agent's own runner, authenticated with that agent's token (an org key "
                "writes secrets but never reads them)"
            )
        org_id = principal.org_id
        assert org_id is not None
        now = time.time()
        async with self.ctx.engine.connect() as conn:
            await credential_in_force(conn, principal)
            await own_agent(conn, principal, agent_id)
            thread, _team = await visible_thread(conn, principal, thread_id)
            if not await agent_in_thread(conn, agent_id, thread):
                raise PermissionDeniedError(
                    f"the agent does not take part in thread {thread_id!r} any more"
                )
            state = await stored_claim(conn, agent_id, thread_id, trigger_seq)
        if (
            state is None
            or state.outcome == "done"
            or state.runner_id != runner_id
            or state.expires_at <= now
        ):
            raise ClaimRequiredError(
                f"runner {runner_id!r} holds no live claim on trigger {trigger_seq} of thread "
                f"{thread_id!r}; secrets are revealed only while the runner answers a trigger "
                "(POST /claims first)"
            )
        value = await self.reveal(
            org_id=org_id,
            agent_id=agent_id,
            name=name,
            principal_kind=principal.kind,
            principal_id=principal.key_id,
            data={"thread_id": thread_id, "trigger_seq": trigger_seq, "runner_id": runner_id},
        )
        return {"agent_id": agent_id, "name": name, "value": value}


class RunSecrets:
    """The secrets of one agent for the tools of one job of the in-process runner.

    Made by the runner for the job's agent and handed to its tools at run time
    (``runtime/tools.py``: ``RunDeps.secrets``). :meth:`get` decrypts one value and audits the
    reveal (``secret.revealed``, principal the agent, data: name, thread and trigger — never
    the value); nothing is cached, logged or shown by ``repr``.
    """

    def __init__(
        self, ctx: ServiceContext, *, org_id: str, agent_id: str, thread_id: str, trigger_id: str
    ) -> None:
        self._service = SecretService(ctx)
        self.org_id = org_id
        self.agent_id = agent_id
        self.thread_id = thread_id
        self.trigger_id = trigger_id

    def __repr__(self) -> str:
        return f"RunSecrets(agent_id={self.agent_id!r})"

    async def names(self) -> list[str]:
        """The names of the agent's secrets."""
        return await self._service.names(self.org_id, self.agent_id)

    async def get(self, name: str) -> str:
        """The value of secret ``name`` (NotFoundError if the agent has none of that name)."""
        return await self._service.reveal(
            org_id=self.org_id,
            agent_id=self.agent_id,
            name=name,
            principal_kind="agent",
            principal_id=self.agent_id,
            data={"thread_id": self.thread_id, "trigger_id": self.trigger_id},
        )
