"""The in-process runner: executes ``participate`` routines for the agents of every org.

For each committed ``message`` envelope, every active participate routine whose agent is a
member of the thread's team/network (and did not send it) gets a job: claim the trigger (a lease
in ``runner_claims``, shared with remote runners: ``services/claims.py``), run the checks before
a model call (:func:`~agent_network.services.claims.preflight`), assemble the prompt, call the
agent's model through pydantic-ai (:func:`generate_reply`, also used by the remote runner), clean
the reply, post it through the hub with the trigger as causation and the idempotency key
``reply:<agent>:<trigger>`` — so an agent answers one trigger at most once, also after a restart,
a redelivery or a double claim — then complete the claim. A trigger whose claim another runner
holds is retried when that lease expires (take-over if it crashed). A durable cursor per (agent,
thread) records progress; on start the runner catches up from its cursors and from claims left
open by a runner that died.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic_ai import Agent as ModelAgent
from pydantic_ai.settings import ModelSettings
from sqlalchemy import exists, select

from agent_network.errors import AgentNetworkError, RunawayBudgetError, ThreadClosedError
from agent_network.hub import EV_MESSAGE
from agent_network.model.envelope import Actor, Envelope
from agent_network.model.rule import Rule
from agent_network.runtime.cleaning import clean_reply
from agent_network.runtime.models import build_model, resolve_model_name
from agent_network.runtime.prompt import Prompt, build_prompt
from agent_network.services.base import ServiceContext
from agent_network.services.claims import agent_in_thread, participations, preflight, reply_key
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.policy import EgressRefusedError, apply_egress, load_egress_policy
from agent_network.services.rules import RuleService, RuleViolationError, parse_rule
from agent_network.services.threads import sender_names
from agent_network.store.audit import audit_row, insert_audit
from agent_network.store.claims import (
    ClaimState,
    complete_claim,
    open_claims,
    release_claims,
    try_claim,
)
from agent_network.store.cursors import advance_cursor, all_cursors, ensure_cursor
from agent_network.store.tables import (
    agents,
    members,
    orgs,
    routines,
    thread_participants,
    threads,
)
from agent_network.store.wal import find_by_idempotency, read_envelopes

log = structlog.get_logger(__name__)

MODEL_TIMEOUT = 300.0  # seconds for one model call
REPLY_ATTEMPTS = 3  # model calls per trigger while the cleaned reply comes out empty
REPLY_MAX_TOKENS = 200
REPLY_MAX_SENTENCES = 3
CLAIM_LEASE = 60.0  # seconds a claim of the in-process runner lasts unless renewed
RETRY_MARGIN = 0.2  # seconds after another runner's lease expires before trying to take over

__all__ = ["Job", "Runner", "generate_reply", "new_runner_id", "reply_key"]


@dataclass(frozen=True, slots=True)
class Job:
    """One agent answering one trigger envelope."""

    agent_id: str
    routine_id: str
    trigger: Envelope


def new_runner_id(kind: str) -> str:
    """A runner id unique to this process: ``<kind>:<host>:<pid>:<random>`` (at most 100
    characters). A restarted process gets a new id, so its predecessor's claims run out."""
    return f"{kind}:{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


async def generate_reply(
    *,
    model_name: str,
    prompt: Prompt,
    speaker_name: str,
    other_names: list[str],
    seed_key: str,
) -> str:
    """Call the model ``model_name`` with ``prompt`` and return the cleaned reply.

    Up to :data:`REPLY_ATTEMPTS` calls while the cleaned text comes out empty; each call at most
    :data:`REPLY_MAX_TOKENS` tokens and :data:`MODEL_TIMEOUT` seconds. The local model gets a
    seed derived from ``seed_key`` and the attempt (reproducible per trigger). Returns "" when
    every attempt came out empty. Raises ModelUnavailableError (the model cannot be built),
    TimeoutError (a call took too long) and whatever the model's provider raises.
    """
    model = build_model(model_name)
    for attempt in range(REPLY_ATTEMPTS):
        settings: ModelSettings = {"max_tokens": REPLY_MAX_TOKENS}
        if model_name.startswith("local:"):
            # reproducible per (agent, trigger, attempt); a new sample on each retry
            settings["seed"] = zlib.crc32(f"{seed_key}:{attempt}".encode())
        with anyio.fail_after(MODEL_TIMEOUT):
            result = await ModelAgent(model, system_prompt=prompt.system).run(
                prompt.user, model_settings=settings
            )
        reply = clean_reply(
            str(result.output),
            speaker_name=speaker_name,
            other_names=other_names,
            max_sentences=REPLY_MAX_SENTENCES,
        )
        if reply:
            return reply
    return ""


class Runner:
    """Runs routines in-process. Start with ``await tg.start(runner.run)``; cancel to stop.

    ``workers`` is how many jobs run at once (the local model itself runs one at a time).
    ``jobs_done`` counts finished jobs (for tests and the demo's progress). ``runner_id`` names
    this runner in claims (default: unique per process); ``lease_seconds`` is how long a claim
    lasts without renewal (renewed every third of it while a job runs).
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        workers: int = 2,
        rules: RuleService | None = None,
        runner_id: str | None = None,
        lease_seconds: float = CLAIM_LEASE,
    ) -> None:
        self.ctx = ctx
        self.knowledge = KnowledgeService(ctx)
        self.rules = rules or RuleService(ctx)
        self.runner_id = runner_id or new_runner_id("inproc")
        self.lease_seconds = lease_seconds
        self._workers = workers
        self._send: MemoryObjectSendStream[Job]
        self._recv: MemoryObjectReceiveStream[Job]
        self._send, self._recv = anyio.create_memory_object_stream[Job](math.inf)
        self.jobs_done = 0
        self._pending = 0
        self._pending_by_agent: dict[str, int] = {}
        self._queued: set[tuple[str, str]] = set()  # (agent_id, trigger id) queued or running
        self._idle = anyio.Event()
        self._idle.set()
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, catch up from cursors and open claims, then handle jobs until cancelled.

        On the way out the claims this runner still holds are released (a clean stop does not
        make the next runner wait for their leases)."""
        try:
            await self._run(task_status)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with self.ctx.engine.begin() as conn:
                    await release_claims(conn, self.runner_id)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for _ in range(self._workers):
                tg.start_soon(self._worker)
            while True:
                sub = self.ctx.hub.subscribe()
                await self._catch_up()
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                async for env in sub:
                    if env.type == EV_MESSAGE:
                        await self._dispatch(env)
                if not sub.lagged:
                    return
                log.warning("runner.lagged; catching up from cursors")

    async def wait_idle(self) -> None:
        """Wait until no job is queued, running or waiting for another runner's lease."""
        await self._idle.wait()

    # ------------------------------------------------------------ dispatching

    async def _dispatch(self, env: Envelope, only_agent: str | None = None) -> None:
        async with self.ctx.engine.begin() as conn:
            q = (
                select(routines.c.id, routines.c.agent_id, agents.c.rule, agents.c.org_id)
                .join(agents, agents.c.id == routines.c.agent_id)
                .join(threads, threads.c.id == env.thread_id)
                .join(
                    members,
                    (members.c.team_id == threads.c.team_id)
                    & (members.c.member_kind == "agent")
                    & (members.c.member_id == routines.c.agent_id),
                )
                .where(
                    routines.c.status == "active",
                    routines.c.preset_name == "participate",
                    routines.c.event_type == "thread.message_added",
                    agents.c.deleted_at.is_(None),
                    routines.c.agent_id != env.sender_id,
                    (threads.c.visibility == "members")
                    | exists().where(
                        (thread_participants.c.thread_id == threads.c.id)
                        & (thread_participants.c.member_kind == "agent")
                        & (thread_participants.c.member_id == routines.c.agent_id)
                    ),
                )
            )
            if only_agent is not None:
                q = q.where(routines.c.agent_id == only_agent)
            jobs: dict[str, Job] = {}
            refusals: list[dict[str, Any]] = []
            sender_name, sender_org = (await sender_names(conn, [env]))[env.sender_id]
            for routine_id, agent_id, raw_rule, org_id in (await conn.execute(q)).all():
                if agent_id in jobs or (agent_id, env.id) in self._queued:
                    continue
                job = Job(agent_id, routine_id, env)
                reason = self._refuse_trigger(
                    parse_rule(raw_rule), agent_id, sender_name, sender_org
                )
                if reason is not None:
                    refusals.append(
                        audit_row(
                            org_id=org_id,
                            principal_kind="agent",
                            principal_id=agent_id,
                            action="rule.refused",
                            resource_kind="thread",
                            resource_id=env.thread_id,
                            outcome="refused",
                            reason=f"{RuleViolationError.code}: {reason}",
                            data={"trigger_id": env.id, "routine_id": routine_id},
                        )
                    )
                    await advance_cursor(conn, agent_id, env.thread_id, env.seq)
                    # done for every runner (unless one holds it right now)
                    await complete_claim(
                        conn,
                        agent_id=agent_id,
                        thread_id=env.thread_id,
                        trigger_seq=env.seq,
                        runner_id=self.runner_id,
                        now=time.time(),
                    )
                    continue
                jobs[agent_id] = job
                await ensure_cursor(conn, job.agent_id, env.thread_id, env.seq - 1)
            await insert_audit(conn, refusals)
        for job in jobs.values():
            self._queued.add((job.agent_id, env.id))
            self._pending_by_agent[job.agent_id] = self._pending_by_agent.get(job.agent_id, 0) + 1
            self._pending += 1
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
            await self._send.send(job)

    def _refuse_trigger(
        self, rule: Rule | None, agent_id: str, sender_name: str, sender_org: str
    ) -> str | None:
        """Why the agent's rule drops this trigger (inbound_from, inbox_cap), or None."""
        if not RuleService.inbound_allows(rule, sender_name, sender_org):
            return f"inbound_from does not admit {sender_name!r} ({sender_org})"
        cap = rule.inbox_cap if rule is not None else None
        if cap is not None and self._pending_by_agent.get(agent_id, 0) >= cap:
            return f"inbox_cap {cap} reached; trigger dropped"
        return None

    async def _catch_up(self) -> None:
        """Dispatch every message an active participate routine has not handled yet.

        Per (agent, thread) of the agent's teams and networks: after the durable cursor if there
        is one; otherwise every message committed after both the routine and the membership
        existed (a message committed just before a crash, whose dispatch never happened, has no
        cursor yet). Then every trigger whose claim was left open (its runner died before
        completing it; it is taken over once the lease ran out). Replies already in the WAL are
        skipped by their idempotency key.
        """
        async with self.ctx.engine.connect() as conn:
            cursors = {(a, t): seq for a, t, seq in await all_cursors(conn)}
            pairs = await participations(conn)
            unfinished = await open_claims(conn)
        for agent_id, thread_id, since in pairs:
            seq = cursors.get((agent_id, thread_id))
            for env in await self.ctx.hub.read(thread_id, after=seq or 0):
                if env.type != EV_MESSAGE or env.sender_id == agent_id:
                    continue
                if seq is None and env.created_at <= since:
                    continue
                await self._dispatch(env, only_agent=agent_id)
        followed = {(a, t) for a, t, _ in pairs}
        for agent_id, thread_id, trigger_seq in unfinished:
            if (agent_id, thread_id) not in followed:
                continue
            async with self.ctx.engine.connect() as conn:
                found = await read_envelopes(conn, thread_id, after=trigger_seq - 1, limit=1)
            if found and found[0].seq == trigger_seq and found[0].type == EV_MESSAGE:
                await self._dispatch(found[0], only_agent=agent_id)

    # ------------------------------------------------------------------ jobs

    async def _worker(self) -> None:
        async for job in self._recv:
            retry_in: float | None = None
            try:
                retry_in = await self._handle(job)
            except Exception as exc:  # a job never takes the runner down
                log.exception("runner.job_failed", agent_id=job.agent_id, error=repr(exc))
                await self._audit(job, "routine.failed", f"{type(exc).__name__}: {exc}")
            finally:
                if retry_in is not None and self._tg is not None:
                    # another runner holds the trigger: look again when its lease runs out
                    self._tg.start_soon(self._retry_later, job, retry_in)
                else:
                    await self._finished(job)

    async def _retry_later(self, job: Job, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(job)

    async def _finished(self, job: Job) -> None:
        async with self.ctx.engine.begin() as conn:
            await advance_cursor(conn, job.agent_id, job.trigger.thread_id, job.trigger.seq)
        self._queued.discard((job.agent_id, job.trigger.id))
        self.jobs_done += 1
        self._pending -= 1
        self._pending_by_agent[job.agent_id] -= 1
        if self._pending == 0:
            self._idle.set()

    async def _claim(self, job: Job) -> ClaimState:
        async with self.ctx.engine.begin() as conn:
            return await try_claim(
                conn,
                agent_id=job.agent_id,
                thread_id=job.trigger.thread_id,
                trigger_seq=job.trigger.seq,
                runner_id=self.runner_id,
                lease_seconds=self.lease_seconds,
                now=time.time(),
            )

    async def _complete(self, job: Job) -> None:
        async with self.ctx.engine.begin() as conn:
            await complete_claim(
                conn,
                agent_id=job.agent_id,
                thread_id=job.trigger.thread_id,
                trigger_seq=job.trigger.seq,
                runner_id=self.runner_id,
                now=time.time(),
            )

    async def _handle(self, job: Job) -> float | None:
        """Answer one job under a claim. Returns None when the job is finished, or the seconds
        after which to try again (another runner holds the trigger)."""
        trigger = job.trigger
        key = reply_key(job.agent_id, trigger.id)
        async with self.ctx.engine.connect() as conn:
            if await find_by_idempotency(conn, [(trigger.thread_id, key)]):
                return None  # already answered (redelivery, or by another runner)
        claim = await self._claim(job)
        if claim.outcome == "done":
            return None
        if claim.outcome == "held":
            return max(RETRY_MARGIN, claim.expires_at - time.time() + RETRY_MARGIN)
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_claim, job)
            try:
                await self._answer(job, key)
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()
        await self._complete(job)  # answered, refused or failed: nobody takes it again
        if error is not None:
            raise error
        return None

    async def _keep_claim(self, job: Job) -> None:
        """Renew ``job``'s claim every third of the lease while it runs (cancelled after)."""
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            try:
                state = await self._claim(job)
            except Exception as exc:  # a failed renewal only risks a duplicate model call
                log.warning("runner.renew_failed", agent_id=job.agent_id, error=repr(exc))
                continue
            if state.outcome != "granted":
                log.warning("runner.claim_lost", agent_id=job.agent_id, holder=state.runner_id)

    async def _answer(self, job: Job, key: str) -> None:
        trigger = job.trigger
        async with self.ctx.engine.connect() as conn:
            agent = (
                (
                    await conn.execute(
                        select(agents, orgs.c.name.label("org_name"))
                        .join(orgs, orgs.c.id == agents.c.org_id)
                        .where(agents.c.id == job.agent_id, agents.c.deleted_at.is_(None))
                    )
                )
                .mappings()
                .first()
            )
            thread = (
                (await conn.execute(select(threads).where(threads.c.id == trigger.thread_id)))
                .mappings()
                .first()
            )
            if agent is None or thread is None:
                return
            if not await agent_in_thread(conn, agent["id"], thread):
                return  # removed (visa revoked, left, deleted) after the trigger was queued
            refusal = await preflight(self.ctx, self.rules, conn, agent, thread, trigger)
            if refusal is not None:
                if refusal.audit:
                    await self._audit(job, refusal.action, refusal.reason, org_id=agent["org_id"])
                return
            history_envs = [
                e
                for e in await self.ctx.hub.read(trigger.thread_id)
                if e.type == EV_MESSAGE and e.seq <= trigger.seq
            ][-self.ctx.settings.history_limit :]
            names = await sender_names(conn, history_envs)
        history = [
            (names[e.sender_id][0], names[e.sender_id][1], str(e.data.get("content", "")))
            for e in history_envs
        ]
        knowledge = await self.knowledge.retrieve(
            agent["org_id"],
            agent["id"],
            str(trigger.data.get("content", "")),
            self.ctx.settings.knowledge_chunks,
        )
        prompt = build_prompt(
            agent_name=agent["name"],
            org_name=agent["org_name"],
            identity=agent["identity"],
            thread_title=thread["title"],
            history=history,
            knowledge=knowledge,
        )
        model_name = resolve_model_name(agent["model"], self.ctx.settings.model)
        try:
            reply = await generate_reply(
                model_name=model_name,
                prompt=prompt,
                speaker_name=agent["name"],
                other_names=sorted({n for n, _, _ in history if n != agent["name"]}),
                seed_key=key,
            )
        except AgentNetworkError as err:
            await self._audit(
                job, "routine.failed", f"{err.code}: {err.message}", org_id=agent["org_id"]
            )
            return
        if not reply:
            await self._audit(
                job,
                "routine.skipped",
                f"the model's reply was empty after cleaning ({REPLY_ATTEMPTS} attempts)",
                org_id=agent["org_id"],
            )
            return
        policy = await load_egress_policy(self.ctx.engine, agent["org_id"], trigger.thread_id)
        try:
            reply, redacted = apply_egress(policy, reply)
        except EgressRefusedError as err:
            await self._audit(job, "egress.refused", ", ".join(err.rules), org_id=agent["org_id"])
            return
        if redacted:
            await self._audit(
                job,
                "egress.redacted",
                ", ".join(redacted),
                org_id=agent["org_id"],
                outcome="accepted",
            )
        try:
            self.rules.take_rate(agent)
        except RuleViolationError as err:
            await self._audit(
                job, "envelope.message", f"{err.code}: {err.message}", org_id=agent["org_id"]
            )
            return
        sender = Actor("agent", agent["id"], agent["org_id"], agent["name"])
        try:
            await self.ctx.hub.append(
                trigger.thread_id,
                type=EV_MESSAGE,
                data={"content": reply},
                sender=sender,
                causation_id=trigger.id,
                idempotency_key=key,
            )
        except (RunawayBudgetError, ThreadClosedError):
            return  # the hub audited the refusal

    async def _audit(
        self,
        job: Job,
        action: str,
        reason: str,
        *,
        org_id: str | None = None,
        outcome: str = "refused",
    ) -> None:
        if org_id is None:
            async with self.ctx.engine.connect() as conn:
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
            data={"trigger_id": job.trigger.id, "routine_id": job.routine_id},
        )
        async with self.ctx.engine.begin() as conn:
            await insert_audit(conn, [row])
