"""The one post path: every message of a thread — REST, WebSocket, SDK, remote runners, the
in-process runner's replies and triage forwards — is checked (scope, rules, rate, egress,
idempotency), audited and appended by :meth:`PostPath.post_message` (design: docs/architecture.md,
"One post path")."""

from __future__ import annotations

import json
import weakref
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    ConflictError,
    InvalidAudienceError,
    InvalidRequestError,
    NotFoundError,
    NotYourTurnError,
    PermissionDeniedError,
    RunawayBudgetError,
)
from agent_network.hub import AccessChangedError
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.rule import Rule
from agent_network.protocol.adapters.base import Proposal
from agent_network.protocol.adapters.graph import parse_tool_calls
from agent_network.protocol.events import (
    EV_MESSAGE,
)
from agent_network.protocol.knobs import LIVE_STATUSES
from agent_network.protocol.lifecycle import admit, may_speak
from agent_network.protocol.state import ThreadState
from agent_network.services.base import ServiceContext, record
from agent_network.services.cache import DecisionCache
from agent_network.services.claims import stored_key
from agent_network.services.egress_check import check_message
from agent_network.services.egress_rules import (
    EgressPolicy,
    EgressRefusedError,
    EgressResult,
    matches_data,
    policy_for_thread,
    policy_from_row,
)
from agent_network.services.policy import audit_egress
from agent_network.services.principal import Principal
from agent_network.services.rendering import render, render_envelope
from agent_network.services.rules import AgentRow, RuleService, RuleViolationError, parse_rule
from agent_network.services.scope import (
    credential_in_force,
    own_agent,
    own_user,
    post_access,
    visible_thread,
)
from agent_network.services.secrets import org_secret_index
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    envelopes,
    members,
    org_policies,
    orgs,
    thread_participants,
)

log = structlog.get_logger(__name__)

MemberKind = Literal["agent", "user"]

MAX_CONTENT = 32_000  # characters
ACCESS_RETRIES = 5  # checks of one post when access keeps being removed meanwhile
MAX_KEY = 150  # characters of a client idempotency key (stored as "<sender_id>:<key>")
MAX_AUDIENCE = 200
MAX_TOOL_CALLS = 50
MAX_TOOL_CALLS_JSON = 64_000  # characters of data["tool_calls"] as JSON


async def append_message(
    ctx: ServiceContext,
    thread_id: str,
    *,
    sender: Sender,
    data: dict[str, Any],
    audience: list[str] | None,
    idempotency_key: str | None,
    causation_id: str | None,
    checked_at: int,
    acted_by: tuple[str, str] | None = None,
) -> Envelope:
    """Append one message (``data``: ``content`` and optionally ``tool_calls`` or a server-set
    marker) from ``sender`` to ``thread_id`` and return the stored envelope (an earlier one for
    a repeated ``idempotency_key``, stored exactly as given).

    The one place a message reaches the hub, called by :meth:`PostPath.post_message` only,
    after its checks of scope, rules, rate and egress. ``checked_at`` is the access epoch read
    before those checks: the hub refuses the append with AccessChangedError when access was
    removed since (the caller checks again). Raises what :meth:`~agent_network.hub.Hub.append`
    raises (ThreadClosedError, RunawayBudgetError, NotYourTurnError, ProtocolViolationError —
    audited by the hub)."""
    return await ctx.hub.append(
        thread_id,
        type=EV_MESSAGE,
        data=data,
        sender=sender,
        audience=audience,
        idempotency_key=idempotency_key,
        causation_id=causation_id,
        acted_by=acted_by,
        checked_at=checked_at,
    )


class PostPath:
    """The checks and the append of a message posted by a principal (:meth:`post`); mixed into
    :class:`~agent_network.services.threads.ThreadService`, which owns ``grants`` and
    ``_loading``."""

    ctx: ServiceContext
    rules: RuleService
    grants: DecisionCache[PostGrant]
    _loading: dict[Hashable, anyio.Event]

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
        audience: list[str] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Post a message as one of the caller's own agents or users who is a thread member.

        ``audience`` (ids of agents/users; None = everyone who reads the thread) limits who
        receives the message: nobody else reads it through any API; the sender always does. In
        a protocol thread the hub checks that it names participants only; in an ``open`` thread
        every id must be a member of the thread's team or network (InvalidAudienceError, 422
        ``invalid_audience``, otherwise). ``tool_calls`` (``[{name, args?, result?}]``, at most
        50) are stored as ``data["tool_calls"]`` in the form
        ``agent_network.protocol.tool_call`` builds; a workflow thread routes on them (a
        Handoff/Finish result). InvalidRequestError for a bad shape.

        An org key names the sender (``agent_id`` or ``user_id``); a user or agent token posts
        as its own user/agent (naming anyone else is refused). In a **network** thread the
        egress policy of the sender's org is applied first (services/policy.py) — its rules,
        then its defaults (the org's own stored secrets, common key formats) unless turned off;
        in a team thread only the defaults, and only if the org applies them there: a
        ``refuse`` rule raises EgressRefusedError and nothing is written; ``redact`` rules
        replace their matches and the redacted text is what is appended. Each refusal
        (``egress.refused``) and each redaction (``egress.redacted``) is audited with the rule
        names, secret names and spans, never the text.

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
        env, grant = await self.post_message(
            principal,
            thread_id,
            content,
            agent_id=agent_id,
            user_id=user_id,
            idempotency_key=idempotency_key,
            causation_id=causation_id,
            audience=audience,
            tool_calls=tool_calls,
        )
        sender = grant.sender
        if env.sender_id == sender.id and env.sender_org_id == sender.org_id:
            return render_envelope(env, sender.name, grant.sender_org_name)
        async with self.ctx.engine.connect() as conn:  # not ours: an idempotent duplicate
            return (await render(conn, [env]))[0]

    async def post_message(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        audience: list[str] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        count_rate: bool = True,
    ) -> tuple[Envelope, PostGrant]:
        """The one post function: check, audit and append one message; returns the stored
        envelope (an earlier one for a repeated key) and the :class:`PostGrant` it was sent
        under. :meth:`post` documents the checks, their order, their cost and the refusals.

        Every message goes through here: :meth:`post` (REST, WebSocket, SDK, remote runners)
        with a credential's principal, and the in-process runner's replies and triage forwards
        (:func:`agent_network.services.jobs.post_reply`, services/routing.py) with an internal
        agent principal (services/principal.py :func:`agent_principal`). For the latter:
        ``idempotency_key`` is stored as given (a ``reply:``/``triage:`` key) and
        ``causation_id`` (the job's trigger, possibly of another thread) is not looked up;
        ``extra`` adds server-set fields to ``data`` (the triage marker); ``count_rate`` False
        leaves the agent's rate alone (a triage reply whose forward was counted); the turn is
        checked before the hub (:func:`turn_refused`: ``routine.skipped`` audited, the refusal
        raised); and every audit record names the job (``trigger_id``, ``routine_id``) and its
        trigger's thread. A lost scope (NotFoundError, PermissionDeniedError other than
        RuleViolationError) is not audited for it: the agent was removed while it answered.
        The rate is counted after every other check passed (RateRefusedError when over it).
        """
        if (extra is not None or not count_rate) and not principal.internal:
            raise ValueError("extra data and count_rate=False are for internal principals only")
        for _attempt in range(ACCESS_RETRIES):
            # the access epoch before any check: if access is removed before the append
            # commits, the hub refuses it (AccessChangedError) and everything is checked again
            checked_at = self.ctx.access_epoch
            try:
                calls = _tool_calls(tool_calls)
                _check_audience_shape(audience)
                grant, text, redactions = await self._check_post(
                    principal,
                    thread_id,
                    content,
                    agent_id,
                    user_id,
                    idempotency_key,
                    causation_id,
                    tool_calls=calls,
                    count_rate=count_rate,
                )
                if redactions is not None and redactions.tool_calls is not None:
                    calls = redactions.tool_calls  # the egress policy checked them too
                if audience is not None:
                    await self._check_open_audience(grant, thread_id, audience)
            except (
                NotFoundError,
                PermissionDeniedError,
                InvalidRequestError,
                EgressRefusedError,
            ) as err:
                await self._audit_refused_post(principal, thread_id, err)
                raise
            sender = grant.sender
            if principal.internal:
                refused = await turn_refused(
                    self.ctx, principal, await self.ctx.hub.state(thread_id), sender
                )
                if refused is not None:
                    raise refused  # audited (routine.skipped) when the thread is live
            data: dict[str, Any] = {"content": text}
            if calls:
                data["tool_calls"] = calls
            data.update(extra or {})
            key = idempotency_key
            if key and not principal.internal:
                key = stored_key(sender.kind, sender.id, key, causation_id)
            try:
                env = await append_message(
                    self.ctx,
                    thread_id,
                    sender=sender,
                    data=data,
                    audience=list(audience) if audience is not None else None,
                    idempotency_key=key or None,
                    causation_id=causation_id,
                    acted_by=(principal.kind, principal.key_id),
                    checked_at=checked_at,
                )
            except AccessChangedError:
                continue
            break
        else:
            raise ConflictError("access to this thread kept changing while posting; retry")
        if redactions is not None and redactions.redacted:
            async with write_transaction(self.ctx.engine) as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.redacted",
                    _resource(principal, thread_id),
                    redactions.redacted,
                    org_id=sender.org_id,
                    data=_egress_data(
                        principal, sender, envelope_id=env.id, **redactions.audit_data()
                    ),
                )
        return env, grant

    async def _check_open_audience(
        self, grant: PostGrant, thread_id: str, audience: list[str]
    ) -> None:
        """In an open thread (no participant list: the hub cannot check it) every audience id
        must be a member of the thread's team or network; InvalidAudienceError otherwise."""
        if (await self.ctx.hub.state(thread_id)).participants:
            return  # a protocol thread: the hub checks the audience against its participants
        async with self.ctx.engine.connect() as conn:
            q = select(members.c.member_id).where(
                members.c.team_id == grant.team_id, members.c.member_id.in_(set(audience))
            )
            known = {r[0] for r in await conn.execute(q)}
        strangers = sorted(set(audience) - known)
        if strangers:
            raise InvalidAudienceError(
                "audience may only name members (agent or user ids) of this thread's team or "
                f"network; not members: {', '.join(strangers)}"
            )

    async def _check_post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        agent_id: str | None,
        user_id: str | None,
        idempotency_key: str | None,
        causation_id: str | None = None,
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        count_rate: bool = True,
    ) -> tuple[PostGrant, str, EgressResult | None]:
        """Everything ``post_message`` checks before the append: ``(grant, content to append,
        what the egress policy let through — content and ``tool_calls``, redacted — or None when
        no policy applies)``; raises the refusals ``post`` documents, in this order:
        sender naming and content, credential, thread visible, ``causation_id`` (not for an
        internal principal), sender own / member / participant, the agent's rule (adapter,
        outbound_to, delegation depth, concurrent threads), the egress policy, then the rate
        (counted unless ``count_rate`` is False; RateRefusedError)."""
        agent_id, user_id = _sender_for(principal, agent_id, user_id)
        if not content.strip():
            raise InvalidRequestError("message content must not be empty")
        if len(content) > MAX_CONTENT:
            raise InvalidRequestError(f"message content is longer than {MAX_CONTENT} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise InvalidRequestError(f"idempotency_key must be 1-{MAX_KEY} characters")
        ctx = self.ctx
        # an internal principal's causation is the job's trigger, set by the server
        causation = None if principal.internal else causation_id
        key = (principal, thread_id, agent_id, user_id)
        epoch = (ctx.access_epoch, ctx.config_epoch)  # taken before any read (services/cache.py)
        grant = self.grants.get(key, epoch)
        if grant is None and (loading := self._loading.get(key)) is not None:
            await loading.wait()  # another post is making this grant: one query, not a herd
            epoch = (ctx.access_epoch, ctx.config_epoch)
            grant = self.grants.get(key, epoch)
        if grant is not None:
            if causation is not None:
                async with ctx.engine.connect() as conn:
                    await _check_causation(conn, thread_id, causation)
            await self._check_adapter(grant, thread_id)
        else:
            done = anyio.Event()
            leader = self._loading.setdefault(key, done) is done
            try:
                grant = await self._make_grant(principal, thread_id, agent_id, user_id, causation)
                self.grants.put(key, grant, epoch)  # every check a grant stands for has passed
            finally:
                if leader:
                    del self._loading[key]
                    done.set()
        if grant.agent is not None:
            await self.rules.check_dynamic(
                grant.agent,
                grant.rule,
                thread_id=thread_id,
                causation_id=causation_id,
                consume_rate=False,
            )
        result = None
        if grant.policy is not None:  # else a team thread without the defaults: not filtered
            org_id = grant.sender.org_id
            index = None
            if grant.policy.defaults.org_secrets != "off":  # the org's own secrets
                index = await org_secret_index(ctx, org_id)
            try:
                result = check_message(grant.policy, content, tool_calls, index)
            except EgressRefusedError as err:
                async with write_transaction(ctx.engine) as conn:
                    await audit_egress(
                        conn,
                        principal,
                        "egress.refused",
                        _resource(principal, thread_id),
                        err.rules,
                        org_id=org_id,
                        data=_egress_data(principal, grant.sender, **matches_data(err.matches)),
                    )
                raise
        if count_rate and grant.agent is not None and grant.rule is not None:
            try:
                await self.rules.take_rate(grant.agent, grant.rule)
            except RuleViolationError as err:
                raise RateRefusedError(err.message) from None
        return grant, (result.content if result is not None else content), result

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
        kind: MemberKind = "agent" if agent_id is not None else "user"
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
        kind: MemberKind
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
        self,
        principal: Principal,
        thread_id: str,
        err: AgentNetworkError,
        action: str = "envelope.message",
    ) -> None:
        """Audit a refused post in the caller's own org (principal = the credential); never the
        message text. For an internal principal (a runner's job) only what its agent's post
        was refused for: its rule (rate included) or the message's shape — not an egress
        refusal (``egress.refused`` says it) nor a lost scope (the agent was removed)."""
        if principal.internal and (
            isinstance(err, EgressRefusedError)
            or (
                isinstance(err, NotFoundError | PermissionDeniedError)
                and not isinstance(err, RuleViolationError)
            )
        ):
            return
        await audit_post(self.ctx, principal, action, thread_id, f"{err.code}: {err.message}")


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
    what of the sender org's egress policy applies in the thread (all of it in a network
    thread; in a team thread its defaults if it applies them there, else None).
    """

    team_id: str
    sender: Sender
    sender_org_name: str
    agent: AgentRow | None
    rule: Rule | None
    policy: EgressPolicy | None


def _grant_of(row: Mapping[Any, Any], kind: MemberKind, egress: Any, updated_at: Any) -> PostGrant:
    sender = Sender(kind, row["sender_id"], row["sender_org_id"], row["sender_name"])
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
        policy=policy_for_thread(
            policy_from_row(egress, updated_at), row["team_kind"] == "network"
        ),
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
                f"{principal.credential_name} posts only as its own {principal.kind}"
            )
        subject = principal.subject_id
        return (subject, None) if principal.kind == "agent" else (None, subject)
    if (agent_id is None) == (user_id is None):
        raise InvalidRequestError("give exactly one of agent_id or user_id as the sender")
    return agent_id, user_id


def _check_audience_shape(audience: list[str] | None) -> None:
    """InvalidAudienceError unless ``audience`` is None or 1-200 non-empty id strings."""
    if audience is None:
        return
    if (
        not isinstance(audience, list)
        or not 0 < len(audience) <= MAX_AUDIENCE
        or not all(isinstance(a, str) and 0 < len(a) <= 40 for a in audience)
    ):
        raise InvalidAudienceError(
            f"audience must list 1-{MAX_AUDIENCE} participant ids (omit it to address everyone)"
        )


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``calls`` in the stored form ``{"name", "args", "result"}`` (see
    ``agent_network.protocol.tool_call``); InvalidRequestError for a bad shape, more than 50
    calls, or more than 64 000 characters of JSON."""
    if not calls:
        return []
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        raise InvalidRequestError(f"tool_calls must be a list of at most {MAX_TOOL_CALLS} calls")
    out: list[dict[str, Any]] = []
    for call in calls:
        if not isinstance(call, Mapping):
            raise InvalidRequestError(
                f"each tool call is an object {{name, args, result}}: {call!r}"
            )
        unknown = sorted(set(call) - {"name", "args", "result"})
        if unknown:
            raise InvalidRequestError(f"tool_calls: unknown fields {unknown}")
        args = call.get("args")
        if args is not None and not isinstance(args, Mapping):
            raise InvalidRequestError("tool_calls: args must be an object")
        out.append(
            {"name": call.get("name"), "args": dict(args or {}), "result": call.get("result")}
        )
    parse_tool_calls({"tool_calls": out})  # names, at most one Handoff/Finish, their shapes
    try:
        size = len(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidRequestError(
            "tool_calls must be JSON (objects, lists, strings, numbers)"
        ) from None
    if size > MAX_TOOL_CALLS_JSON:
        raise InvalidRequestError(f"tool_calls exceed {MAX_TOOL_CALLS_JSON} characters of JSON")
    return out


def _egress_data(principal: Principal, sender: Sender, **extra: Any) -> dict[str, Any]:
    """An egress record's data: the sender, or an internal principal's job."""
    if principal.job is not None:
        return {**principal.job.audit_data(), **extra}
    return {"sender": {"kind": sender.kind, "id": sender.id}, **extra}


def _resource(principal: Principal, thread_id: str) -> str:
    """The thread an audit record of a post names: the post's own, or for an internal
    principal its job's trigger thread (a triage forward's records belong to the request)."""
    return principal.job.thread_id if principal.job is not None else thread_id


class RateRefusedError(RuleViolationError):
    """The agent's rate refused the message (after every other check passed); the message
    names the rule."""


async def audit_post(
    ctx: ServiceContext,
    principal: Principal,
    action: str,
    thread_id: str,
    reason: str,
    *,
    outcome: str = "refused",
) -> None:
    """Audit an act of a post (a refused ``envelope.message``, a ``routine.skipped`` turn) in
    the principal's org, resource the thread (:func:`_resource`), with an internal
    principal's job as ``data``; never the message text."""
    async with write_transaction(ctx.engine) as conn:
        await record(
            conn,
            principal,
            action,
            "thread",
            _resource(principal, thread_id)[:40],  # as given (a guess may be longer)
            outcome=outcome,
            reason=reason,
            data=principal.job.audit_data() if principal.job is not None else None,
        )


async def turn_refused(
    ctx: ServiceContext, principal: Principal, state: ThreadState, sender: Sender
) -> AgentNetworkError | None:
    """Why ``sender`` may not speak in the thread of ``state`` now (the hub's own rules, via
    :func:`admit` without writing), or None. A refusal is audited while the thread is live: a
    spent budget as ``envelope.message`` with ``agent_budget_exhausted`` (as the hub would),
    anything else as ``routine.skipped`` with the adapter's reason (``not_your_turn: ...``); a
    closing, closed or not yet active thread is not audited. The runner's check before a
    model call and before the append (``principal``: internal, with its job; an answer to a
    person's message in the job's own thread is not refused by a spent budget)."""
    job = principal.job
    answers = job is not None and job.answers_person and state.thread_id == job.thread_id
    if may_speak(state, sender, answers_person=answers):
        return None
    try:
        admit(
            state,
            Proposal(type=EV_MESSAGE, data={"content": ""}, sender=sender),
            answers_person=answers,
        )
    except AgentNetworkError as err:
        if state.status in LIVE_STATUSES:
            action = (
                "envelope.message" if isinstance(err, RunawayBudgetError) else "routine.skipped"
            )
            reason = f"{err.code}: {err.message}; no reply posted"
            await audit_post(ctx, principal, action, state.thread_id, reason)
        return err
    return NotYourTurnError(f"{sender.kind} {sender.name!r} may not speak in this thread now")


_posters: weakref.WeakKeyDictionary[RuleService, MessagePoster] = weakref.WeakKeyDictionary()


class MessagePoster(PostPath):
    """A :class:`PostPath` of its own (grant cache included) over a rule service: the
    runners' way into the one post function (:func:`poster_for`)."""

    def __init__(self, ctx: ServiceContext, rules: RuleService) -> None:
        self.ctx = ctx
        self.rules = rules
        self.grants = DecisionCache()
        self._loading = {}


def poster_for(rules: RuleService) -> MessagePoster:
    """The :class:`MessagePoster` of ``rules`` (one per rule service: its rate windows are
    the agent's rate), made on first use."""
    poster = _posters.get(rules)
    if poster is None:
        poster = _posters[rules] = MessagePoster(rules.ctx, rules)
    return poster
