"""The in-process runner: runs the ``participate`` and ``triage`` routines of every org's agents
inside the server. It discovers triggers from the hub's subscription (catching up from its
cursors and from claims left open) and hands them to the runner engine
(:mod:`agent_network.runtime.engine`) through the in-process port (:class:`Runner` is that port:
claims in ``runner_claims``, jobs built by :func:`~agent_network.services.jobs.build_job`,
replies posted by :func:`~agent_network.services.jobs.post_reply`, triage routed by
:func:`~agent_network.services.routing.route_request`). Design: docs/architecture.md,
"Runners: one engine, two ports".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from sqlalchemy import select

from agent_network.errors import InvalidRequestError
from agent_network.model.envelope import Envelope
from agent_network.model.rule import Rule
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.fold import step
from agent_network.protocol.state import ThreadState
from agent_network.runtime.engine import Claimed, Classify, Dropped, Engine, Ident
from agent_network.runtime.identity import take_runner_id
from agent_network.runtime.reply import (
    CLASSIFY_MAX_TOKENS,
    MODEL_TIMEOUT,
    REPLY_ATTEMPTS,
    REPLY_MAX_SENTENCES,
    REPLY_MAX_TOKENS,
    RETRY_TEMPERATURE,
    Reply,
    classify_request,
    generate_reply,
    local_seed,
)
from agent_network.runtime.thread_view import turn_takers, visible_to
from agent_network.runtime.tools import RunDeps
from agent_network.runtime.triage import is_request, parse_config
from agent_network.services.base import ServiceContext
from agent_network.services.claims import (
    participations,
    reply_key,
    thread_open_to_agent,
    triage_participations,
)
from agent_network.services.jobs import (
    Job,
    JobSpec,
    agent_and_thread,
    audit_job,
    build_job,
    post_reply,
)
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.rendering import sender_names
from agent_network.services.routing import TriageOutcome, route_request
from agent_network.services.rules import RuleService, RuleViolationError, parse_rule
from agent_network.services.secrets import RunSecrets
from agent_network.store.audit import audit_row, insert_audit
from agent_network.store.claims import (
    ClaimState,
    complete_claim,
    open_claims,
    release_claims,
    try_claim,
)
from agent_network.store.cursors import (
    RUNNER_CURSOR,
    advance_cursor,
    all_cursors,
    ensure_cursor,
)
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, members, routines, thread_participants, threads
from agent_network.store.wal import find_by_idempotency, read_envelopes

log = structlog.get_logger(__name__)

RETRY_MARGIN = 0.2  # seconds after another runner's lease expires before trying to take over
DISPATCH_RETRIES = 8  # looks for a protocol thread's rows committed just after its envelope
STATE_CACHE = 1024  # protocol threads whose folded state (at the last dispatch) is kept
PRESETS = ("participate", "triage")  # the routine presets this runner executes

__all__ = [
    "CLASSIFY_MAX_TOKENS",
    "MODEL_TIMEOUT",
    "REPLY_ATTEMPTS",
    "REPLY_MAX_SENTENCES",
    "REPLY_MAX_TOKENS",
    "RETRY_TEMPERATURE",
    "Job",
    "Reply",
    "Runner",
    "TriageOutcome",
    "classify_request",
    "database_scope",
    "generate_reply",
    "local_seed",
    "new_runner_id",
    "reply_key",
]


def new_runner_id(kind: str) -> str:
    """A runner id unique to this process: ``<kind>:<host>:<pid>:<random>`` (at most 100
    characters). A restarted process gets a new id, so its predecessor's claims run out."""
    return f"{kind}:{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


def database_scope(engine: Any) -> str:
    """What identifies ``engine``'s database for runner ids (:func:`take_runner_id`): the
    resolved file path of a SQLite database, else its URL without the password."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return f"sqlite:{Path(url.database).resolve()}"
    return str(url.render_as_string(hide_password=True))


class Runner:
    """Runs routines in-process. Start with ``await tg.start(runner.run)``; cancel to stop.

    ``workers`` is how many jobs run at once (the local model itself runs one at a time).
    ``jobs_done`` counts finished jobs (for tests and the demo's progress). ``runner_id`` names
    this runner in claims (default: the stable id :func:`~agent_network.runtime.identity.
    take_runner_id` gives per host, OS user and database, taken when :meth:`run` starts: a
    restarted server's runner gets its predecessor's id and so takes back the claims that one
    held when it died); ``lease_seconds`` is how long a claim lasts without renewal (default
    the setting ``claim_lease``, 10 s; renewed every third of it while a job runs).
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        workers: int = 2,
        rules: RuleService | None = None,
        runner_id: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.knowledge = KnowledgeService(ctx)
        self.rules = rules or RuleService(ctx)
        self._wanted_id = runner_id
        self.runner_id = runner_id or new_runner_id("inproc")  # the stable one is taken in run()
        self.lease_seconds = ctx.settings.claim_lease if lease_seconds is None else lease_seconds
        self.default_model = ctx.settings.model
        self.model_seed = ctx.settings.model_seed
        self.engine: Engine[Job] = Engine(self, workers=workers, retry_margin=RETRY_MARGIN)
        # protocol threads: state folded up to the last dispatched envelope (LRU)
        self._states: OrderedDict[str, ThreadState] = OrderedDict()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take the runner id, subscribe, catch up from cursors and open claims (the claims a
        dead predecessor with the same id left are renewed, i.e. taken back, at once), then
        handle jobs until cancelled.

        On the way out the claims this runner still holds are released (a clean stop does not
        make the next runner wait for their leases) and the runner id is given up. Raises
        RunnerIdInUseError when an explicit ``runner_id`` is held by another live process."""
        seat = take_runner_id("inproc", database_scope(self.ctx.engine), runner_id=self._wanted_id)
        self.runner_id = seat.runner_id
        try:
            await self._run(task_status)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with write_transaction(self.ctx.engine) as conn:
                    await release_claims(conn, self.runner_id)
            seat.release()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            await self.engine.run(tg)
            while True:
                sub = self.ctx.hub.subscribe()
                await self._catch_up()
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                async for env in sub:
                    await self._dispatch(env)
                if not sub.lagged:
                    return
                log.warning("runner.lagged; catching up from cursors")

    async def wait_idle(self) -> None:
        """Wait until no job is queued, running or waiting for another runner's lease."""
        await self.engine.idle.wait()

    @property
    def jobs_done(self) -> int:
        """Jobs finished by this runner."""
        return self.engine.jobs_done

    @property
    def _pending(self) -> int:
        return self.engine.pending

    # ------------------------------------------------------------ dispatching

    async def _state_at(self, thread_id: str, seq: int) -> ThreadState:
        """The thread's state folded up to and including ``seq`` (cached per thread and stepped
        forward from the last one asked for, so a live thread costs one short read)."""
        cached = self._states.get(thread_id)
        if cached is None or cached.last_seq > seq:
            cached = ThreadState(thread_id=thread_id)
        if cached.last_seq < seq:
            for env in await self.ctx.hub.read(
                thread_id, after=cached.last_seq, limit=seq - cached.last_seq
            ):
                cached = step(cached, env)
        self._states[thread_id] = cached
        self._states.move_to_end(thread_id)
        while len(self._states) > STATE_CACHE:
            self._states.popitem(last=False)
        return cached

    async def _dispatch(
        self, env: Envelope, only_agent: str | None = None, *, attempt: int = 0
    ) -> None:
        """Queue a job for every agent ``env`` triggers (see the module docstring): by its
        participate routine, or by its triage routine when ``env`` is a request in one of that
        routine's intake threads (:meth:`_triage_request`; it then takes the place of the
        agent's participate routine for ``env``)."""
        protocol = bool((await self.ctx.hub.state(env.thread_id)).participants)
        if not protocol and env.type != EV_MESSAGE:
            return
        wanted: set[str] | None = None
        if protocol:
            after = await self._state_at(env.thread_id, env.seq)
            wanted = turn_takers(after, env, after.participant_ids)
            if only_agent is not None:
                wanted &= {only_agent}
            if not wanted:
                return
        async with write_transaction(self.ctx.engine) as conn:
            q = (
                select(
                    routines.c.id,
                    routines.c.agent_id,
                    agents.c.rule,
                    agents.c.org_id,
                    routines.c.preset_name,
                    routines.c.config,
                )
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
                    routines.c.preset_name.in_(PRESETS),
                    routines.c.event_type == "thread.message_added",
                    agents.c.deleted_at.is_(None),
                    thread_open_to_agent(routines.c.agent_id),
                )
            )
            if wanted is None:
                q = q.where(routines.c.agent_id != env.sender_id)
            else:
                q = q.where(routines.c.agent_id.in_(sorted(wanted)))
            if only_agent is not None:
                q = q.where(routines.c.agent_id == only_agent)
            jobs: dict[str, Job] = {}
            refusals: list[dict[str, Any]] = []
            sender_name, sender_org = (await sender_names(conn, [env]))[env.sender_id]
            rows = list((await conn.execute(q)).all())
            if (
                not rows
                and wanted
                and attempt < DISPATCH_RETRIES
                and self.engine.tg is not None
                and await self._rows_pending(conn, env.thread_id, wanted)
            ):
                # the thread's rows are written right after its first envelopes: look again
                self.engine.tg.start_soon(self._dispatch_later, env, only_agent, attempt + 1)
                return
            # an agent's triage routine goes first: where it takes a request, it answers it
            rows.sort(key=lambda r: r[4] != "triage")
            for routine_id, agent_id, raw_rule, org_id, preset, config in rows:
                if preset == "triage" and not self._triage_request(env, agent_id, config):
                    continue
                if agent_id in jobs or self.engine.known(agent_id, env.id):
                    continue
                if not visible_to(agent_id, env):
                    continue  # an envelope the agent may not see never triggers it
                job = Job(agent_id, routine_id, env, preset)
                reason = self._refuse_trigger(
                    parse_rule(raw_rule),
                    agent_id,
                    org_id,
                    env,
                    f"{sender_name!r} ({env.sender_id} of {sender_org} {env.sender_org_id})",
                    inbound=env.type == EV_MESSAGE,
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
                    await advance_cursor(conn, agent_id, RUNNER_CURSOR, env.thread_id, env.seq)
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
                await ensure_cursor(conn, job.agent_id, RUNNER_CURSOR, env.thread_id, env.seq - 1)
            await insert_audit(conn, refusals)
        for job in jobs.values():
            await self.engine.submit(job)

    @staticmethod
    def _triage_request(env: Envelope, agent_id: str, raw_config: Any) -> bool:
        """Whether ``env`` is a request for the triage routine of ``agent_id`` whose stored
        config is ``raw_config``: a message in one of its intake threads, not sent by the agent
        and not a forward or reply of any triage agent (no loops)."""
        if not is_request(env, agent_id):
            return False
        try:
            config = parse_config(raw_config)
        except InvalidRequestError as err:  # stored before a check existed, or edited by hand
            log.warning("runner.triage_config_invalid", agent_id=agent_id, error=err.message)
            return False
        return env.thread_id in config.intake

    async def _dispatch_later(self, env: Envelope, only_agent: str | None, attempt: int) -> None:
        await anyio.sleep(min(0.05 * 2**attempt, 2.0))
        await self._dispatch(env, only_agent, attempt=attempt)

    @staticmethod
    async def _rows_pending(conn: Any, thread_id: str, agent_ids: set[str]) -> bool:
        """True when the ``threads`` row of a protocol thread, or a participant row of one of
        ``agent_ids`` in a restricted one, is not there (yet): the services write them right
        after the thread's first envelope."""
        row = (
            (await conn.execute(select(threads).where(threads.c.id == thread_id)))
            .mappings()
            .first()
        )
        if row is None:
            return True
        if row["visibility"] != "restricted":
            return False
        found = set(
            (
                await conn.execute(
                    select(thread_participants.c.member_id).where(
                        thread_participants.c.thread_id == thread_id,
                        thread_participants.c.member_kind == "agent",
                        thread_participants.c.member_id.in_(sorted(agent_ids)),
                    )
                )
            ).scalars()
        )
        return found != agent_ids

    def _refuse_trigger(
        self,
        rule: Rule | None,
        agent_id: str,
        agent_org_id: str,
        env: Envelope,
        sender_label: str,
        *,
        inbound: bool = True,
    ) -> str | None:
        """Why the agent's rule drops this trigger (inbound_from for a message — ``inbound`` —,
        decided on ``env``'s sender id and org id against the agent's org ``agent_org_id``;
        inbox_cap), or None. ``sender_label`` names the sender in the reason, for people."""
        if inbound and not RuleService.inbound_allows(
            rule, env.sender_id, env.sender_org_id, agent_org_id
        ):
            return f"inbound_from does not admit {sender_label}"
        cap = rule.inbox_cap if rule is not None else None
        if self.engine.over_cap(agent_id, cap):
            return f"inbox_cap {cap} reached; trigger dropped"
        return None

    async def _catch_up(self) -> None:
        """Dispatch every trigger an active participate or triage routine has not handled yet.

        Per (agent, thread) of the agent's teams and networks: after the durable cursor if there
        is one; otherwise every message committed after both the routine and the membership
        existed (a message committed just before a crash, whose dispatch never happened, has no
        cursor yet). Then every trigger whose claim was left open (its runner died before
        completing it; it is taken over once the lease ran out). Replies already in the WAL are
        skipped by their idempotency key. A triage routine follows its intake threads
        (:func:`triage_participations`).
        """
        async with self.ctx.engine.connect() as conn:
            cursors = {(a, t): seq for a, t, seq in await all_cursors(conn, RUNNER_CURSOR)}
            pairs = await participations(conn)
            followed_pairs = {(a, t) for a, t, _ in pairs}
            pairs += [p for p in await triage_participations(conn) if p[:2] not in followed_pairs]
            unfinished = await open_claims(conn)
        for agent_id, thread_id, since in pairs:
            seq = cursors.get((agent_id, thread_id))
            for env in await self.ctx.hub.read(thread_id, after=seq or 0):
                if seq is None and env.created_at <= since:
                    continue
                await self._dispatch(env, only_agent=agent_id)
        followed = {(a, t) for a, t, _ in pairs}
        for agent_id, thread_id, trigger_seq in unfinished:
            if (agent_id, thread_id) not in followed:
                continue
            async with self.ctx.engine.connect() as conn:
                found = await read_envelopes(conn, thread_id, after=trigger_seq - 1, limit=1)
            if found and found[0].seq == trigger_seq:
                await self._dispatch(found[0], only_agent=agent_id)

    # ------------------------------------------------------- the in-process port

    def ident(self, job: Job) -> Ident:
        return Ident(
            job.agent_id, job.trigger.thread_id, job.trigger.id, triage=job.preset == "triage"
        )

    async def claim(self, job: Job, *, renew: bool = False) -> Claimed:
        """Claim the trigger in ``runner_claims``; on a first grant build the participate job
        (:func:`build_job`)."""
        trigger = job.trigger
        if not renew:
            key = reply_key(job.agent_id, trigger.id)
            async with self.ctx.engine.connect() as conn:
                if await find_by_idempotency(conn, [(trigger.thread_id, key)]):
                    return Claimed(False)  # already answered (redelivery, or another runner)
        state = await self._claim(job)
        if state.outcome == "held":
            return Claimed(False, retry_in=max(0.0, state.expires_at - time.time()))
        if state.outcome != "granted" or renew or job.preset == "triage":
            return Claimed(state.outcome == "granted")
        spec = await build_job(self.ctx, self.rules, job, knowledge=self.knowledge)
        return Claimed(True, spec)

    async def _claim(self, job: Job) -> ClaimState:
        async with write_transaction(self.ctx.engine) as conn:
            return await try_claim(
                conn,
                agent_id=job.agent_id,
                thread_id=job.trigger.thread_id,
                trigger_seq=job.trigger.seq,
                runner_id=self.runner_id,
                lease_seconds=self.lease_seconds,
                now=time.time(),
            )

    async def complete(self, job: Job, dropped: Dropped | None, detail: str | None) -> None:
        """Complete the claim; audit a failure (``routine.failed``) or an empty reply
        (``routine.skipped``)."""
        async with write_transaction(self.ctx.engine) as conn:
            await complete_claim(
                conn,
                agent_id=job.agent_id,
                thread_id=job.trigger.thread_id,
                trigger_seq=job.trigger.seq,
                runner_id=self.runner_id,
                now=time.time(),
            )
        if dropped == "failed":
            await audit_job(self.ctx, job, "routine.failed", detail or "the job failed")
        elif dropped == "empty_reply":
            await audit_job(
                self.ctx,
                job,
                "routine.skipped",
                f"the model's reply was empty after cleaning ({REPLY_ATTEMPTS} attempts)",
            )

    async def protocol(self, job: Job) -> bool:
        if job.preset == "triage":
            return False
        return bool((await self.ctx.hub.state(job.trigger.thread_id)).participants)

    async def post(
        self,
        job: Job,
        spec: JobSpec,
        claimed: Claimed,
        content: str,
        tool_calls: list[dict[str, Any]],
    ) -> bool:
        async with self.ctx.engine.connect() as conn:
            agent, _thread = await agent_and_thread(conn, job.agent_id, job.trigger.thread_id)
        if agent is None:
            return False
        posted = await post_reply(
            self.ctx,
            self.rules,
            job,
            agent,
            content,
            tool_calls=tool_calls,
            audience=spec.audience,
        )
        return posted is not None

    async def passed(self, job: Job) -> None:
        await audit_job(
            self.ctx,
            job,
            "routine.passed",
            f"the model's reply was empty after cleaning ({REPLY_ATTEMPTS} attempts); "
            "passed the turn",
            outcome="accepted",
        )

    async def route(self, job: Job, classify: Classify) -> None:
        await route_request(self.ctx, self.rules, job, classify=classify)

    def deps(self, job: Job, spec: JobSpec) -> RunDeps:
        """The agent's secrets reach its tools here only (runtime/tools.py)."""
        org_id = str(spec.agent["org_id"])
        return RunDeps(
            agent_id=job.agent_id,
            org_id=org_id,
            thread_id=job.trigger.thread_id,
            trigger_id=job.trigger.id,
            secrets=RunSecrets(
                self.ctx,
                org_id=org_id,
                agent_id=job.agent_id,
                thread_id=job.trigger.thread_id,
                trigger_id=job.trigger.id,
            ),
        )

    async def failed(self, job: Job, error: Exception) -> None:
        await audit_job(self.ctx, job, "routine.failed", f"{type(error).__name__}: {error}")

    async def finished(self, job: Job) -> None:
        async with write_transaction(self.ctx.engine) as conn:
            await advance_cursor(
                conn, job.agent_id, RUNNER_CURSOR, job.trigger.thread_id, job.trigger.seq
            )

    async def route_request(self, job: Job, answer: str | None) -> TriageOutcome | None:
        """Route the intake request ``job.trigger`` with a given classification ``answer``
        (see :func:`~agent_network.services.routing.route_request`)."""
        return await route_request(self.ctx, self.rules, job, answer=answer)
