"""Threads: creation, messages (through the hub), history reads, chain verification."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ThreadClosedError,
)
from agent_network.hub import (
    EV_BUDGET_SET,
    EV_MESSAGE,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_CREATED,
    EV_VISIBILITY_SET,
    VerifyReport,
)
from agent_network.model.envelope import Actor, Envelope, client_key, sender_scoped_key
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.policy import (
    EgressRefusedError,
    apply_egress,
    audit_egress,
    read_egress_policy,
)
from agent_network.services.principal import Principal
from agent_network.services.rules import RuleService
from agent_network.services.scope import (
    own_agent,
    own_user,
    require_org,
    system_actor,
    team_visible_to,
    thread_readable,
    visible_team,
    visible_thread,
)
from agent_network.store.tables import (
    agents,
    members,
    orgs,
    teams,
    thread_participants,
    threads,
    users,
)

MAX_CONTENT = 32_000  # characters
MAX_BUDGET = 1000
MAX_KEY = 150  # characters of a client idempotency key (stored as "<sender_id>:<key>")


class ThreadService:
    """Threads of visible teams and networks."""

    def __init__(self, ctx: ServiceContext, *, rules: RuleService | None = None) -> None:
        self.ctx = ctx
        self.rules = rules or RuleService(ctx)

    async def create(
        self,
        principal: Principal,
        team_id: str,
        title: str,
        *,
        kind: str | None = None,
        agent_budget: int | None = None,
        visibility: str = "members",
        participants: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Create a thread on a visible, open team or network; its WAL opens with thread.created.

        ``visibility`` is ``members`` (everyone in the team/network) or ``restricted``: only
        ``participants`` (``(kind, id)`` of members of the team/network, any org) read and post
        in it. InvalidRequestError for a participant who is not a member.
        """
        org_id = require_org(principal)
        if not title.strip():
            raise InvalidRequestError("thread title must not be empty")
        if visibility not in ("members", "restricted"):
            raise InvalidRequestError("visibility must be 'members' or 'restricted'")
        if visibility == "members" and participants:
            raise InvalidRequestError("participants are only for a restricted thread")
        if visibility == "restricted" and not participants:
            raise InvalidRequestError("a restricted thread needs at least one participant")
        budget = self.ctx.settings.agent_budget if agent_budget is None else agent_budget
        _check_budget(budget)
        async with self.ctx.engine.connect() as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
            people = await self._members_of(conn, team_id, participants or [])
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
            sender=system_actor(principal),
            acted_by=(principal.kind, principal.key_id),
        )
        row = {
            "id": thread_id,
            "team_id": team_id,
            "org_id": org_id,
            "title": title.strip(),
            "adapter": "open",
            "visibility": visibility,
            "created_at": now_iso(),
        }
        async with self.ctx.engine.begin() as conn:
            await conn.execute(threads.insert().values(**row))
            await _add_participants(conn, thread_id, people)
            await record(conn, principal, "thread.create", "thread", thread_id)
        return await self.get(principal, thread_id)

    @staticmethod
    async def _members_of(
        conn: AsyncConnection, team_id: str, wanted: list[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """``wanted`` as member rows of the team; InvalidRequestError for a non-member."""
        out = []
        for kind, member_id in wanted:
            row = (
                (
                    await conn.execute(
                        select(members.c.member_kind, members.c.member_id, members.c.org_id).where(
                            members.c.team_id == team_id,
                            members.c.member_kind == kind,
                            members.c.member_id == member_id,
                        )
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise InvalidRequestError(
                    f"{kind} {member_id!r} is not a member of this team or network"
                )
            out.append(dict(row))
        return out

    async def widen(
        self,
        principal: Principal,
        thread_id: str,
        *,
        visibility: str | None = None,
        participants: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Widen who sees a restricted thread: add participants, or open it to all members.

        Visibility can be widened, never narrowed: ``members`` -> ``restricted`` is refused
        (InvalidRequestError). Each change is also an envelope in the thread's WAL.
        """
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
            people = await self._members_of(conn, team["id"], participants or [])
        if visibility == "restricted" and row["visibility"] == "members":
            raise InvalidRequestError("visibility can be widened, never narrowed")
        if visibility not in (None, "members", "restricted"):
            raise InvalidRequestError("visibility must be 'members' or 'restricted'")
        system = system_actor(principal)
        if people and row["visibility"] == "restricted":
            await self.ctx.hub.append(
                thread_id,
                type=EV_PARTICIPANTS_ADDED,
                sender=system,
                data={"participants": [[p["member_kind"], p["member_id"]] for p in people]},
                acted_by=(principal.kind, principal.key_id),
            )
            async with self.ctx.engine.begin() as conn:
                await _add_participants(conn, thread_id, people)
                await record(conn, principal, "thread.participants_add", "thread", thread_id)
        if visibility == "members" and row["visibility"] == "restricted":
            await self.ctx.hub.append(
                thread_id,
                type=EV_VISIBILITY_SET,
                data={"visibility": "members"},
                sender=system,
                acted_by=(principal.kind, principal.key_id),
            )
            async with self.ctx.engine.begin() as conn:
                await conn.execute(
                    update(threads).where(threads.c.id == thread_id).values(visibility="members")
                )
                await record(conn, principal, "thread.visibility_widen", "thread", thread_id)
        return await self.get(principal, thread_id)

    async def list_threads(
        self, principal: Principal, team_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Threads visible to the caller, optionally of one team/network."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(threads)
                .join(teams, teams.c.id == threads.c.team_id)
                .where(
                    threads.c.deleted_at.is_(None),
                    team_visible_to(principal),
                    thread_readable(principal),
                )
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
            "visibility": row["visibility"],
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
            sender=system_actor(principal),
            acted_by=(principal.kind, principal.key_id),
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
        as its own user/agent (naming anyone else is refused). In a **network** thread the
        egress policy of the sender's org is applied first (services/policy.py): a ``refuse``
        rule raises EgressRefusedError and nothing is written; ``redact`` rules replace their
        matches and the redacted text is what is appended. Each refusal (``egress.refused``) and
        each redaction (``egress.redacted``) is audited with the rule names, never the text.

        Raises InvalidRequestError (empty/too long content, not exactly one sender), NotFoundError
        (thread/sender outside scope), PermissionDeniedError (sender not a member, or not the
        token's own subject), EgressRefusedError — each of these audited in the caller's own org
        as a refused ``envelope.message`` — and ThreadClosedError, RunawayBudgetError (audited
        by the hub).
        """
        try:
            sender, content, redactions = await self._check_post(
                principal, thread_id, content, agent_id, user_id, idempotency_key
            )
        except (
            NotFoundError,
            PermissionDeniedError,
            InvalidRequestError,
            EgressRefusedError,
        ) as err:
            await self._audit_refused_post(principal, thread_id, err)
            raise
        env = await self.ctx.hub.append(
            thread_id,
            type=EV_MESSAGE,
            data={"content": content},
            sender=sender,
            idempotency_key=sender_scoped_key(sender.id, idempotency_key)
            if idempotency_key
            else None,
            causation_id=causation_id,
            acted_by=(principal.kind, principal.key_id),
        )
        if redactions:
            async with self.ctx.engine.begin() as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.redacted",
                    thread_id,
                    redactions,
                    org_id=sender.org_id,
                    data=_egress_data(sender, envelope_id=env.id),
                )
        async with self.ctx.engine.connect() as conn:
            return (await render(conn, [env]))[0]

    async def _check_post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        agent_id: str | None,
        user_id: str | None,
        idempotency_key: str | None,
    ) -> tuple[Actor, str, list[str]]:
        """Everything ``post`` checks before the append: ``(sender, content to append, names of
        the redact rules applied)``; raises the refusals ``post`` documents."""
        agent_id, user_id = _sender_for(principal, agent_id, user_id)
        if not content.strip():
            raise InvalidRequestError("message content must not be empty")
        if len(content) > MAX_CONTENT:
            raise InvalidRequestError(f"message content is longer than {MAX_CONTENT} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise InvalidRequestError(f"idempotency_key must be 1-{MAX_KEY} characters")
        async with self.ctx.engine.connect() as conn:
            thread, team = await visible_thread(conn, principal, thread_id)
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
            if thread["visibility"] == "restricted" and not await _is_participant(
                conn, thread_id, sender
            ):
                raise PermissionDeniedError(
                    f"{sender.kind} {who['name']!r} is not a participant of this restricted thread"
                )
            if sender.kind == "agent":
                state = await self.ctx.hub.state(thread_id)
                await self.rules.check_send(
                    conn, who, thread_id=thread_id, team_id=team["id"], adapter=state.adapter
                )
            if team["kind"] != "network":
                return sender, content, []  # org-internal threads are not filtered
            policy = await read_egress_policy(conn, sender.org_id)
        try:
            content, redactions = apply_egress(policy, content)
        except EgressRefusedError as err:
            async with self.ctx.engine.begin() as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.refused",
                    thread_id,
                    err.rules,
                    org_id=sender.org_id,
                    data=_egress_data(sender),
                )
            raise
        return sender, content, redactions

    async def _audit_refused_post(
        self, principal: Principal, thread_id: str, err: AgentNetworkError
    ) -> None:
        """Audit a refused post in the caller's own org (principal = the credential); never the
        message text."""
        async with self.ctx.engine.begin() as conn:
            await record(
                conn,
                principal,
                "envelope.message",
                "thread",
                thread_id[:40],  # the id as given (a guess may be longer than any real one)
                outcome="refused",
                reason=f"{err.code}: {err.message}",
            )

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


async def _is_participant(conn: AsyncConnection, thread_id: str, sender: Actor) -> bool:
    q = select(thread_participants.c.member_id).where(
        thread_participants.c.thread_id == thread_id,
        thread_participants.c.member_kind == sender.kind,
        thread_participants.c.member_id == sender.id,
    )
    return (await conn.execute(q)).first() is not None


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


async def _add_participants(
    conn: AsyncConnection, thread_id: str, people: list[dict[str, Any]]
) -> None:
    """Insert participant rows (an existing participant is left as it is)."""
    for p in people:
        exists_q = select(thread_participants.c.member_id).where(
            thread_participants.c.thread_id == thread_id,
            thread_participants.c.member_kind == p["member_kind"],
            thread_participants.c.member_id == p["member_id"],
        )
        if (await conn.execute(exists_q)).first() is None:
            await conn.execute(
                thread_participants.insert().values(
                    thread_id=thread_id,
                    member_kind=p["member_kind"],
                    member_id=p["member_id"],
                    org_id=p["org_id"],
                    created_at=now_iso(),
                )
            )


def _egress_data(sender: Actor, **extra: Any) -> dict[str, Any]:
    return {"sender": {"kind": sender.kind, "id": sender.id}, **extra}


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
