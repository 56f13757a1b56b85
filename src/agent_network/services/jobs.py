"""What a runner's job needs, built once on the server, and the checks and post of an agent's
reply — for both runners (the in-process one calls these functions, a remote one gets the job
with its claim, ``POST /claims``).

:func:`build_job` gathers, for one agent answering one trigger: the agent card, the visible
(audience-filtered) history up to the trigger, whether the agent may speak now (audited like a
refused post when not), the protocol notes, a workflow's tools and handoff targets, knowledge
chunks, the reply's audience and whether an empty model reply passes the turn.
:func:`post_reply` is the agent's reply: the job's internal principal (:func:`job_principal`)
through the one post function (services/posting.py), which checks scope, rule, egress, rate and
the turn again and appends with the reply key. Design: docs/architecture.md, "Runners: one
engine, two ports" and "One post path".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import RowMapping, select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    NotYourTurnError,
    PermissionDeniedError,
    ProtocolViolationError,
    RunawayBudgetError,
)
from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.adapters.base import Proposal
from agent_network.protocol.adapters.workflow import WorkflowState, tools_for
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.fold import step
from agent_network.protocol.knobs import REASON_NO_TRANSITION, STATUS_ACTIVE
from agent_network.protocol.lifecycle import admit, person_message
from agent_network.protocol.state import ThreadState
from agent_network.protocol.turns import visible_to
from agent_network.services.base import ServiceContext
from agent_network.services.claims import agent_in_thread, preflight, reply_key
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.policy import EgressRefusedError
from agent_network.services.posting import poster_for, turn_refused
from agent_network.services.principal import Principal, RunnerJob, agent_principal
from agent_network.services.rendering import sender_names
from agent_network.services.rules import RuleService
from agent_network.store.audit import audit_row, insert_audit
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, orgs, routines, threads, users
from agent_network.store.wal import read_envelopes

__all__ = [
    "PASS_REPLY",
    "POST_REFUSALS",
    "Job",
    "JobSpec",
    "agent_and_thread",
    "audit_job",
    "build_job",
    "job_principal",
    "not_your_turn",
    "post_as_agent",
    "post_reply",
]


@dataclass(frozen=True, slots=True)
class Job:
    """One agent answering one trigger envelope, by its routine's ``preset`` (``participate``
    or ``triage``)."""

    agent_id: str
    routine_id: str
    trigger: Envelope
    preset: str = "participate"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything the runner engine needs to answer one trigger (JSON-able: ``to_data``).

    ``agent``: ``{id, name, org_id, org_name, identity, model}``; ``history``: ``[name, org
    name, content]`` of the last ``history_limit`` messages up to the trigger the agent may see,
    oldest first; ``situation``: protocol notes for the system prompt; ``knowledge``: chunks;
    ``tools``: a workflow speaker's graph tools (``ToolSpec.to_data``), ``handoff_targets`` the
    names a generic handoff may name, ``participants`` and ``names`` (name -> id) to resolve
    them; ``audience``: the reply's audience (None: everyone); ``pass_on_empty``: an empty
    model reply posts the pass text instead (the protocol waits for this agent)."""

    agent: dict[str, Any]
    title: str
    history: list[list[str]]
    situation: list[str] = field(default_factory=list)
    knowledge: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    handoff_targets: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    audience: list[str] | None = None
    pass_on_empty: bool = False

    def to_data(self) -> dict[str, Any]:
        """The spec as a JSON object (the ``job`` of a granted claim)."""
        return asdict(self)


PASS_REPLY = "I have nothing to add; I pass my turn."
"""What an agent posts when its model came out empty on a turn the protocol waits for (see
:func:`passes_turn`): silence there would stall the thread until its TTL."""


def reply_audience(
    trigger_audience: Sequence[str] | None,
    trigger_sender: tuple[str, str],
    agent_id: str,
    participant_ids: Sequence[str],
) -> list[str] | None:
    """The audience of ``agent_id``'s reply to a trigger envelope whose audience is
    ``trigger_audience`` and whose sender is ``trigger_sender`` (``(kind, id)``).

    None (everyone) when the trigger had none; otherwise the trigger's audience plus its sender,
    minus the replying agent, sorted (in a protocol thread — ``participant_ids`` not empty —
    only participants: the hub refuses anyone else, e.g. a ``system`` sender). When nobody is
    left the reply is addressed to the agent alone: it stays private rather than widening to
    everyone.
    """
    if trigger_audience is None:
        return None
    people = set(trigger_audience)
    kind, sender_id = trigger_sender
    if kind != "system":
        people.add(sender_id)
    if participant_ids:
        people &= set(participant_ids)
    people.discard(agent_id)
    return sorted(people) or [agent_id]


def handoff_targets(
    participants: Sequence[str], names: Mapping[str, str], speaker: str
) -> tuple[str, ...]:
    """Names (else ids) of the participants other than ``speaker``."""
    by_id = {pid: name for name, pid in sorted(names.items())}
    return tuple(by_id.get(pid, pid) for pid in participants if pid != speaker)


def passes_turn(state: ThreadState, actor: Sender) -> bool:
    """Whether an agent whose model produced nothing usable posts :data:`PASS_REPLY` instead of
    staying silent: only when the protocol waits for exactly this agent (``expected_speaker``)
    and the pass keeps the thread going — folded on a copy of ``state``, the pass must be
    admitted and must not end the thread with ``no_transition`` (a workflow whose graph has no
    rule for this speaker is waiting for something else, e.g. a context change, so silence is
    right there). A discussion passes the turn on; a round robin moves on; a consulting reply
    of "nothing to add" completes the consultation. Where anyone may speak, silence is fine."""
    if state.expected_speaker != actor.id:
        return False
    data = {"content": PASS_REPLY}
    try:
        admit(state, Proposal(type=EV_MESSAGE, data=data, sender=actor))
    except AgentNetworkError:
        return False
    probe = Envelope(
        thread_id=state.thread_id,
        seq=state.last_seq + 1,
        id="env_pass_probe",
        type=EV_MESSAGE,
        data=data,
        sender_kind=actor.kind,
        sender_id=actor.id,
        sender_org_id=actor.org_id,
        audience=None,
        causation_id=None,
        idempotency_key=None,
        created_at=state.created.at if state.created is not None else "",
        prev_hash=state.head_hash,
        hash="",
    )
    return step(state, probe).close_reason != REASON_NO_TRANSITION


def _tools(state: ThreadState, agent_id: str) -> dict[str, Any]:
    """A workflow speaker's tools for a :class:`JobSpec` (the graph's for it, the generic
    handoff's targets, the participants and names to resolve them); none elsewhere."""
    if not isinstance(state.protocol, WorkflowState) or state.status != STATUS_ACTIVE:
        return {}
    names = dict(state.knobs.names)
    ids = list(state.participant_ids)
    specs = tools_for(state, Sender("agent", agent_id, ""))
    return {
        "tools": [s.to_data() for s in specs],
        "handoff_targets": list(handoff_targets(ids, names, agent_id)),
        "participants": ids,
        "names": names,
    }


def _reply_audience(
    trigger: Envelope, agent_id: str, participant_ids: Sequence[str]
) -> list[str] | None:
    return reply_audience(
        trigger.audience, (trigger.sender_kind, trigger.sender_id), agent_id, participant_ids
    )


async def agent_and_thread(
    conn: AsyncConnection, agent_id: str, thread_id: str
) -> tuple[RowMapping | None, RowMapping | None]:
    """The live agent row (with ``org_name``) and the thread row; None for what is gone."""
    agent = (
        (
            await conn.execute(
                select(agents, orgs.c.name.label("org_name"))
                .join(orgs, orgs.c.id == agents.c.org_id)
                .where(agents.c.id == agent_id, agents.c.deleted_at.is_(None))
            )
        )
        .mappings()
        .first()
    )
    thread = (
        (await conn.execute(select(threads).where(threads.c.id == thread_id))).mappings().first()
    )
    return agent, thread


async def audit_job(
    ctx: ServiceContext,
    job: Job,
    action: str,
    reason: str,
    *,
    org_id: str | None = None,
    outcome: str = "refused",
    data: dict[str, Any] | None = None,
) -> None:
    """Audit what the agent's job did or was refused (``data``: trigger and routine ids)."""
    if org_id is None:
        async with ctx.engine.connect() as conn:
            org_id = (
                await conn.execute(select(agents.c.org_id).where(agents.c.id == job.agent_id))
            ).scalar_one()
    row: dict[str, Any] = audit_row(
        org_id=org_id,
        principal_kind="agent",
        principal_id=job.agent_id,
        action=action,
        resource_kind="thread",
        resource_id=job.trigger.thread_id,
        outcome=outcome,
        reason=reason,
        data={"trigger_id": job.trigger.id, "routine_id": job.routine_id, **(data or {})},
    )
    async with write_transaction(ctx.engine) as conn:
        await insert_audit(conn, [row])


def job_principal(job: Job, org_id: str, *, answers_person: bool | None = None) -> Principal:
    """The internal principal of ``job``'s agent (of org ``org_id``) answering its trigger
    (services/principal.py :func:`agent_principal`): what the runner posts and audits as."""
    trigger = job.trigger
    if answers_person is None:
        answers_person = person_message(trigger.type, trigger.sender_kind)  # see budget_spent
    return agent_principal(
        job.agent_id,
        org_id,
        RunnerJob(trigger.id, trigger.thread_id, job.routine_id, answers_person),
    )


async def not_your_turn(ctx: ServiceContext, job: Job, state: ThreadState, actor: Sender) -> bool:
    """Whether the agent may NOT speak now (services/posting.py :func:`turn_refused`, audited
    as ``routine.skipped`` or a spent budget while the thread is live)."""
    principal = job_principal(job, actor.org_id)
    return await turn_refused(ctx, principal, state, actor) is not None


POST_REFUSALS = (
    NotFoundError,
    PermissionDeniedError,
    InvalidRequestError,
    EgressRefusedError,
    ConflictError,
    RunawayBudgetError,
    NotYourTurnError,
    ProtocolViolationError,
)
"""What the one post function refuses a runner's message with (each audited there or by the
hub, or a lost scope); ThreadClosedError is a ConflictError."""


async def post_as_agent(
    ctx: ServiceContext,
    rules: RuleService,
    job: Job,
    org_id: str,
    thread_id: str,
    content: str,
    *,
    key: str,
    tool_calls: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    audience: list[str] | None = None,
    count_rate: bool = True,
) -> Envelope:
    """Post ``content`` as ``job``'s agent (of org ``org_id``) into ``thread_id`` through the
    one post function (services/posting.py :meth:`~PostPath.post_message`) with the job's
    internal principal: idempotency ``key`` stored as given, causation the trigger, ``extra``
    server-set ``data`` (the triage marker). Returns the stored envelope; raises one of
    :data:`POST_REFUSALS` (audited) when refused, RateRefusedError for the agent's rate."""
    env, _grant = await poster_for(rules).post_message(
        job_principal(job, org_id),
        thread_id,
        content,
        agent_id=job.agent_id,
        idempotency_key=key,
        causation_id=job.trigger.id,
        audience=audience,
        tool_calls=tool_calls or None,
        extra=extra,
        count_rate=count_rate,
    )
    return env


async def post_reply(
    ctx: ServiceContext,
    rules: RuleService,
    job: Job,
    agent: Any,
    content: str,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    audience: list[str] | None = None,
    take_rate: bool = True,
) -> Envelope | None:
    """The agent's reply to ``job.trigger`` in its thread, under the key
    ``reply:<agent>:<trigger>`` (``extra``: more ``data``, e.g. the triage marker), through
    the one post function (:func:`post_as_agent`): its scope, rule, egress, rate (unless
    ``take_rate`` is False: already counted) and turn checks. Each refusal is audited; returns
    the stored reply or None."""
    trigger = job.trigger
    try:
        return await post_as_agent(
            ctx,
            rules,
            job,
            agent["org_id"],
            trigger.thread_id,
            content,
            key=reply_key(agent["id"], trigger.id),
            tool_calls=tool_calls,
            extra=extra,
            audience=audience,
            count_rate=take_rate,
        )
    except POST_REFUSALS:
        return None


async def protocol_notes(conn: AsyncConnection, state: ThreadState, agent_id: str) -> list[str]:
    """Prompt lines about the thread's protocol for the agent whose turn it is: the adapter
    and the participants (by name), and a workflow's context. [] for an open thread."""
    if not state.participants or state.adapter == "open":
        return []
    ids = [pid for pid in state.participant_ids if pid != agent_id]
    found = {
        r[0]: r[1]
        for t in (agents, users)
        for r in await conn.execute(select(t.c.id, t.c.name).where(t.c.id.in_(ids)))
    }
    others = ", ".join(found.get(pid, pid) for pid in ids)
    lines = [f"This is a {state.adapter} thread with {others}; it is your turn to speak."]
    ws = state.protocol
    if isinstance(ws, WorkflowState) and ws.context:
        shown = ", ".join(f"{k}={v}" for k, v in ws.context)
        lines.append(f"Workflow context: {shown}")
    return lines


async def build_job(
    ctx: ServiceContext,
    rules: RuleService,
    job: Job,
    *,
    knowledge: KnowledgeService | None = None,
    checked: bool = False,
    with_knowledge: bool = True,
) -> JobSpec | None:
    """What ``job`` (a participate job) needs to be answered, or None when the agent does not
    answer: the agent or thread is gone, the agent no longer takes part, the checks before a
    model call refuse it (:func:`preflight`, audited; skipped when ``checked``: a claim ran
    them already), it already spoke after the trigger in a protocol thread, or it may not speak
    now (:func:`not_your_turn`, audited)."""
    trigger = job.trigger
    async with ctx.engine.connect() as conn:
        agent, thread = await agent_and_thread(conn, job.agent_id, trigger.thread_id)
        if agent is None or thread is None:
            return None
        if not await agent_in_thread(conn, agent["id"], thread):
            return None  # removed (visa revoked, left, deleted) after the trigger was queued
        if not checked:
            refusal = await preflight(ctx, rules, conn, agent, thread, trigger)
            if refusal is not None:
                if refusal.audit:
                    await audit_job(
                        ctx, job, refusal.action, refusal.reason, org_id=agent["org_id"]
                    )
                return None
        state = await ctx.hub.state(trigger.thread_id)
        actor = Sender("agent", agent["id"], agent["org_id"], agent["name"])
        envs = await ctx.hub.read(trigger.thread_id)
        if state.participants and any(
            e.type == EV_MESSAGE and e.sender_id == agent["id"] and e.seq > trigger.seq
            for e in envs
        ):
            return None  # it spoke after this trigger: that was its turn
        if await not_your_turn(ctx, job, state, actor):
            return None
        history_envs = [
            e
            for e in envs
            if e.type == EV_MESSAGE and e.seq <= trigger.seq and visible_to(agent["id"], e)
        ][-ctx.settings.history_limit :]
        names = await sender_names(conn, history_envs)
        notes = await protocol_notes(conn, state, agent["id"])
    history = [
        [names[e.sender_id][0], names[e.sender_id][1], str(e.data.get("content", ""))]
        for e in history_envs
    ]
    query = history[-1][2] if history else str(thread["title"])
    if trigger.type == EV_MESSAGE:
        query = str(trigger.data.get("content", ""))
    chunks = (
        await (knowledge or KnowledgeService(ctx)).retrieve(
            agent["org_id"], agent["id"], query, ctx.settings.knowledge_chunks
        )
        if with_knowledge
        else []
    )
    return JobSpec(
        agent={k: agent[k] for k in ("id", "name", "org_id", "org_name", "identity", "model")},
        title=str(thread["title"]),
        history=history,
        situation=notes,
        knowledge=[dict(c) for c in chunks],
        **_tools(state, agent["id"]),
        audience=_reply_audience(trigger, agent["id"], state.participant_ids),
        # a pass answers a message; an agent opening or resuming a thread (its turn came from
        # an ack or a context change) with nothing to say stays silent
        pass_on_empty=trigger.type == EV_MESSAGE and passes_turn(state, actor),
    )


async def job_for_claim(
    ctx: ServiceContext,
    rules: RuleService,
    principal: Principal,
    *,
    agent_id: str,
    thread_id: str,
    trigger_seq: int,
) -> dict[str, Any] | None:
    """The job of a claim just granted to ``principal``'s runner (``POST /claims`` with
    ``job``): :func:`build_job` for the agent's participate routine (the claim ran the checks
    before a model call already) as JSON, or None when the agent is not to answer now. The
    org's knowledge goes only to a runner whose credential may read it (an org key)."""
    async with ctx.engine.connect() as conn:
        found = await read_envelopes(conn, thread_id, after=trigger_seq - 1, limit=1)
        routine_id = (
            await conn.execute(
                select(routines.c.id)
                .where(
                    routines.c.agent_id == agent_id,
                    routines.c.status == "active",
                    routines.c.preset_name == "participate",
                )
                .order_by(routines.c.created_at, routines.c.id)
                .limit(1)
            )
        ).scalar()
    if not found or found[0].seq != trigger_seq:
        return None
    job = Job(agent_id, str(routine_id or ""), found[0])
    spec = await build_job(
        ctx, rules, job, checked=True, with_knowledge=not principal.is_member_scoped
    )
    return spec.to_data() if spec is not None else None
