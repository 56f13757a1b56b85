"""Work claims: several runners (remote processes and the in-process one) share the routines of
the same agents, and each trigger is worked on by one runner at a time.

A runner that wants to answer trigger ``seq`` of a thread for an agent first *claims* it with a
lease (:meth:`ClaimService.claim`); it renews the claim while it works and *completes* it when it
has replied or decided not to (:meth:`ClaimService.complete`). A crashed runner's claim expires
after its lease and another runner takes it over. Claims only save duplicate model calls: the
reply itself is idempotent on ``reply:<agent_id>:<trigger envelope id>`` (:func:`reply_key`) on
every path (in-process append, REST post), so even two runners holding the same trigger at once
can never store two replies.

Before a claim is granted the same checks run as in the in-process runner before a model call
(:func:`preflight`): the thread is open, the runaway budget is not spent, the agent's rule lets it
send there and admits the trigger's sender (``inbound_from``). A trigger refused by them is
marked done (audited like in the in-process runner) and answered with ``claim_done``.

What may be claimed is the runners' trigger rule (:func:`trigger_refusal`): in a thread without a
protocol a message from somebody else; in a protocol thread any envelope after which the agent is
the expected speaker (the ``thread.created``/``thread.ack`` that activates a thread whose first
speaker is the agent, a ``context.set``, a Handoff naming it, the previous speaker's message), or
where anyone may speak a message of another participant. The rule is decided on the thread's
state right after the trigger, so it never changes: a claim that was valid stays valid to renew
and complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RunawayBudgetError,
)
from agent_network.model.envelope import Envelope
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.fold import fold
from agent_network.protocol.knobs import LIVE_STATUSES
from agent_network.protocol.lifecycle import budget_spent, person_message
from agent_network.protocol.lifecycle import reply_key as lifecycle_reply_key
from agent_network.protocol.state import ThreadState
from agent_network.protocol.turns import turn_takers, visible_to
from agent_network.services.base import ServiceContext
from agent_network.services.principal import Principal
from agent_network.services.rules import RuleService, RuleViolationError, parse_rule
from agent_network.services.scope import own_agent, require_org, visible_thread
from agent_network.services.triage import is_request, parse_config
from agent_network.store.audit import audit_row, insert_audit
from agent_network.store.claims import (
    ClaimState,
    complete_claim,
    done_seqs,
    release_claims,
    stored_claim,
    try_claim,
)
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    agents,
    members,
    orgs,
    routines,
    thread_participants,
    threads,
    users,
)
from agent_network.store.wal import read_envelopes

DROPPED = {
    "inbox_cap": "rule.refused",
    "failed": "routine.failed",
    "empty_reply": "routine.skipped",
}
"""Why a runner may complete a trigger unanswered (``dropped``) -> the audit action recorded."""
MAX_LEASE = 3600.0  # seconds
MAX_RUNNER_ID = 100  # characters


class ClaimHeldError(ConflictError):
    """Another runner holds a live lease on this trigger; retry after ``details.retry_after``."""

    code = "claim_held"


class ClaimDoneError(ConflictError):
    """The trigger is done (answered, or refused by the checks before a model call)."""

    code = "claim_done"


class ClaimRequiredError(ConflictError):
    """The caller's runner does not hold a live claim on the trigger (never claimed, or its
    lease ran out): claim it first (``POST /claims``)."""

    code = "claim_required"


def reply_key(agent_id: str, trigger_id: str) -> str:
    """The idempotency key of ``agent_id``'s reply to the envelope ``trigger_id``, as stored.

    Every path stores a reply under this exact key: the in-process runner appends with it, and a
    REST post by the agent carrying ``causation_id`` = the trigger and this key as its
    ``idempotency_key`` is stored under it unscoped (:func:`stored_key`). The hub recognises it
    too: an agent's answer to a person's message under this key is not refused by a spent
    runaway budget (:func:`~agent_network.protocol.lifecycle.budget_spent`).
    """
    return lifecycle_reply_key(agent_id, trigger_id)


def stored_key(sender_kind: str, sender_id: str, key: str, causation_id: str | None) -> str:
    """The stored form of a client's idempotency ``key`` for a post by ``sender_id``.

    An agent's own reply key (``reply:<sender_id>:<causation_id>``, with the matching
    ``causation_id``) is stored as it is, so a remote runner's REST reply and the in-process
    runner's reply to the same trigger collide; only the agent itself (its org key or its token)
    can post as the agent, so nobody else can occupy it. Every other key is scoped to its sender
    (``<sender_id>:<key>``), which keeps it apart from every system key.
    """
    if (
        sender_kind == "agent"
        and causation_id is not None
        and key == reply_key(sender_id, causation_id)
    ):
        return key
    return f"{sender_id}:{key}"


def trigger_refusal(state_after: ThreadState, env: Envelope, agent_id: str) -> str | None:
    """Why ``env`` is not a trigger for the agent ``agent_id``, or None when it is.

    ``state_after`` is the thread's state folded up to and including ``env`` (for a thread
    without a participant list any state of the thread will do: only its empty ``participants``
    is read). The rule is the runners' (:func:`~agent_network.protocol.turns.turn_takers`):
    an envelope whose audience excludes the agent never triggers it; in a thread without a
    protocol only a ``message`` from somebody else does; in a protocol thread any envelope
    (a message, ``thread.created``/``thread.ack``, ``context.set``, a Handoff, also one the
    agent sent itself) after which the agent is the expected speaker, or — where anyone may
    speak — a message of another participant.
    """
    if not visible_to(agent_id, env):
        return "its audience does not include the agent"
    if not state_after.participants:
        if env.type != EV_MESSAGE:
            return (
                f"it is a {env.type!r} envelope; in a thread without a protocol only messages "
                "trigger an agent"
            )
        if env.sender_id == agent_id:
            return "it was sent by the agent itself"
        return None
    if agent_id in turn_takers(state_after, env, [agent_id]):
        return None
    if agent_id not in state_after.participant_ids:
        return "the agent is not a participant of this protocol thread"
    if state_after.status not in LIVE_STATUSES:
        return f"the thread is {state_after.status} after it"
    expected = state_after.expected_speaker
    if expected is not None:
        return f"after it the turn is {expected!r}'s, not the agent's"
    if env.type != EV_MESSAGE:
        return f"it is a {env.type!r} envelope and nobody in particular speaks next"
    return "it gives the agent no turn (sent by the agent itself, or not admitted to speak)"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an agent does not answer a trigger. ``audit``: record it as a refused ``action``."""

    action: str
    reason: str
    audit: bool = True


async def agent_in_thread(conn: AsyncConnection, agent_id: str, thread: Any) -> bool:
    """The agent is (still) a member of the thread's team or network, and a participant if the
    thread is restricted. ``thread`` is a row of ``threads`` (mapping)."""
    q = select(members.c.member_id).where(
        members.c.team_id == thread["team_id"],
        members.c.member_kind == "agent",
        members.c.member_id == agent_id,
    )
    if (await conn.execute(q)).first() is None:
        return False
    if thread["visibility"] != "restricted":
        return True
    q = select(thread_participants.c.member_id).where(
        thread_participants.c.thread_id == thread["id"],
        thread_participants.c.member_kind == "agent",
        thread_participants.c.member_id == agent_id,
    )
    return (await conn.execute(q)).first() is not None


def thread_open_to_agent(agent_id: Any) -> ColumnElement[bool]:
    """The condition "``threads`` row is visible to the agent ``agent_id`` among its team's
    members": a ``members`` thread, or a restricted one where the agent is a participant.
    ``agent_id``: a column (or value) holding the agent's id."""
    return (threads.c.visibility == "members") | exists().where(
        (thread_participants.c.thread_id == threads.c.id)
        & (thread_participants.c.member_kind == "agent")
        & (thread_participants.c.member_id == agent_id)
    )


async def participations(
    conn: AsyncConnection, agent_ids: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """``(agent_id, thread_id, since)`` for every thread an agent with an active ``participate``
    routine takes part in (a member of its team/network; a participant if it is restricted).

    ``since`` (ISO time) is when both the routine and the membership existed: messages committed
    before it are not the agent's to answer. ``agent_ids`` limits the result to those agents.
    """
    q = (
        select(
            routines.c.agent_id,
            threads.c.id,
            func.max(routines.c.created_at),
            func.max(members.c.created_at),
        )
        .join(agents, agents.c.id == routines.c.agent_id)
        .join(members, (members.c.member_kind == "agent") & (members.c.member_id == agents.c.id))
        .join(threads, threads.c.team_id == members.c.team_id)
        .where(
            routines.c.status == "active",
            routines.c.preset_name == "participate",
            agents.c.deleted_at.is_(None),
            threads.c.deleted_at.is_(None),
            thread_open_to_agent(agents.c.id),
        )
        .group_by(routines.c.agent_id, threads.c.id)
        .order_by(routines.c.agent_id, threads.c.id)
    )
    if agent_ids is not None:
        q = q.where(routines.c.agent_id.in_(agent_ids))
    return [(a, t, max(r, m)) for a, t, r, m in (await conn.execute(q)).all()]


async def triage_participations(
    conn: AsyncConnection, agent_ids: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """``(agent_id, thread_id, since)`` for every intake thread of an active ``triage`` routine
    whose agent takes part in it (a member of its team/network; a participant if restricted) —
    what :func:`participations` is for participate routines.
    ``since`` (ISO time) is when both the routine and the membership existed. ``agent_ids``
    limits the result to those agents."""
    intake: dict[str, set[str]] = {}  # thread id -> agents whose triage routine watches it
    created: dict[tuple[str, str], str] = {}  # (agent, thread) -> when its routine was created
    q_routines = select(routines.c.agent_id, routines.c.config, routines.c.created_at).where(
        routines.c.status == "active", routines.c.preset_name == "triage"
    )
    if agent_ids is not None:
        q_routines = q_routines.where(routines.c.agent_id.in_(agent_ids))
    for agent_id, raw, routine_at in await conn.execute(q_routines):
        try:
            config = parse_config(raw)
        except InvalidRequestError:
            continue
        for thread_id in config.intake:
            intake.setdefault(thread_id, set()).add(agent_id)
            key = (agent_id, thread_id)
            created[key] = min(created.get(key, routine_at), routine_at)
    if not intake:
        return []
    q = (
        select(members.c.member_id, threads.c.id, members.c.created_at)
        .join(threads, threads.c.team_id == members.c.team_id)
        .join(agents, agents.c.id == members.c.member_id)
        .where(
            members.c.member_kind == "agent",
            members.c.member_id.in_(sorted({a for ids in intake.values() for a in ids})),
            threads.c.id.in_(sorted(intake)),
            agents.c.deleted_at.is_(None),
            threads.c.deleted_at.is_(None),
            thread_open_to_agent(members.c.member_id),
        )
    )
    out = [
        (agent_id, thread_id, max(created[(agent_id, thread_id)], member_at))
        for agent_id, thread_id, member_at in await conn.execute(q)
        if agent_id in intake[thread_id]
    ]
    return sorted(out)


async def preflight(
    ctx: ServiceContext,
    rules: RuleService,
    conn: AsyncConnection,
    agent: RowMapping,
    thread: Any,
    trigger: Envelope,
) -> Refusal | None:
    """The checks before an agent's model call for ``trigger`` (both runners use them).

    Returns None when the agent may go ahead, else the :class:`Refusal`: the thread is closed
    (not audited: the hub refuses every append there anyway), the thread's runaway budget is
    spent (unless ``trigger`` is a person's message: :func:`budget_spent`), or the agent's
    rule forbids sending there (``check_send`` without counting the rate). ``agent`` is a row
    of ``agents``; ``thread`` a row of ``threads``.
    """
    state = await ctx.hub.state(trigger.thread_id)
    if state.status == "closed":
        return Refusal("thread.closed", "the thread is closed", audit=False)
    # a person's message is answered even when other agents spent the budget meanwhile
    if budget_spent(state, answers_person=person_message(trigger.type, trigger.sender_kind)):
        return Refusal(
            "envelope.message",
            f"{RunawayBudgetError.code}: budget of {state.agent_budget} consecutive agent "
            "messages spent; no model call made",
        )
    try:
        await rules.check_send(
            conn,
            agent,
            thread_id=trigger.thread_id,
            team_id=thread["team_id"],
            adapter=state.adapter,
            causation_id=trigger.id,
            consume_rate=False,
        )
    except RuleViolationError as err:
        return Refusal("envelope.message", f"{err.code}: {err.message}")
    return None


async def _sender_of(conn: AsyncConnection, env: Envelope) -> tuple[str, str]:
    """``(display name, org name)`` of an envelope's sender (as ``threads.sender_names``)."""
    table = agents if env.sender_kind == "agent" else users
    name = (await conn.execute(select(table.c.name).where(table.c.id == env.sender_id))).scalar()
    org = (await conn.execute(select(orgs.c.name).where(orgs.c.id == env.sender_org_id))).scalar()
    return str(name or "(deleted)"), str(org or "")


def _inbox_cap(raw_rule: Any) -> int | None:
    """The ``inbox_cap`` of a stored rule (None: no cap)."""
    rule = parse_rule(raw_rule)
    return rule.inbox_cap if rule is not None else None


class ClaimService:
    """Claims on triggers for the agents a credential owns (an org key: every agent of its org;
    an agent token: its own agent). Any other agent answers 404 like everywhere."""

    def __init__(self, ctx: ServiceContext, *, rules: RuleService | None = None) -> None:
        self.ctx = ctx
        self.rules = rules or RuleService(ctx)

    # --------------------------------------------------------------- scope

    async def _agent(self, conn: AsyncConnection, principal: Principal, agent_id: str) -> Any:
        require_org(principal)
        if principal.is_member_scoped and (
            principal.kind != "agent" or principal.subject_id != agent_id
        ):
            raise NotFoundError("agent", agent_id)
        agent = await own_agent(conn, principal, agent_id)
        org_name = (
            await conn.execute(select(orgs.c.name).where(orgs.c.id == agent["org_id"]))
        ).scalar_one()
        return {**agent, "org_name": org_name}

    async def _target(
        self, conn: AsyncConnection, principal: Principal, agent_id: str, thread_id: str
    ) -> tuple[Any, Any]:
        """``(agent, thread)`` after the scope checks; NotFoundError / PermissionDeniedError."""
        agent = await self._agent(conn, principal, agent_id)
        thread, _team = await visible_thread(conn, principal, thread_id)
        if not await agent_in_thread(conn, agent_id, thread):
            raise PermissionDeniedError(
                f"agent {agent['name']!r} does not take part in thread {thread_id!r}"
            )
        return agent, thread

    async def _trigger(
        self, conn: AsyncConnection, thread_id: str, seq: int, agent_id: str
    ) -> Envelope:
        """The envelope ``seq`` of ``thread_id`` if it triggers ``agent_id`` (the rule of both
        runners, see :func:`trigger_refusal`); InvalidRequestError naming why not otherwise."""
        found = await read_envelopes(conn, thread_id, after=seq - 1, limit=1)
        if not found or found[0].seq != seq:
            raise InvalidRequestError(
                f"trigger_seq {seq} is not an envelope of thread {thread_id!r}; claim the seq "
                "of an envelope that gives the agent its turn"
            )
        env = found[0]
        state = await self.ctx.hub.state(thread_id)
        if state.participants and state.last_seq != seq:
            # the thread's state right after the trigger (the WAL never changes below last_seq)
            state = fold(thread_id, await read_envelopes(conn, thread_id, after=0, limit=seq))
        why = trigger_refusal(state, env, agent_id)
        if why is not None:
            raise InvalidRequestError(f"trigger_seq {seq} does not trigger the agent: {why}")
        return env

    @staticmethod
    def _check(runner_id: str, trigger_seq: int, lease_seconds: float | None = None) -> None:
        if not 0 < len(runner_id) <= MAX_RUNNER_ID or not runner_id.isprintable():
            raise InvalidRequestError(f"runner_id must be 1-{MAX_RUNNER_ID} printable characters")
        if trigger_seq < 1:
            raise InvalidRequestError("trigger_seq must be >= 1")
        if lease_seconds is not None and not 0 < lease_seconds <= MAX_LEASE:
            raise InvalidRequestError(f"lease_seconds must be in (0, {MAX_LEASE:g}]")

    # ------------------------------------------------------------- the API

    async def claim(
        self,
        principal: Principal,
        *,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        lease_seconds: float,
    ) -> dict[str, Any]:
        """Claim trigger ``trigger_seq`` of ``thread_id`` for ``agent_id`` for ``lease_seconds``.

        Granted if the trigger is free, its lease expired (take-over) or ``runner_id`` already
        holds it (renewal). Returns ``{"granted": True, "agent_id", "thread_id", "trigger_seq",
        "trigger_id", "runner_id", "expires_at" (epoch seconds, server clock), "lease_seconds"}``.

        Raises NotFoundError (agent or thread outside the caller's scope), PermissionDeniedError
        (the agent does not take part in the thread), InvalidRequestError (bad runner id or
        lease, or ``trigger_seq`` is no envelope of the thread or does not trigger the agent:
        :func:`trigger_refusal`, named in the message), ClaimHeldError (another
        runner's lease is live; ``details``: ``runner_id``, ``expires_at``, ``retry_after``
        seconds) and ClaimDoneError (already done, or refused now by the checks before a model
        call — then marked done and audited; ``details.reason`` says which).
        """
        self._check(runner_id, trigger_seq, lease_seconds)
        now = time.time()
        async with self.ctx.engine.connect() as conn:
            agent, thread = await self._target(conn, principal, agent_id, thread_id)
            trigger = await self._trigger(conn, thread_id, trigger_seq, agent_id)
        # the claim is the first statement of its transaction: on SQLite it waits for the write
        # lock (busy timeout) instead of failing on a read snapshot another writer outdated
        async with write_transaction(self.ctx.engine) as conn:
            state = await try_claim(
                conn,
                agent_id=agent_id,
                thread_id=thread_id,
                trigger_seq=trigger_seq,
                runner_id=runner_id,
                lease_seconds=lease_seconds,
                now=now,
            )
        self._raise_unless_granted(state, now)
        refusal = await self._refusal(agent, thread, trigger)
        if refusal is not None:
            await self._finish_refused(agent, trigger, runner_id, refusal)
            raise ClaimDoneError(
                f"trigger not answered: {refusal.reason}",
                details={"reason": refusal.reason},
            )
        return {
            "granted": True,
            "agent_id": agent_id,
            "thread_id": thread_id,
            "trigger_seq": trigger_seq,
            "trigger_id": trigger.id,
            "runner_id": runner_id,
            "expires_at": state.expires_at,
            "lease_seconds": lease_seconds,
        }

    async def complete(
        self,
        principal: Principal,
        *,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        dropped: str | None = None,
        detail: str | None = None,
    ) -> dict[str, Any]:
        """Mark the trigger done (replied, or deliberately not answered); idempotent.

        Allowed for the runner holding the claim, after its lease expired, or without a claim;
        ClaimHeldError while another runner's lease is live. ``dropped`` says why the runner
        leaves the trigger unanswered, audited in the same transaction as the in-process runner
        audits it (:data:`DROPPED`): ``inbox_cap`` (the agent's ``inbox_cap`` triggers already
        wait in it), ``failed`` (the job failed; ``detail`` says how, at most 500 characters)
        or ``empty_reply`` (the model's reply was empty after cleaning). Returns ``{"done":
        True, "agent_id", "thread_id", "trigger_seq"}``. Scope errors as :meth:`claim`;
        InvalidRequestError for another ``dropped`` value or a longer ``detail``.
        """
        self._check(runner_id, trigger_seq)
        if dropped is not None and dropped not in DROPPED:
            raise InvalidRequestError(f"dropped must be one of {', '.join(DROPPED)} or absent")
        if detail is not None and len(detail) > 500:
            raise InvalidRequestError("detail must be at most 500 characters")
        now = time.time()
        async with self.ctx.engine.connect() as conn:
            agent, _thread = await self._target(conn, principal, agent_id, thread_id)
            trigger = await self._trigger(conn, thread_id, trigger_seq, agent_id)
        async with write_transaction(self.ctx.engine) as conn:
            state = await complete_claim(
                conn,
                agent_id=agent_id,
                thread_id=thread_id,
                trigger_seq=trigger_seq,
                runner_id=runner_id,
                now=now,
            )
            if dropped is not None and state.outcome == "done":
                if dropped == "inbox_cap":
                    why = (
                        f"{RuleViolationError.code}: inbox_cap {_inbox_cap(agent['rule'])} "
                        "reached; trigger dropped"
                    )
                elif dropped == "failed":
                    why = detail or "the job failed"
                else:
                    why = "the model's reply was empty after cleaning; no reply posted"
                row = audit_row(
                    org_id=agent["org_id"],
                    principal_kind="agent",
                    principal_id=agent_id,
                    action=DROPPED[dropped],
                    resource_kind="thread",
                    resource_id=thread_id,
                    outcome="refused",
                    reason=f"{why} (runner {runner_id!r})",
                    data={"trigger_id": trigger.id, "runner_id": runner_id},
                )
                await insert_audit(conn, [row])
        if state.outcome == "held":
            self._raise_unless_granted(state, now)
        return {
            "done": True,
            "agent_id": agent_id,
            "thread_id": thread_id,
            "trigger_seq": trigger_seq,
        }

    async def release(self, principal: Principal, *, runner_id: str) -> dict[str, Any]:
        """End the live leases ``runner_id`` holds on the caller's agents' triggers that are not
        done (a remote runner stopping cleanly, as the in-process runner does), so another runner
        takes them over at once. An org key releases on every agent of its org, an agent token
        on its own agent. Returns ``{"runner_id", "released": n}``.

        Raises InvalidRequestError (bad runner id) and PermissionDeniedError for a user token
        (it runs no agent).
        """
        self._check(runner_id, 1)
        org_id = require_org(principal)
        if principal.is_member_scoped and principal.kind != "agent":
            raise PermissionDeniedError(
                "a user token runs no agent: release runner claims (POST /claims/release) "
                "with the org key or the agent token the runner uses"
            )
        if principal.kind == "agent":
            ids = [str(principal.subject_id)]
        else:
            async with self.ctx.engine.connect() as conn:
                q = select(agents.c.id).where(agents.c.org_id == org_id)
                ids = [str(r[0]) for r in await conn.execute(q)]
        # the update is the first statement of its transaction (it waits for SQLite's lock)
        async with write_transaction(self.ctx.engine) as conn:
            released = await release_claims(conn, runner_id, ids)
        return {"runner_id": runner_id, "released": released}

    async def done(self, principal: Principal, *, agent_id: str, thread_id: str) -> dict[str, Any]:
        """``{"agent_id", "thread_id", "done": [seq, ...]}``: the triggers of the thread that are
        done for the agent (a restarting runner skips them). Scope errors as :meth:`claim`."""
        async with self.ctx.engine.connect() as conn:
            await self._target(conn, principal, agent_id, thread_id)
            seqs = await done_seqs(conn, agent_id, thread_id)
        return {"agent_id": agent_id, "thread_id": thread_id, "done": seqs}

    async def triage_request(
        self,
        principal: Principal,
        *,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
    ) -> tuple[str, Envelope]:
        """Check that ``runner_id`` may route trigger ``trigger_seq`` of ``thread_id`` for the
        triage routine of ``agent_id`` now (``POST /runners/triage``): scope as :meth:`claim`,
        the runner holds a live claim on it, and it is a request of one of the agent's active
        triage routines — a message in one of its ``intake`` threads, not from the agent, not a
        triage forward or reply, visible to the agent. Returns ``(routine id, the request)``
        (the oldest such routine).

        Raises the scope errors of :meth:`claim`, ClaimDoneError (done already),
        ClaimHeldError (another runner's lease is live), ClaimRequiredError (no live claim of
        ``runner_id``) and InvalidRequestError (not a request of a triage routine of the agent).
        """
        self._check(runner_id, trigger_seq)
        now = time.time()
        async with self.ctx.engine.connect() as conn:
            await self._target(conn, principal, agent_id, thread_id)
            trigger = await self._trigger(conn, thread_id, trigger_seq, agent_id)
            state = await stored_claim(conn, agent_id, thread_id, trigger_seq)
            if state is not None and (
                state.outcome == "done" or (state.runner_id != runner_id and state.expires_at > now)
            ):
                self._raise_unless_granted(state, now)
            if state is None or state.runner_id != runner_id or state.expires_at <= now:
                raise ClaimRequiredError(
                    f"runner {runner_id!r} holds no live claim on trigger {trigger_seq} of "
                    f"thread {thread_id!r}; claim it first (POST /claims)"
                )
            q = (
                select(routines.c.id, routines.c.config)
                .where(
                    routines.c.agent_id == agent_id,
                    routines.c.status == "active",
                    routines.c.preset_name == "triage",
                )
                .order_by(routines.c.created_at, routines.c.id)
            )
            found = list(await conn.execute(q))
        requested = is_request(trigger, agent_id) and visible_to(agent_id, trigger)
        for routine_id, raw in found if requested else []:
            try:
                if thread_id in parse_config(raw).intake:
                    return str(routine_id), trigger
            except InvalidRequestError:
                continue
        raise InvalidRequestError(
            f"trigger_seq {trigger_seq} is not a request for a triage routine of the agent: "
            "a message from somebody else in one of its intake threads"
        )

    async def assignments(self, principal: Principal) -> list[dict[str, Any]]:
        """The work of a runner using this credential: every agent it owns that has an active
        ``participate`` or ``triage`` routine, with what a prompt needs and the threads to follow.

        Returns ``[{"agent": {"id", "name", "org_id", "org_name", "identity", "model",
        "inbox_cap"},
        "threads": [{"thread_id", "title", "since", "preset"}], "triage": [{"routine_id",
        "config"}]}]``. One ``threads`` entry per (thread, routine): ``preset`` is
        ``"participate"`` (the agent takes part and has that routine) or ``"triage"`` (an intake
        thread of its triage routine, whose requests are that routine's, see
        :mod:`agent_network.runtime.triage`); a thread can have both. ``since``: ISO time;
        messages committed before it are not that routine's to answer. ``triage``: the agent's
        active triage routines, oldest first (id and stored config; a request goes to the
        first whose ``intake`` holds its thread). An org key gets all its agents, an agent
        token its own agent; a user token gets an empty list.
        """
        org_id = require_org(principal)
        if principal.is_member_scoped and principal.kind != "agent":
            return []
        async with self.ctx.engine.connect() as conn:
            q = (
                select(agents, orgs.c.name.label("org_name"))
                .join(orgs, orgs.c.id == agents.c.org_id)
                .where(agents.c.org_id == org_id, agents.c.deleted_at.is_(None))
                .order_by(agents.c.created_at)
            )
            if principal.kind == "agent":
                q = q.where(agents.c.id == principal.subject_id)
            rows = list((await conn.execute(q)).mappings())
            ids = [r["id"] for r in rows]
            pairs = [(*p, "participate") for p in await participations(conn, ids)] if ids else []
            pairs += [(*p, "triage") for p in await triage_participations(conn, ids)] if ids else []
            q_titles = select(threads.c.id, threads.c.title).where(
                threads.c.id.in_({p[1] for p in pairs})
            )
            titles = {r[0]: r[1] for r in await conn.execute(q_titles)}
            q_routines = (
                select(
                    routines.c.agent_id, routines.c.preset_name, routines.c.id, routines.c.config
                )
                .where(
                    routines.c.agent_id.in_(ids),
                    routines.c.status == "active",
                    routines.c.preset_name.in_(("participate", "triage")),
                )
                .order_by(routines.c.created_at, routines.c.id)
            )
            with_routine: set[str] = set()
            triage: dict[str, list[dict[str, Any]]] = {}
            for agent_id, preset, routine_id, config in await conn.execute(q_routines):
                with_routine.add(agent_id)
                if preset == "triage":
                    triage.setdefault(agent_id, []).append(
                        {"routine_id": routine_id, "config": config}
                    )
        by_agent: dict[str, list[dict[str, Any]]] = {}
        for agent_id, thread_id, since, preset in sorted(pairs):
            by_agent.setdefault(agent_id, []).append(
                {
                    "thread_id": thread_id,
                    "title": titles.get(thread_id, ""),
                    "since": since,
                    "preset": preset,
                }
            )
        return [
            {
                "agent": {
                    **{k: r[k] for k in ("id", "name", "org_id", "org_name", "identity", "model")},
                    "inbox_cap": _inbox_cap(r["rule"]),
                },
                "threads": by_agent.get(r["id"], []),
                "triage": triage.get(r["id"], []),
            }
            for r in rows
            if r["id"] in with_routine
        ]

    # ------------------------------------------------------------- helpers

    @staticmethod
    def _raise_unless_granted(state: ClaimState, now: float) -> None:
        if state.outcome == "done":
            raise ClaimDoneError("this trigger is done already", details={"reason": "done"})
        if state.outcome == "held":
            retry = max(0.0, state.expires_at - now)
            raise ClaimHeldError(
                f"runner {state.runner_id!r} holds this trigger for {retry:.1f} s more",
                details={
                    "runner_id": state.runner_id,
                    "expires_at": state.expires_at,
                    "retry_after": round(retry, 3),
                },
            )

    async def _refusal(self, agent: Any, thread: Any, trigger: Envelope) -> Refusal | None:
        """The checks before a model call; ``inbound_from`` applies to a message trigger only
        (an ack or a context change is not a message to the agent, as in-process)."""
        async with self.ctx.engine.connect() as conn:
            if trigger.type == EV_MESSAGE and not RuleService.inbound_allows(
                parse_rule(agent["rule"]),
                trigger.sender_id,
                trigger.sender_org_id,
                agent["org_id"],
            ):
                sender_name, sender_org = await _sender_of(conn, trigger)
                return Refusal(
                    "rule.refused",
                    f"{RuleViolationError.code}: inbound_from does not admit {sender_name!r} "
                    f"({trigger.sender_id} of {sender_org} {trigger.sender_org_id})",
                )
            return await preflight(self.ctx, self.rules, conn, agent, thread, trigger)

    async def _finish_refused(
        self, agent: Any, trigger: Envelope, runner_id: str, refusal: Refusal
    ) -> None:
        async with write_transaction(self.ctx.engine) as conn:
            await complete_claim(
                conn,
                agent_id=agent["id"],
                thread_id=trigger.thread_id,
                trigger_seq=trigger.seq,
                runner_id=runner_id,
                now=time.time(),
            )
            if refusal.audit:
                await insert_audit(
                    conn,
                    [
                        audit_row(
                            org_id=agent["org_id"],
                            principal_kind="agent",
                            principal_id=agent["id"],
                            action=refusal.action,
                            resource_kind="thread",
                            resource_id=trigger.thread_id,
                            outcome="refused",
                            reason=refusal.reason,
                            data={"trigger_id": trigger.id, "runner_id": runner_id},
                        )
                    ],
                )
