"""Routing one intake request of a triage routine (hub-and-spoke), for both runners: the checks,
the forward into the route's thread and the reply in intake. The in-process runner calls
:func:`route_request` with its model's classification; ``POST /runners/triage`` with a remote
runner's. The rules (config, labels, texts) are in :mod:`agent_network.services.triage`. Design:
docs/architecture.md, "Runners: one engine, two ports".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from agent_network.errors import InvalidRequestError, RunawayBudgetError
from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.knobs import LIVE_STATUSES
from agent_network.protocol.lifecycle import may_speak
from agent_network.services.base import ServiceContext
from agent_network.services.claims import Refusal, agent_in_thread, preflight
from agent_network.services.jobs import (
    POST_REFUSALS,
    Job,
    agent_and_thread,
    audit_job,
    not_your_turn,
    post_as_agent,
    post_reply,
    reply_audience,
)
from agent_network.services.posting import RateRefusedError
from agent_network.services.rendering import sender_names
from agent_network.services.rules import RuleService, RuleViolationError
from agent_network.services.triage import (
    MARKER,
    TriageConfig,
    decide,
    forward_content,
    forward_key,
    marker,
    parse_config,
    reply_content,
    undelivered_content,
    unroutable_content,
)
from agent_network.store.tables import routines, threads
from agent_network.store.wal import find_by_idempotency

Classify = Callable[[Any, TriageConfig, str, str, str], Awaitable[str | None]]
"""The in-process runner's classifier: ``(agent row, config, request, sender name, request
id) -> the model's answer`` (None: the model failed or is not used)."""


@dataclass(frozen=True, slots=True)
class TriageOutcome:
    """What one triage job did: the route ``label`` chosen (None: nothing matched), the stored
    forward (None: not forwarded) and the stored reply in intake (None: no reply, e.g. refused
    or not the agent's turn)."""

    label: str | None
    forward: Envelope | None
    reply: Envelope | None


async def route_request(
    ctx: ServiceContext,
    rules: RuleService,
    job: Job,
    *,
    answer: str | None = None,
    classify: Classify | None = None,
) -> TriageOutcome | None:
    """Route one intake request of a triage routine (see :mod:`agent_network.runtime.triage`).

    Checks as for participate (the routine is still active and watches the thread, the
    agent takes part, :func:`preflight`, may it speak), then: if a forward of this request
    is already stored in one of the route threads (a runner stopped between the forward
    and the reply), only the reply is written, with that forward's label and no model call.
    Otherwise it classifies (``classify``: the agent's model, in process; else ``answer``, a
    remote runner's model's answer; then
    keywords, then the fallback), checks
    the route thread (:meth:`_route_refusal`), applies the egress policy to the forward and
    counts it against the rate, forwards (key ``triage:<agent>:<request>``, causation the
    request), then replies in intake (key ``reply:<agent>:<request>``, causation the
    request): ``Routed to <label>: <route title>``, or that nothing matched. Every refusal
    is audited as in participate. When the forward itself was refused (the route thread is
    closed or out of budget, the rule or the egress policy forbids it), the reply says the
    request stays in intake (:func:`~agent_network.runtime.triage.undelivered_content`,
    marker ``"delivered": False``) — unless the rate refused it; after any other refusal
    nothing is posted. Returns what it did, or None when it stopped before routing (the
    routine, agent or thread is gone or changed, a preflight refusal, not its turn).
    """
    trigger = job.trigger
    async with ctx.engine.connect() as conn:
        agent, thread = await agent_and_thread(conn, job.agent_id, trigger.thread_id)
        routine = (
            (await conn.execute(select(routines).where(routines.c.id == job.routine_id)))
            .mappings()
            .first()
        )
        if agent is None or thread is None or routine is None:
            return None
        if routine["status"] != "active":
            return None  # paused after the request was queued
        try:
            config = parse_config(routine["config"])
        except InvalidRequestError as err:
            await audit_job(ctx, job, "routine.failed", err.message, org_id=agent["org_id"])
            return None
        if trigger.thread_id not in config.intake:
            return None  # reconfigured after the request was queued
        if not await agent_in_thread(conn, agent["id"], thread):
            return None
        refusal = await preflight(ctx, rules, conn, agent, thread, trigger)
        if refusal is not None:
            if refusal.audit:
                await audit_job(ctx, job, refusal.action, refusal.reason, org_id=agent["org_id"])
            return None
        actor = Sender("agent", agent["id"], agent["org_id"], agent["name"])
        if await not_your_turn(ctx, job, await ctx.hub.state(trigger.thread_id), actor):
            return None
        fkey = forward_key(agent["id"], trigger.id)
        stored = await find_by_idempotency(
            conn, [(r.thread_id, fkey) for r in config.routes.values()]
        )
        sender_name = (await sender_names(conn, [trigger]))[trigger.sender_id][0]
    request = str(trigger.data.get("content", ""))
    forwarded = next(iter(stored.values()), None)
    label: str | None
    how: Any
    if forwarded is not None:  # stopped between the forward and the reply: reply only
        mark = forwarded.data.get(MARKER) or {}
        label, how = mark.get("label"), mark.get("by")
    else:
        if not config.use_model:
            answer = None
        elif classify is not None:
            answer = await classify(agent, config, request, sender_name, trigger.id)
        label, how = decide(config, answer, request)
        if label is not None:
            forwarded, may_reply = await _forward(
                ctx, rules, job, agent, config, label, how, thread, sender_name, request
            )
            if forwarded is None and not may_reply:
                return TriageOutcome(label, None, None)
    delivered = forwarded is not None or label is None
    if forwarded is not None and label is not None:
        async with ctx.engine.connect() as conn:
            title = (
                await conn.execute(
                    select(threads.c.title).where(threads.c.id == forwarded.thread_id)
                )
            ).scalar()
        content = reply_content(label, str(title or forwarded.thread_id))
        counted = True  # the forward counted against the agent's rate
    else:
        content = (
            unroutable_content(config.labels)
            if label is None
            else undelivered_content(label)  # the forward was refused (audited)
        )
        counted = False  # the only post for this request: it counts against the rate
    mark = marker(
        "reply",
        label=label,
        how=how,
        intake_thread_id=trigger.thread_id,
        request_id=trigger.id,
        delivered=delivered,
    )
    reply = await post_reply(
        ctx,
        rules,
        job,
        agent,
        content,
        extra={MARKER: mark},
        audience=reply_audience(
            trigger.audience,
            (trigger.sender_kind, trigger.sender_id),
            agent["id"],
            (await ctx.hub.state(trigger.thread_id)).participant_ids,
        ),
        take_rate=not counted,
    )
    return TriageOutcome(label, forwarded, reply)


async def _forward(
    ctx: ServiceContext,
    rules: RuleService,
    job: Job,
    agent: Any,
    config: TriageConfig,
    label: str,
    how: Any,
    intake: Any,
    sender_name: str,
    request: str,
) -> tuple[Envelope | None, bool]:
    """Forward the request into the thread of route ``label`` (after its checks, the egress
    policy and the rate). Returns ``(the stored forward, True)``, or ``(None, may_reply)``
    when refused (audited): ``may_reply`` is False only when the agent's rate refused it
    (a reply in intake would exceed the rate too)."""
    trigger = job.trigger
    route_id = config.route_for(label).thread_id
    refusal = await _route_refusal(ctx, rules, agent, label, route_id)
    if refusal is not None:
        await audit_job(ctx, job, refusal.action, refusal.reason, org_id=agent["org_id"])
        return None, True
    try:
        forwarded = await post_as_agent(
            ctx,
            rules,
            job,
            agent["org_id"],
            route_id,
            forward_content(sender_name, intake["title"], request),
            key=forward_key(agent["id"], trigger.id),
            extra={
                MARKER: marker(
                    "forward",
                    label=label,
                    how=how,
                    intake_thread_id=trigger.thread_id,
                    request_id=trigger.id,
                )
            },
        )
    except RateRefusedError:
        return None, False  # audited; a reply in intake would exceed the rate too
    except POST_REFUSALS:
        return None, True  # audited (or the agent lost the route thread meanwhile)
    return forwarded, True


async def _route_refusal(
    ctx: ServiceContext, rules: RuleService, agent: Any, label: str, thread_id: str
) -> Refusal | None:
    """Why the agent may not forward into route ``label``'s thread ``thread_id`` now (it
    is gone, the agent no longer takes part, it is closed, its runaway budget is spent, the
    agent's rule forbids posting there, or its protocol does not let the agent speak), or
    None."""
    where = f"route {label!r} (thread {thread_id!r})"
    async with ctx.engine.connect() as conn:
        route = (
            (
                await conn.execute(
                    select(threads).where(threads.c.id == thread_id, threads.c.deleted_at.is_(None))
                )
            )
            .mappings()
            .first()
        )
        if route is None or not await agent_in_thread(conn, agent["id"], route):
            return Refusal("routine.failed", f"{where}: the agent does not take part in it")
        state = await ctx.hub.state(thread_id)
        if state.status not in LIVE_STATUSES:
            return Refusal("routine.failed", f"{where}: the thread is {state.status}")
        if state.consecutive_agent >= state.agent_budget:
            return Refusal(
                "envelope.message",
                f"{RunawayBudgetError.code}: {where}: budget of {state.agent_budget} "
                "consecutive agent messages spent; nothing forwarded",
            )
        try:
            await rules.check_send(
                conn,
                agent,
                thread_id=thread_id,
                team_id=route["team_id"],
                adapter=state.adapter,
                consume_rate=False,
            )
        except RuleViolationError as err:
            return Refusal("envelope.message", f"{err.code}: {where}: {err.message}")
        if not may_speak(state, Sender("agent", agent["id"], agent["org_id"], agent["name"])):
            return Refusal("routine.skipped", f"{where}: the agent may not speak there now")
    return None
