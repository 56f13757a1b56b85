"""Threads: creation, messages (through the hub), history reads, chain verification."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
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
from agent_network.model.envelope import Actor, Envelope, client_key
from agent_network.model.ids import new_id, now_iso
from agent_network.model.rule import Rule
from agent_network.services.base import ServiceContext, record
from agent_network.services.cache import DecisionCache
from agent_network.services.claims import stored_key
from agent_network.services.policy import (
    EgressPolicy,
    EgressRefusedError,
    apply_egress,
    audit_egress,
    policy_from_row,
)
from agent_network.services.principal import Principal
from agent_network.services.rules import AgentRow, RuleService, parse_rule
from agent_network.services.scope import (
    credential_in_force,
    own_agent,
    own_user,
    post_access,
    require_org,
    system_actor,
    team_visible_to,
    thread_readable,
    visible_team,
    visible_thread,
)
from agent_network.store.tables import (
    agents,
    envelopes,
    members,
    org_policies,
    orgs,
    teams,
    thread_participants,
    threads,
    users,
)

SenderKind = Literal["agent", "user"]

MAX_CONTENT = 32_000  # characters
MAX_BUDGET = 1000
MAX_KEY = 150  # characters of a client idempotency key (stored as "<sender_id>:<key>")


class ThreadService:
    """Threads of visible teams and networks.

    ``grants`` caches positive post decisions (:class:`PostGrant`, see :meth:`post`); posts
    that miss it while another post is already making the same grant wait for that one.
    """

    def __init__(self, ctx: ServiceContext, *, rules: RuleService | None = None) -> None:
        self.ctx = ctx
        self.rules = rules or RuleService(ctx)
        self.grants: DecisionCache[PostGrant] = DecisionCache()
        self._loading: dict[Hashable, anyio.Event] = {}  # grants being made, by cache key

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
        self.ctx.config_epoch += 1  # cached post decisions hold the thread's old visibility
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

        ``causation_id`` names the envelope of this thread the message answers. An agent's reply
        key ``reply:<agent_id>:<causation_id>`` is stored unscoped, the same key the in-process
        runner uses, so a remote runner's reply and an in-process one collide
        (``services/claims.py`` :func:`stored_key`); every other key is scoped to its sender.

        Returns the stored envelope rendered like the REST items (:func:`render_envelope`).

        Cost: the scope checks (thread visible, sender one of the caller's own, a member, a
        participant of a restricted thread), the outbound_to rule check and the egress policy
        are one query, and a pass is cached per ``(principal, thread, sender)`` as a
        :class:`PostGrant` (services/cache.py: tagged with ``access_epoch`` and
        ``config_epoch``, at most ``DECISION_TTL`` s old), so a repeated post needs no query
        before the append. Content checks, ``causation_id``, the rule's adapter, delegation,
        concurrency and rate checks, and the egress policy's matching run on every post;
        refusals are never cached.

        Raises InvalidRequestError (empty/too long content, not exactly one sender, a
        ``causation_id`` that is no envelope of this thread), NotFoundError
        (thread/sender outside scope), PermissionDeniedError (sender not a member, or not the
        token's own subject; RuleViolationError for the agent's rule), EgressRefusedError —
        each of these audited in the caller's own org as a refused ``envelope.message`` — and
        ThreadClosedError, RunawayBudgetError (audited by the hub); AuthenticationError (not
        audited here) when the credential was revoked after it authenticated (a WebSocket
        connection that outlived it).
        """
        try:
            grant, content, redactions = await self._check_post(
                principal, thread_id, content, agent_id, user_id, idempotency_key, causation_id
            )
        except (
            NotFoundError,
            PermissionDeniedError,
            InvalidRequestError,
            EgressRefusedError,
        ) as err:
            await self._audit_refused_post(principal, thread_id, err)
            raise
        sender = grant.sender
        env = await self.ctx.hub.append(
            thread_id,
            type=EV_MESSAGE,
            data={"content": content},
            sender=sender,
            idempotency_key=stored_key(sender.kind, sender.id, idempotency_key, causation_id)
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
        if env.sender_id == sender.id and env.sender_org_id == sender.org_id:
            return render_envelope(env, sender.name, grant.sender_org_name)
        async with self.ctx.engine.connect() as conn:  # not ours: an idempotent duplicate
            return (await render(conn, [env]))[0]

    async def _check_post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        agent_id: str | None,
        user_id: str | None,
        idempotency_key: str | None,
        causation_id: str | None = None,
    ) -> tuple[PostGrant, str, list[str]]:
        """Everything ``post`` checks before the append: ``(grant, content to append, names of
        the redact rules applied)``; raises the refusals ``post`` documents, in this order:
        sender naming and content, credential, thread visible, ``causation_id``, sender own /
        member / participant, the agent's rule (adapter, outbound_to, delegation depth,
        concurrent threads, rate), the egress policy."""
        agent_id, user_id = _sender_for(principal, agent_id, user_id)
        if not content.strip():
            raise InvalidRequestError("message content must not be empty")
        if len(content) > MAX_CONTENT:
            raise InvalidRequestError(f"message content is longer than {MAX_CONTENT} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise InvalidRequestError(f"idempotency_key must be 1-{MAX_KEY} characters")
        ctx = self.ctx
        key = (principal, thread_id, agent_id, user_id)
        epoch = (ctx.access_epoch, ctx.config_epoch)  # taken before any read (services/cache.py)
        grant = self.grants.get(key, epoch)
        if grant is None and (loading := self._loading.get(key)) is not None:
            await loading.wait()  # another post is making this grant: one query, not a herd
            epoch = (ctx.access_epoch, ctx.config_epoch)
            grant = self.grants.get(key, epoch)
        if grant is not None:
            if causation_id is not None:
                async with ctx.engine.connect() as conn:
                    await _check_causation(conn, thread_id, causation_id)
            await self._check_adapter(grant, thread_id)
        else:
            done = anyio.Event()
            leader = self._loading.setdefault(key, done) is done
            try:
                grant = await self._make_grant(
                    principal, thread_id, agent_id, user_id, causation_id
                )
                self.grants.put(key, grant, epoch)  # every check a grant stands for has passed
            finally:
                if leader:
                    del self._loading[key]
                    done.set()
        if grant.agent is not None:
            await self.rules.check_dynamic(
                grant.agent, grant.rule, thread_id=thread_id, causation_id=causation_id
            )
        if grant.policy is None:
            return grant, content, []  # org-internal threads are not filtered
        try:
            content, redactions = apply_egress(grant.policy, content)
        except EgressRefusedError as err:
            async with ctx.engine.begin() as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.refused",
                    thread_id,
                    err.rules,
                    org_id=grant.sender.org_id,
                    data=_egress_data(grant.sender),
                )
            raise
        return grant, content, redactions

    async def _make_grant(
        self,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
        causation_id: str | None,
    ) -> PostGrant:
        """Every check a :class:`PostGrant` stands for, on one connection, plus the post's own
        ``causation_id`` and adapter checks; raises the first refusal, exactly as reported."""
        async with self.ctx.engine.connect() as conn:
            grant = await self._grant(conn, principal, thread_id, agent_id, user_id)
            if grant is None:  # some check failed: find which, exactly as it is reported
                grant = await self._checked_grant(
                    conn, principal, thread_id, agent_id, user_id, causation_id
                )
            elif causation_id is not None:
                await _check_causation(conn, thread_id, causation_id)
            await self._check_adapter(grant, thread_id)
            if grant.agent is not None:
                await RuleService.check_outbound(conn, grant.agent, grant.rule, grant.team_id)
        return grant

    async def _check_adapter(self, grant: PostGrant, thread_id: str) -> None:
        """The agent rule's allowed_adapters against the thread's adapter now (in memory)."""
        if grant.agent is not None and grant.rule is not None:
            adapter = (await self.ctx.hub.state(thread_id)).adapter
            RuleService.check_adapter(grant.agent, grant.rule, adapter)

    @staticmethod
    async def _grant(
        conn: AsyncConnection,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
    ) -> PostGrant | None:
        """The scope checks of a post in one query (:func:`post_access`): the grant, or None
        when any of them fails."""
        kind: SenderKind = "agent" if agent_id is not None else "user"
        sender_id = agent_id if agent_id is not None else user_id
        assert sender_id is not None
        row = await post_access(conn, principal, thread_id, kind, sender_id)
        if row is None:
            return None
        return _grant_of(row, kind, row["egress"], row["egress_updated_at"])

    @staticmethod
    async def _checked_grant(
        conn: AsyncConnection,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
        causation_id: str | None,
    ) -> PostGrant:
        """The scope checks of a post one by one: raises the first refusal (NotFoundError,
        InvalidRequestError for ``causation_id``, PermissionDeniedError); the grant if all pass
        after all (access was granted since :meth:`_grant` looked). AuthenticationError first
        if the principal's credential was revoked (a WebSocket connection outliving it)."""
        await credential_in_force(conn, principal)
        thread, team = await visible_thread(conn, principal, thread_id)
        if causation_id is not None:
            await _check_causation(conn, thread_id, causation_id)
        kind: SenderKind
        if agent_id is not None:
            who = await own_agent(conn, principal, agent_id)
            kind = "agent"
        else:
            assert user_id is not None
            who = await own_user(conn, principal, user_id)
            kind = "user"
        member = (
            await conn.execute(
                select(members.c.role).where(
                    members.c.team_id == team["id"],
                    members.c.member_kind == kind,
                    members.c.member_id == who["id"],
                )
            )
        ).first()
        if member is None:
            raise PermissionDeniedError(
                f"{kind} {who['name']!r} is not a member of this thread's {team['kind']}"
            )
        if thread["visibility"] == "restricted" and not await _is_participant(
            conn, thread_id, kind, who["id"]
        ):
            raise PermissionDeniedError(
                f"{kind} {who['name']!r} is not a participant of this restricted thread"
            )
        org_name = (
            await conn.execute(select(orgs.c.name).where(orgs.c.id == who["org_id"]))
        ).scalar_one()
        policy = await conn.execute(
            select(org_policies.c.egress, org_policies.c.updated_at).where(
                org_policies.c.org_id == who["org_id"]
            )
        )
        egress, updated_at = policy.first() or (None, None)
        row = {
            "team_id": team["id"],
            "team_kind": team["kind"],
            "sender_id": who["id"],
            "sender_org_id": who["org_id"],
            "sender_name": who["name"],
            "org_name": org_name,
            "rule": who["rule"] if kind == "agent" else None,
        }
        return _grant_of(row, kind, egress, updated_at)

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


async def _check_causation(conn: AsyncConnection, thread_id: str, envelope_id: str) -> None:
    """InvalidRequestError unless ``envelope_id`` is an envelope of ``thread_id``."""
    q = select(envelopes.c.seq).where(
        envelopes.c.thread_id == thread_id, envelopes.c.id == envelope_id
    )
    if (await conn.execute(q)).first() is None:
        raise InvalidRequestError(
            f"causation_id {envelope_id!r} is not an envelope of thread {thread_id!r}"
        )


async def _is_participant(
    conn: AsyncConnection, thread_id: str, member_kind: str, member_id: str
) -> bool:
    q = select(thread_participants.c.member_id).where(
        thread_participants.c.thread_id == thread_id,
        thread_participants.c.member_kind == member_kind,
        thread_participants.c.member_id == member_id,
    )
    return (await conn.execute(q)).first() is not None


@dataclass(frozen=True, slots=True)
class PostGrant:
    """A positive post decision, cached per ``(principal, thread, sender)`` (services/cache.py).

    ``sender`` is the actor the message is sent as and ``sender_org_name`` its org's name (for
    rendering); ``team_id`` the thread's team or network. For an agent sender, ``agent`` holds
    its ``id``, ``org_id``, ``name`` and stored ``rule`` and ``rule`` the parsed rule (None: no
    rule), whose adapter and outbound_to checks passed when the grant was made. ``policy`` is
    the sender org's egress policy for a network thread, None for an org-internal one.
    """

    team_id: str
    sender: Actor
    sender_org_name: str
    agent: AgentRow | None
    rule: Rule | None
    policy: EgressPolicy | None


def _grant_of(row: Mapping[Any, Any], kind: SenderKind, egress: Any, updated_at: Any) -> PostGrant:
    sender = Actor(kind, row["sender_id"], row["sender_org_id"], row["sender_name"])
    agent = None
    if kind == "agent":
        agent = {
            "id": row["sender_id"],
            "org_id": row["sender_org_id"],
            "name": row["sender_name"],
            "rule": row["rule"],
        }
    return PostGrant(
        team_id=row["team_id"],
        sender=sender,
        sender_org_name=row["org_name"],
        agent=agent,
        rule=parse_rule(row["rule"]) if agent is not None else None,
        policy=policy_from_row(egress, updated_at) if row["team_kind"] == "network" else None,
    )


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
    return [render_envelope(e, *names.get(e.sender_id, ("", ""))) for e in envs]


def render_envelope(e: Envelope, name: str, org_name: str) -> dict[str, Any]:
    """One envelope as its API dict, given its sender's display ``name`` and ``org_name`` (the
    one shape shared by REST pages and WebSocket ``envelope`` frames)."""
    return {
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
