"""Threads: creation, messages (through the hub), history reads, chain verification."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    InvalidRequestError,
    PermissionDeniedError,
    ThreadClosedError,
)
from agent_network.hub import EV_BUDGET_SET, EV_MESSAGE, EV_THREAD_CREATED, VerifyReport
from agent_network.model.envelope import Actor, Envelope, client_key, sender_scoped_key
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.principal import Principal
from agent_network.services.scope import (
    own_agent,
    own_user,
    require_org,
    team_visible_to,
    visible_team,
    visible_thread,
)
from agent_network.store.tables import agents, members, orgs, teams, threads, users

MAX_CONTENT = 32_000  # characters
MAX_BUDGET = 1000
MAX_KEY = 150  # characters of a client idempotency key (stored as "<sender_id>:<key>")


class ThreadService:
    """Threads of visible teams and networks."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create(
        self,
        principal: Principal,
        team_id: str,
        title: str,
        *,
        kind: str | None = None,
        agent_budget: int | None = None,
    ) -> dict[str, Any]:
        """Create a thread on a visible, open team or network; its WAL opens with thread.created."""
        org_id = require_org(principal)
        if not title.strip():
            raise InvalidRequestError("thread title must not be empty")
        budget = self.ctx.settings.agent_budget if agent_budget is None else agent_budget
        _check_budget(budget)
        async with self.ctx.engine.connect() as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
        if team["status"] == "closed":
            raise ThreadClosedError(f"the {team['kind']} is closed; no new threads")
        thread_id = new_id("thr")
        await self.ctx.hub.append(
            thread_id,
            type=EV_THREAD_CREATED,
            data={
                "title": title.strip(),
                "team_id": team_id,
                "adapter": "open",
                "agent_budget": budget,
            },
            sender=Actor("system", principal.key_id, org_id),
        )
        row = {
            "id": thread_id,
            "team_id": team_id,
            "org_id": org_id,
            "title": title.strip(),
            "adapter": "open",
            "created_at": now_iso(),
        }
        async with self.ctx.engine.begin() as conn:
            await conn.execute(threads.insert().values(**row))
            await record(conn, principal, "thread.create", "thread", thread_id)
        return await self.get(principal, thread_id)

    async def list_threads(
        self, principal: Principal, team_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Threads visible to the caller, optionally of one team/network."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(threads)
                .join(teams, teams.c.id == threads.c.team_id)
                .where(threads.c.deleted_at.is_(None), team_visible_to(principal))
                .order_by(threads.c.created_at)
            )
            if team_id is not None:
                await visible_team(conn, principal, team_id)
                q = q.where(threads.c.team_id == team_id)
            rows = list((await conn.execute(q)).mappings())
        return [await self._describe(r) for r in rows]

    async def get(self, principal: Principal, thread_id: str) -> dict[str, Any]:
        """A visible thread with its folded state (status, last_seq, budget)."""
        async with self.ctx.engine.connect() as conn:
            row, _team = await visible_thread(conn, principal, thread_id)
        return await self._describe(row)

    async def _describe(self, row: Any) -> dict[str, Any]:
        state = await self.ctx.hub.state(row["id"])
        return {
            "id": row["id"],
            "team_id": row["team_id"],
            "org_id": row["org_id"],
            "title": row["title"],
            "adapter": state.adapter,
            "status": state.status,
            "last_seq": state.last_seq,
            "agent_budget": state.agent_budget,
            "consecutive_agent_messages": state.consecutive_agent,
            "created_at": row["created_at"],
        }

    async def set_budget(self, principal: Principal, thread_id: str, budget: int) -> dict[str, Any]:
        """Set the thread's budget of consecutive agent messages (org that created it only)."""
        _check_budget(budget)
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
        if principal.org_id not in (row["org_id"], team["org_id"]):
            raise PermissionDeniedError("only the org that created the thread or hosts it may")
        await self.ctx.hub.append(
            thread_id,
            type=EV_BUDGET_SET,
            data={"agent_budget": budget},
            sender=Actor("system", principal.key_id, require_org(principal)),
        )
        return await self.get(principal, thread_id)

    async def post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
    ) -> dict[str, Any]:
        """Post a message as one of the caller's own agents or users who is a thread member.

        An org key names the sender (``agent_id`` or ``user_id``); a user or agent token posts
        as its own user/agent (naming anyone else is refused). Raises InvalidRequestError
        (empty/too long content, not exactly one sender), NotFoundError (thread/sender outside
        scope), PermissionDeniedError (sender not a member, or not the token's own subject),
        ThreadClosedError, RunawayBudgetError.
        """
        agent_id, user_id = _sender_for(principal, agent_id, user_id)
        if not content.strip():
            raise InvalidRequestError("message content must not be empty")
        if len(content) > MAX_CONTENT:
            raise InvalidRequestError(f"message content is longer than {MAX_CONTENT} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise InvalidRequestError(f"idempotency_key must be 1-{MAX_KEY} characters")
        async with self.ctx.engine.connect() as conn:
            _thread, team = await visible_thread(conn, principal, thread_id)
            if agent_id is not None:
                who = await own_agent(conn, principal, agent_id)
                sender = Actor("agent", who["id"], who["org_id"], who["name"])
            else:
                assert user_id is not None
                who = await own_user(conn, principal, user_id)
                sender = Actor("user", who["id"], who["org_id"], who["name"])
            member = (
                await conn.execute(
                    select(members.c.role).where(
                        members.c.team_id == team["id"],
                        members.c.member_kind == sender.kind,
                        members.c.member_id == sender.id,
                    )
                )
            ).first()
            if member is None:
                raise PermissionDeniedError(
                    f"{sender.kind} {who['name']!r} is not a member of this thread's {team['kind']}"
                )
        env = await self.ctx.hub.append(
            thread_id,
            type=EV_MESSAGE,
            data={"content": content},
            sender=sender,
            idempotency_key=sender_scoped_key(sender.id, idempotency_key)
            if idempotency_key
            else None,
            causation_id=causation_id,
        )
        async with self.ctx.engine.connect() as conn:
            return (await render(conn, [env]))[0]

    async def envelopes(
        self,
        principal: Principal,
        thread_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait: float = 0.0,
        messages_only: bool = True,
    ) -> dict[str, Any]:
        """Envelopes with ``seq > after`` (at most ``limit``, 1-1000), rendered with sender names.

        With ``wait`` > 0 (seconds, at most 60) and nothing new yet, waits for the next envelope.
        Returns ``{"items": [...], "next_after": seq}``; pass ``next_after`` back as ``after``.
        """
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000")
        if after < 0:
            raise InvalidRequestError("after must be >= 0")
        if not 0 <= wait <= 60:
            raise InvalidRequestError("wait must be between 0 and 60 seconds")
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        envs = await self.ctx.hub.read(thread_id, after=after, limit=limit)
        if not envs and wait > 0 and await self.ctx.hub.wait_for(thread_id, after, wait):
            envs = await self.ctx.hub.read(thread_id, after=after, limit=limit)
        next_after = envs[-1].seq if envs else after
        if messages_only:
            envs = [e for e in envs if e.type == EV_MESSAGE]
        async with self.ctx.engine.connect() as conn:
            items = await render(conn, envs)
        return {"items": items, "next_after": next_after}

    async def verify(self, principal: Principal, thread_id: str) -> VerifyReport:
        """Recompute the thread's hash chain (any member org may verify shared history)."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        return await self.ctx.hub.verify(thread_id)


def _sender_for(
    principal: Principal, agent_id: str | None, user_id: str | None
) -> tuple[str | None, str | None]:
    """The ``(agent_id, user_id)`` a post is sent as; tokens may only send as themselves."""
    if principal.is_member_scoped:
        named = agent_id if principal.kind == "agent" else user_id
        other = user_id if principal.kind == "agent" else agent_id
        if other is not None or (named is not None and named != principal.subject_id):
            raise PermissionDeniedError(
                f"a {principal.kind} token posts only as its own {principal.kind}"
            )
        subject = principal.subject_id
        return (subject, None) if principal.kind == "agent" else (None, subject)
    if (agent_id is None) == (user_id is None):
        raise InvalidRequestError("give exactly one of agent_id or user_id as the sender")
    return agent_id, user_id


def _check_budget(budget: int) -> None:
    if not 0 <= budget <= MAX_BUDGET:
        raise InvalidRequestError(f"agent_budget must be between 0 and {MAX_BUDGET}")


async def sender_names(
    conn: AsyncConnection, envs: Iterable[Envelope]
) -> dict[str, tuple[str, str]]:
    """``sender_id -> (display name, org name)`` for the senders of ``envs``."""
    ids: dict[str, set[str]] = {"agent": set(), "user": set()}
    org_ids: set[str] = set()
    for e in envs:
        if e.sender_kind in ids:
            ids[e.sender_kind].add(e.sender_id)
        org_ids.add(e.sender_org_id)
    names: dict[str, str] = {}
    for kind, table in (("agent", agents), ("user", users)):
        if ids[kind]:
            q = select(table.c.id, table.c.name).where(table.c.id.in_(ids[kind]))
            names.update({r[0]: r[1] for r in await conn.execute(q)})
    org_names = {}
    if org_ids:
        q = select(orgs.c.id, orgs.c.name).where(orgs.c.id.in_(org_ids))
        org_names = {r[0]: r[1] for r in await conn.execute(q)}
    out: dict[str, tuple[str, str]] = {}
    for e in envs:
        out[e.sender_id] = (
            names.get(e.sender_id, "system" if e.sender_kind == "system" else "(deleted)"),
            org_names.get(e.sender_org_id, ""),
        )
    return out


async def render(conn: AsyncConnection, envs: list[Envelope]) -> list[dict[str, Any]]:
    """Envelopes as API dicts: seq, id, type, content, data, sender (kind, id, name, org)."""
    names = await sender_names(conn, envs)
    out = []
    for e in envs:
        name, org_name = names.get(e.sender_id, ("", ""))
        out.append(
            {
                "id": e.id,
                "thread_id": e.thread_id,
                "seq": e.seq,
                "type": e.type,
                "content": e.data.get("content") if e.type == EV_MESSAGE else None,
                "data": e.data,
                "sender": {
                    "kind": e.sender_kind,
                    "id": e.sender_id,
                    "name": name,
                    "org_id": e.sender_org_id,
                    "org_name": org_name,
                },
                "causation_id": e.causation_id,
                "idempotency_key": client_key(e.sender_id, e.idempotency_key),
                "created_at": e.created_at,
                "hash": e.hash,
                "prev_hash": e.prev_hash,
            }
        )
    return out
