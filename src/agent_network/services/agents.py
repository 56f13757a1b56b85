"""Agents (persistent identities of an org) and their routines."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import ConflictError, InvalidRequestError, NotFoundError
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.claims import agent_in_thread
from agent_network.services.models import check_model, resolve_model_name
from agent_network.services.orgs import soft_delete_member
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import Principal
from agent_network.services.rules import RuleService, RuleViolationError, parse_rule
from agent_network.services.scope import own_agent, require_org, visible_thread
from agent_network.services.triage import parse_config
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, routines

LOOKUP_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
ROUTINE_EVENTS = ("thread.message_added",)
ROUTINE_HANDLERS = ("preset",)
ROUTINE_PRESETS = ("participate", "triage")
AGENT_FIELDS = (
    "id",
    "org_id",
    "name",
    "lookup_key",
    "identity",
    "model",
    "metadata",
    "resume",
    "created_at",
    "updated_at",
)
MAX_RESUME_ITEMS = 50  # capabilities / domains, each
MAX_RESUME_ITEM = 200  # characters of one capability or domain
MAX_RESUME_SUMMARY = 4000  # characters
ROUTINE_FIELDS = (
    "id",
    "agent_id",
    "name",
    "event_type",
    "handler_type",
    "preset_name",
    "config",
    "status",
    "created_at",
    "updated_at",
)


def _agent(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in AGENT_FIELDS}


def _routine(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ROUTINE_FIELDS}


def check_resume(value: Any) -> dict[str, Any] | None:
    """An agent's resume as stored: ``{"capabilities": [str], "domains": [str], "summary":
    str}`` (missing keys default to empty), or None for None. InvalidRequestError for another
    shape, more than 50 capabilities or domains, an empty or >200-character item, or a summary
    longer than 4000 characters."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("resume must be an object {capabilities, domains, summary}")
    unknown = sorted(set(value) - {"capabilities", "domains", "summary"})
    if unknown:
        raise InvalidRequestError(f"resume: unknown fields {unknown}")
    out: dict[str, Any] = {}
    for key in ("capabilities", "domains"):
        items = value.get(key) or []
        if not isinstance(items, list) or len(items) > MAX_RESUME_ITEMS:
            raise InvalidRequestError(f"resume.{key} must be a list of at most 50 strings")
        for item in items:
            if not isinstance(item, str) or not 0 < len(item) <= MAX_RESUME_ITEM:
                raise InvalidRequestError(
                    f"resume.{key}: each item is a string of 1-{MAX_RESUME_ITEM} characters"
                )
        out[key] = list(items)
    summary = value.get("summary") or ""
    if not isinstance(summary, str) or len(summary) > MAX_RESUME_SUMMARY:
        raise InvalidRequestError(
            f"resume.summary must be a string of at most {MAX_RESUME_SUMMARY} characters"
        )
    out["summary"] = summary
    return out


def _check_lookup_key(key: str) -> str:
    if not LOOKUP_KEY.match(key):
        raise InvalidRequestError(
            f"lookup_key {key!r} is invalid: use 1-100 lowercase letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return key


class AgentService:
    """Agents and routines of the caller's org."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create_agent(
        self,
        principal: Principal,
        *,
        name: str,
        lookup_key: str,
        identity: str = "",
        model: str | None = None,
        metadata: dict[str, Any] | None = None,
        resume: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create an agent; returns its dict (AGENT_FIELDS). ``resume`` is the agent's claimed
        ``{"capabilities", "domains", "summary"}`` (see :func:`check_resume`; None: none).
        ConflictError when ``lookup_key`` is taken in the org; InvalidRequestError for an empty
        name, a bad lookup_key or a bad resume."""
        org_id = require_org(principal)
        if not name.strip():
            raise InvalidRequestError("agent name must not be empty")
        ts = now_iso()
        row = {
            "id": new_id("agt"),
            "org_id": org_id,
            "name": name.strip(),
            "lookup_key": _check_lookup_key(lookup_key),
            "identity": identity,
            "model": model or None,
            "metadata": metadata or {},
            "resume": check_resume(resume),
            "created_at": ts,
            "updated_at": ts,
        }
        try:
            async with write_transaction(self.ctx.engine) as conn:
                await conn.execute(agents.insert().values(**row))
                await record(conn, principal, "agent.create", "agent", str(row["id"]))
        except IntegrityError:
            raise ConflictError(
                f"an agent with lookup_key {lookup_key!r} already exists in this org"
            ) from None
        return row

    async def list_agents(
        self, principal: Principal, *, after: Key | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The caller's live agents, oldest first (by ``(created_at, id)``; a keyset page with
        ``after``/``limit``, see :mod:`~agent_network.services.paging`)."""
        org_id = require_org(principal)
        async with self.ctx.engine.connect() as conn:
            q = keyset(
                select(agents).where(agents.c.org_id == org_id, agents.c.deleted_at.is_(None)),
                (agents.c.created_at, agents.c.id),
                after,
                limit,
            )
            return [_agent(r) for r in (await conn.execute(q)).mappings()]

    async def get_agent(self, principal: Principal, agent_id: str) -> dict[str, Any]:
        """One of the caller's agents; NotFoundError otherwise."""
        async with self.ctx.engine.connect() as conn:
            return _agent(await own_agent(conn, principal, agent_id))

    async def update_agent(
        self, principal: Principal, agent_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change any of name, lookup_key, identity, model, metadata, resume (None clears
        it; see :func:`check_resume`). Returns the agent's dict; NotFoundError outside the
        caller's org, ConflictError for a taken lookup_key, InvalidRequestError for bad values."""
        values = {
            k: v
            for k, v in changes.items()
            if k in ("name", "lookup_key", "identity", "model", "metadata", "resume")
        }
        if "resume" in values:
            values["resume"] = check_resume(values["resume"])
        if "lookup_key" in values:
            _check_lookup_key(values["lookup_key"])
        if "name" in values and not str(values["name"]).strip():
            raise InvalidRequestError("agent name must not be empty")
        try:
            async with write_transaction(self.ctx.engine) as conn:
                await own_agent(conn, principal, agent_id)
                if "model" in values and await self._has_active_routine(conn, agent_id):
                    # the same check as at routine creation: never a routine on a dead model
                    check_model(resolve_model_name(values["model"], self.ctx.settings.model))
                values["updated_at"] = now_iso()
                await conn.execute(update(agents).where(agents.c.id == agent_id).values(**values))
                await record(conn, principal, "agent.update", "agent", agent_id)
                row = _agent(await own_agent(conn, principal, agent_id))
        except IntegrityError:
            raise ConflictError("that lookup_key is already used by another agent") from None
        self.ctx.config_epoch += 1  # cached post decisions hold the agent's old name
        return row

    @staticmethod
    async def _has_active_routine(conn: AsyncConnection, agent_id: str) -> bool:
        q = select(routines.c.id).where(
            routines.c.agent_id == agent_id, routines.c.status == "active"
        )
        return (await conn.execute(q.limit(1))).first() is not None

    async def delete_agent(self, principal: Principal, agent_id: str) -> None:
        """Soft-delete an agent: it leaves every team and network; its routines stop."""
        async with write_transaction(self.ctx.engine) as conn:
            await own_agent(conn, principal, agent_id)
            await soft_delete_member(conn, agents, agent_id)
            await conn.execute(
                update(routines).where(routines.c.agent_id == agent_id).values(status="paused")
            )
            await record(conn, principal, "agent.delete", "agent", agent_id)
        await self.ctx.access_removed()  # before answering: see ServiceContext

    # --------------------------------------------------------------- routines

    async def create_routine(
        self,
        principal: Principal,
        agent_id: str,
        *,
        name: str,
        event_type: str,
        handler_type: str,
        preset_name: str | None,
        config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Attach a routine to an agent.

        A ``triage`` routine's ``config`` is checked now (:meth:`check_triage_config`) and
        stored in its normal form. Raises InvalidRequestError for an unsupported
        event/handler/preset or a bad triage config (naming the key), and ModelUnavailableError
        when the agent's model cannot run here (checked now, not later).
        """
        if event_type not in ROUTINE_EVENTS:
            raise InvalidRequestError(f"event_type must be one of {', '.join(ROUTINE_EVENTS)}")
        if handler_type not in ROUTINE_HANDLERS:
            raise InvalidRequestError(f"handler_type must be one of {', '.join(ROUTINE_HANDLERS)}")
        if preset_name not in ROUTINE_PRESETS:
            raise InvalidRequestError(f"preset_name must be one of {', '.join(ROUTINE_PRESETS)}")
        async with write_transaction(self.ctx.engine) as conn:
            agent = await own_agent(conn, principal, agent_id)
            check_model(resolve_model_name(agent["model"], self.ctx.settings.model))
            if preset_name == "triage":
                config = await self.check_triage_config(conn, principal, agent, config)
            ts = now_iso()
            row = {
                "id": new_id("rtn"),
                "org_id": agent["org_id"],
                "agent_id": agent_id,
                "name": name,
                "event_type": event_type,
                "handler_type": handler_type,
                "preset_name": preset_name,
                "config": config or {},
                "status": "active",
                "created_at": ts,
                "updated_at": ts,
            }
            await conn.execute(routines.insert().values(**row))
            await record(conn, principal, "routine.create", "routine", row["id"])
        return _routine(row)

    async def check_triage_config(
        self, conn: AsyncConnection, principal: Principal, agent: Any, raw: Any
    ) -> dict[str, Any]:
        """Validate a ``triage`` routine's config for ``agent`` (a row of ``agents``) and return
        it in normal form (``intake`` a list; see :func:`agent_network.services.triage.parse_config`
        for the shape).

        Every intake and route thread must be visible to ``principal``, the agent must take part
        in it (a member of its team or network; a participant if it is restricted), it must be
        live and let any member speak (adapter ``open``: a turn-taking protocol would refuse the
        forwards), and the agent's rule must let it post there (``allowed_adapters``,
        ``outbound_to``). Raises InvalidRequestError (422) naming the bad key, e.g.
        ``config.routes.billing.thread_id``; a thread that does not exist and one outside the
        caller's scope get the same message (nothing about other orgs leaks).
        """
        config = parse_config(raw)
        keyed = [(f"config.intake[{i}]", tid) for i, tid in enumerate(config.intake)] + [
            (f"config.routes.{label}.thread_id", route.thread_id)
            for label, route in config.routes.items()
        ]
        rule = parse_rule(agent["rule"])
        for key, tid in keyed:
            try:
                thread, _team = await visible_thread(conn, principal, tid)
            except NotFoundError:
                raise InvalidRequestError(f"{key}: thread {tid!r} not found") from None
            if not await agent_in_thread(conn, agent["id"], thread):
                raise InvalidRequestError(
                    f"{key}: agent {agent['name']!r} does not take part in thread {tid!r} (add "
                    "it to the thread's team or network, and as a participant of a restricted "
                    "thread)"
                )
            state = await self.ctx.hub.state(tid)
            if state.status == "closed":
                raise InvalidRequestError(f"{key}: thread {tid!r} is closed")
            if state.adapter != "open":
                raise InvalidRequestError(
                    f"{key}: thread {tid!r} is a {state.adapter} thread; triage reads and posts "
                    "in threads where any member may speak (adapter 'open')"
                )
            try:
                RuleService.check_adapter(agent, rule, state.adapter)
                await RuleService.check_outbound(conn, agent, rule, thread["team_id"])
            except RuleViolationError as err:
                raise InvalidRequestError(f"{key}: {err.message}") from None
        return config.model_dump(mode="json")

    async def list_routines(
        self,
        principal: Principal,
        agent_id: str,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Routines of one of the caller's agents, oldest first (a keyset page by
        ``(created_at, id)`` with ``after``/``limit``)."""
        async with self.ctx.engine.connect() as conn:
            await own_agent(conn, principal, agent_id)
            q = keyset(
                select(routines).where(routines.c.agent_id == agent_id),
                (routines.c.created_at, routines.c.id),
                after,
                limit,
            )
            return [_routine(r) for r in (await conn.execute(q)).mappings()]

    async def _own_routine(
        self, conn: AsyncConnection, principal: Principal, agent_id: str, routine_id: str
    ) -> Any:
        await own_agent(conn, principal, agent_id)
        row = (
            (
                await conn.execute(
                    select(routines).where(
                        routines.c.id == routine_id, routines.c.agent_id == agent_id
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise NotFoundError("routine", routine_id)
        return row

    async def update_routine(
        self, principal: Principal, agent_id: str, routine_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change ``name``, ``config`` or ``status`` (``active``/``paused``) of a routine.

        A ``triage`` routine's new ``config`` is checked as at creation
        (:meth:`check_triage_config`); so is its stored config when it is activated (its
        threads may have changed meanwhile). InvalidRequestError for a bad status or config;
        NotFoundError for a routine or agent outside the caller's org."""
        values = {k: v for k, v in changes.items() if k in ("name", "config", "status")}
        if "status" in values and values["status"] not in ("active", "paused"):
            raise InvalidRequestError("status must be 'active' or 'paused'")
        async with write_transaction(self.ctx.engine) as conn:
            current = await self._own_routine(conn, principal, agent_id, routine_id)
            if current["preset_name"] == "triage" and (
                "config" in values or values.get("status") == "active"
            ):
                agent = await own_agent(conn, principal, agent_id)
                values["config"] = await self.check_triage_config(
                    conn, principal, agent, values.get("config", current["config"])
                )
            values["updated_at"] = now_iso()
            await conn.execute(update(routines).where(routines.c.id == routine_id).values(**values))
            await record(conn, principal, "routine.update", "routine", routine_id, data=values)
            return _routine(await self._own_routine(conn, principal, agent_id, routine_id))

    async def delete_routine(self, principal: Principal, agent_id: str, routine_id: str) -> None:
        """Remove a routine."""
        async with write_transaction(self.ctx.engine) as conn:
            await self._own_routine(conn, principal, agent_id, routine_id)
            await conn.execute(routines.delete().where(routines.c.id == routine_id))
            await record(conn, principal, "routine.delete", "routine", routine_id)
