"""The remote runner: runs the ``participate`` and ``triage`` routines of the agents a credential
owns, in a process of its own, talking to the server only through the SDK's REST client.

Start it with ``agent-network runner --url URL --token TOKEN`` (an org key runs every agent of
the org; an agent token runs that agent). Several remote runners, and the in-process runner of
the server, can run the same agents at once: they share the work through claims.

It discovers triggers from ``GET /runners/assignments`` (re-listed every ``relist_seconds``) and
one long-polling follower per thread (``GET /threads/{id}/envelopes``), and hands them to the
runner engine (:mod:`agent_network.runtime.engine`) through the remote port
(:class:`RemoteRunner` is that port): the claim (``POST /claims`` with ``job``) brings the job
the server built, the reply goes through ``POST /threads/{id}/messages``, a triage request
through ``POST /runners/triage``, and failures only the runner sees are reported when the claim
is completed (``dropped``). Design: docs/architecture.md, "Runners: one engine, two ports".
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from agent_network.client import (
    ApiError,
    Assignment,
    AsyncClient,
    Envelope,
    EnvelopePage,
    TransportError,
)
from agent_network.config import Settings
from agent_network.errors import AgentNetworkError
from agent_network.protocol.events import (
    EV_MESSAGE,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
)
from agent_network.runtime.engine import Claimed, Classify, Dropped, Engine, Ident
from agent_network.runtime.identity import take_runner_id
from agent_network.runtime.runner import new_runner_id
from agent_network.runtime.tools import RemoteSecrets, RunDeps
from agent_network.runtime.triage import TriageConfig, is_triage_output, parse_config
from agent_network.services.claims import reply_key
from agent_network.services.jobs import JobSpec

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({502, 503, 504})
PAGE = 500  # envelopes per history page
RETRY_MARGIN = 0.2  # seconds after another runner's lease runs out before trying again
MAX_ANSWER = 2000  # characters of a classification answer sent to POST /runners/triage


@dataclass(frozen=True, slots=True)
class AgentCard:
    """What the runner knows of one agent it runs (from ``GET /runners/assignments``)."""

    id: str
    name: str
    org_id: str
    org_name: str
    identity: str
    model: str | None
    inbox_cap: int | None = None


@dataclass(frozen=True, slots=True)
class TriageSeat:
    """An agent whose triage routine ``routine_id`` (config ``config``) takes the requests of a
    followed intake thread committed after ``since``."""

    agent: AgentCard
    since: datetime
    routine_id: str
    config: TriageConfig


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """One followed thread: its title, the agents answering in it by their participate routine
    (each with ``since``) and the agents routing its requests by their triage routine."""

    thread_id: str
    title: str
    agents: tuple[tuple[AgentCard, datetime], ...]
    triage: tuple[TriageSeat, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """One agent answering one trigger envelope, with the messages up to it that the agent may
    see (``(name, org name, content)``, oldest first). ``protocol``: the thread names
    participants (its ``thread.created`` does). ``triage``: set when the agent's triage routine
    routes the trigger (a request in its intake thread) instead of its participate routine
    answering it."""

    agent: AgentCard
    thread_id: str
    title: str
    trigger: Envelope
    history: tuple[tuple[str, str, str], ...]
    protocol: bool = False
    triage: TriageSeat | None = None


@dataclass(frozen=True, slots=True)
class _Seen:
    """A message kept for prompts: who may see it, and its prompt line."""

    sender_id: str
    audience: tuple[str, ...] | None
    line: tuple[str, str, str]

    def visible_to(self, agent_id: str) -> bool:
        return self.audience is None or agent_id == self.sender_id or agent_id in self.audience


NEVER_TRIGGERS = frozenset({EV_THREAD_CLOSING, EV_THREAD_CLOSED, EV_THREAD_REJECT})
"""Envelope types after which nobody is the expected speaker (the thread stops being live)."""


def may_trigger(env: Envelope, agent_id: str, *, protocol: bool) -> bool:
    """The runner's local filter (the server decides exactly at claim time): ``env`` is visible
    to the agent (``audience``) and, in a thread without a protocol, a message from somebody
    else; in a protocol thread any envelope but one that ends the thread."""
    if env.audience is not None and agent_id != env.sender.id and agent_id not in env.audience:
        return False
    if not protocol:
        return env.type == EV_MESSAGE and env.sender.id != agent_id
    return env.type not in NEVER_TRIGGERS


def is_request(env: Envelope, agent_id: str) -> bool:
    """``env`` is a request for a triage routine of ``agent_id`` in one of its intake threads
    (the in-process runner's rule): a message from somebody else, visible to the agent, that
    is not a forward or reply of any triage agent."""
    return (
        env.type == EV_MESSAGE
        and env.sender.id != agent_id
        and not is_triage_output(env)
        and (env.audience is None or agent_id in env.audience)
    )


def _when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def plans_from(assignments: list[Assignment]) -> dict[str, ThreadPlan]:
    """``thread_id -> ThreadPlan`` from ``GET /runners/assignments``. An intake thread goes to
    the agent's oldest triage routine whose ``intake`` holds it (a config that does not parse
    here is skipped, as the in-process runner skips it)."""
    by_thread: dict[str, tuple[str, list[tuple[AgentCard, datetime]], list[TriageSeat]]] = {}
    for item in assignments:
        a = item.agent
        card = AgentCard(
            a.id, a.name, a.org_id or "", a.org_name or "", a.identity, a.model, a.inbox_cap
        )
        configs: list[tuple[str, TriageConfig]] = []
        for routine in item.triage:
            try:
                configs.append((routine.routine_id, parse_config(routine.config)))
            except AgentNetworkError as err:
                log.warning("runner.triage_config_invalid", agent_id=a.id, error=str(err))
        for t in item.threads:
            entry = by_thread.setdefault(t.thread_id, (t.title, [], []))
            if t.preset != "triage":
                entry[1].append((card, _when(t.since)))
                continue
            found = next((rc for rc in configs if t.thread_id in rc[1].intake), None)
            if found is not None:
                entry[2].append(TriageSeat(card, _when(t.since), found[0], found[1]))
    return {
        tid: ThreadPlan(
            tid,
            title,
            tuple(sorted(agents, key=lambda p: p[0].id)),
            tuple(sorted(seats, key=lambda s: s.agent.id)),
        )
        for tid, (title, agents, seats) in by_thread.items()
    }


class RemoteRunner:
    """Runs the routines of the agents ``client``'s credential owns (see the module docstring).

    Arguments: ``runner_id`` (claims name it; default: the stable id
    :func:`~agent_network.runtime.identity.take_runner_id` gives per host, OS user, server URL
    and credential, taken when :meth:`run` starts, so a restarted runner takes back the claims
    its dead predecessor held), ``lease_seconds`` (claim lease, renewed every third of it;
    default the setting ``claim_lease``, 10 s), ``workers`` (jobs at once), ``relist_seconds``
    (how often assignments are re-read), ``poll_wait`` (long-poll seconds, at most 60),
    ``default_model`` (for agents without a model), ``history_limit`` (messages kept per
    followed thread, times four; the prompt's history comes with the job the server builds, by
    its own ``history_limit`` and ``knowledge_chunks`` settings), ``knowledge_chunks`` (checked
    only, kept for the command line), ``max_backoff`` (seconds between retries),
    ``model_seed`` (mixed into the local model's seeds, see
    :func:`~agent_network.runtime.runner.local_seed`; default: ``AGENT_NETWORK_MODEL_SEED``,
    else 0). Counters for progress and tests: ``replies`` (replies posted, a triage routine's in
    intake included), ``forwards`` (requests a triage routine forwarded), ``dropped`` (triggers
    dropped by ``inbox_cap``), ``jobs_done``.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        runner_id: str | None = None,
        lease_seconds: float | None = None,
        workers: int = 2,
        relist_seconds: float = 10.0,
        poll_wait: float = 20.0,
        default_model: str | None = None,
        history_limit: int = 12,
        knowledge_chunks: int = 3,
        max_backoff: float = 2.0,
        model_seed: int | None = None,
    ) -> None:
        if lease_seconds is None:
            lease_seconds = Settings().claim_lease
        if not 0 < lease_seconds <= 3600:
            raise ValueError("lease_seconds must be in (0, 3600]")
        if not 0 <= poll_wait <= 60:
            raise ValueError("poll_wait must be between 0 and 60 seconds")
        if workers < 1 or relist_seconds <= 0 or history_limit < 1 or knowledge_chunks < 0:
            raise ValueError("workers, relist_seconds and history_limit must be positive")
        self.client = client
        self._wanted_id = runner_id
        self.runner_id = runner_id or new_runner_id("remote")  # the stable one is taken in run()
        self.lease_seconds = lease_seconds
        self.workers = workers
        self.relist_seconds = relist_seconds
        self.poll_wait = poll_wait
        self.default_model = default_model
        self.history_limit = history_limit
        self.knowledge_chunks = knowledge_chunks
        self.max_backoff = max_backoff
        self.model_seed = Settings().model_seed if model_seed is None else model_seed
        self.forwards = 0
        self._triage_replies = 0
        self.engine: Engine[RemoteJob] = Engine(self, workers=workers, retry_margin=RETRY_MARGIN)
        self._known: set[tuple[str, str]] = set()  # (agent_id, trigger id) seen by this process
        self._followers: dict[str, tuple[ThreadPlan, anyio.CancelScope]] = {}
        self._tg: TaskGroup | None = None

    @property
    def replies(self) -> int:
        """Replies posted (a triage routine's in intake included)."""
        return self.engine.replies + self._triage_replies

    @property
    def dropped(self) -> int:
        """Triggers dropped by ``inbox_cap``."""
        return self.engine.dropped

    @property
    def jobs_done(self) -> int:
        """Jobs finished by this runner."""
        return self.engine.jobs_done

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take the runner id (see the class docstring), then run until cancelled: the
        followers' catch-up claims again — takes back — what a dead predecessor with the same
        id held. ``task_status.started()`` once the first assignments are read and their
        followers started. Raises ApiError when the credential is refused and
        RunnerIdInUseError when an explicit ``runner_id`` is held by another live process on
        this host."""
        seat = take_runner_id(
            "remote", f"{self.client.base_url}\0{self.client.token}", runner_id=self._wanted_id
        )
        self.runner_id = seat.runner_id
        try:
            await self._run(task_status)
        finally:
            # a clean stop frees its claims at once for other runners (as in-process); best
            # effort: a runner that cannot tell the server leaves them to their short lease
            with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
                await self.client.runners.release(self.runner_id)
            seat.release()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self.engine.run(tg)
            await self._relist()
            log.info(
                "runner.started",
                runner_id=self.runner_id,
                threads=len(self._followers),
                agents=len(
                    {a.id for p, _ in self._followers.values() for a, _ in p.agents}
                    | {t.agent.id for p, _ in self._followers.values() for t in p.triage}
                ),
            )
            task_status.started()
            while True:
                await anyio.sleep(self.relist_seconds)
                await self._relist()

    async def _relist(self) -> None:
        assert self._tg is not None
        wanted = plans_from(await self._retrying(self.client.runners.assignments))
        for tid, (plan, scope) in list(self._followers.items()):
            if wanted.get(tid) != plan:
                scope.cancel()
                del self._followers[tid]
        for tid, plan in wanted.items():
            if tid not in self._followers:
                scope = await self._tg.start(self._follow, plan)
                self._followers[tid] = (plan, scope)

    async def _follow(
        self, plan: ThreadPlan, *, task_status: TaskStatus[anyio.CancelScope]
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await self._follow_thread(plan)
            except ApiError as err:  # access lost: the next listing drops or restarts it
                log.warning("runner.follow_stopped", thread_id=plan.thread_id, error=str(err))
                if self._followers.get(plan.thread_id, (None, None))[1] is scope:
                    del self._followers[plan.thread_id]

    async def _follow_thread(self, plan: ThreadPlan) -> None:
        """Catch up on the thread's history, then long-poll it, turning triggers into jobs."""
        tid = plan.thread_id
        ours = {a.id for a, _ in plan.agents} | {seat.agent.id for seat in plan.triage}
        done: dict[str, set[int]] = {}
        for agent_id in sorted(ours):
            done[agent_id] = await self._done(agent_id, tid)
        # messages for prompts; more than history_limit, as each agent sees only its audience
        seen: deque[_Seen] = deque(maxlen=self.history_limit * 4)
        answered: set[tuple[str, str]] = set()
        backlog: list[RemoteJob] = []
        protocol = False
        last_message = 0  # seq of the latest message read
        after, live = 0, False
        while True:
            wait = self.poll_wait if live else 0.0
            started = anyio.current_time()
            page = await self._page(tid, after, wait)
            found: list[RemoteJob] = []
            for env in page.envelopes:  # stubs (hidden by their audience) never trigger
                if env.type == EV_THREAD_CREATED:
                    protocol = bool(env.data.get("participants"))
                if env.type == EV_MESSAGE:
                    last_message = env.seq
                    audience = tuple(env.audience) if env.audience is not None else None
                    line = (env.sender.name, env.sender.org_name or "", env.content or "")
                    seen.append(_Seen(env.sender.id, audience, line))
                    if env.sender.id in ours and env.causation_id:
                        answered.add((env.sender.id, env.causation_id))
                routed: set[str] = set()  # agents whose triage routine owns env
                for seat in plan.triage:
                    if not is_request(env, seat.agent.id):
                        continue
                    routed.add(seat.agent.id)
                    if env.created_at > seat.since and env.seq not in done[seat.agent.id]:
                        found.append(RemoteJob(seat.agent, tid, plan.title, env, (), triage=seat))
                for agent, since in plan.agents:
                    if agent.id in routed:
                        continue  # a request of the agent's triage routine
                    if env.created_at <= since or env.seq in done[agent.id]:
                        continue
                    if not may_trigger(env, agent.id, protocol=protocol):
                        continue
                    history = [m.line for m in seen if m.visible_to(agent.id)]
                    found.append(
                        RemoteJob(
                            agent,
                            tid,
                            plan.title,
                            env,
                            tuple(history[-self.history_limit :]),
                            protocol,
                        )
                    )
            if live:
                for job in self._latest(found, last_message):
                    await self._enqueue(job)
            else:
                backlog.extend(found)
            if not live and page.next_after == after:
                for job in self._latest(backlog, last_message):
                    if (job.agent.id, job.trigger.id) not in answered:
                        await self._enqueue(job)
                backlog.clear()
                live = True
            elif (
                live
                and page.next_after == after
                and (wait == 0 or anyio.current_time() - started < wait / 2)
            ):
                # no long-poll (poll_wait 0, or a server that answers at once): do not spin
                await anyio.sleep(min(max(wait, 0.1), 1.0))
            after = page.next_after

    @staticmethod
    def _latest(jobs: list[RemoteJob], last_message: int) -> list[RemoteJob]:
        """``jobs`` without the protocol-thread triggers older than the latest message
        ``last_message`` (the turn follows the latest message; :meth:`_answer` would drop
        them)."""
        return [j for j in jobs if not j.protocol or j.trigger.seq >= last_message]

    async def _page(self, thread_id: str, after: int, wait: float) -> EnvelopePage:
        return await self._retrying(
            lambda: self.client.threads.envelopes(thread_id, after=after, limit=PAGE, wait=wait)
        )

    async def _done(self, agent_id: str, thread_id: str) -> set[int]:
        found = await self._retrying(lambda: self.client.runners.done(agent_id, thread_id))
        return set(found.done)

    async def _enqueue(self, job: RemoteJob) -> None:
        """Queue ``job`` once per (agent, trigger) in this process — or drop it when the
        agent's ``inbox_cap`` jobs are already waiting or running here (the engine completes
        the claim with ``dropped="inbox_cap"``, which the server audits)."""
        key = (job.agent.id, job.trigger.id)
        if key in self._known:
            return
        self._known.add(key)
        await self.engine.submit(job)

    # ---------------------------------------------------------- the remote port

    def ident(self, job: RemoteJob) -> Ident:
        return Ident(
            job.agent.id,
            job.thread_id,
            job.trigger.id,
            inbox_cap=job.agent.inbox_cap,
            triage=job.triage is not None,
        )

    async def claim(self, job: RemoteJob, *, renew: bool = False) -> Claimed:
        """``POST /claims`` (a first claim of a participate job asks for its job)."""
        want = not renew and job.triage is None
        try:
            claim = await self._retrying(
                lambda: self.client.runners.claim(
                    job.agent.id,
                    job.thread_id,
                    job.trigger.seq,
                    self.runner_id,
                    lease_seconds=self.lease_seconds,
                    job=want,
                )
            )
        except ApiError as err:
            if err.code == "claim_held":
                wait = err.retry_after if err.retry_after is not None else self.lease_seconds
                return Claimed(False, retry_in=wait)
            if err.code == "claim_done" or err.status in (403, 404, 422):
                log.debug("runner.not_claimed", agent_id=job.agent.id, reason=str(err))
                return Claimed(False)
            raise
        spec = JobSpec(**claim.job.model_dump()) if claim.job is not None else None
        return Claimed(True, spec)

    async def complete(self, job: RemoteJob, dropped: Dropped | None, detail: str | None) -> None:
        """Mark ``job``'s trigger done (``dropped``/``detail``: why it stays unanswered, for the
        server's audit log). A refusal — another runner took it over (the reply key still keeps
        it to one reply), or access is gone — is logged."""
        if dropped == "inbox_cap":
            log.info("runner.inbox_cap", agent_id=job.agent.id, cap=job.agent.inbox_cap)
        try:
            await self._retrying(
                lambda: self.client.runners.complete(
                    job.agent.id,
                    job.thread_id,
                    job.trigger.seq,
                    self.runner_id,
                    dropped=dropped,
                    detail=detail,
                )
            )
        except ApiError as err:
            log.warning("runner.complete_refused", agent_id=job.agent.id, error=str(err))

    async def protocol(self, job: RemoteJob) -> bool:
        return job.protocol and job.triage is None

    async def post(
        self,
        job: RemoteJob,
        spec: JobSpec,
        claimed: Claimed,
        content: str,
        tool_calls: list[dict[str, Any]],
    ) -> bool:
        """Post the reply (``POST /threads/{id}/messages``, the server's post path) with the
        reply key; a refused post completes the trigger without a reply."""
        extra: dict[str, Any] = {}
        if tool_calls:
            extra["tool_calls"] = tool_calls
        if spec.audience is not None:
            extra["audience"] = spec.audience
        try:
            await self._retrying(
                lambda: self.client.threads.post(
                    job.thread_id,
                    content,
                    agent_id=job.agent.id,
                    idempotency_key=reply_key(job.agent.id, job.trigger.id),
                    causation_id=job.trigger.id,
                    **extra,
                )
            )
        except ApiError as err:
            if err.status in (403, 404, 409, 422, 429):
                log.info("runner.reply_refused", agent_id=job.agent.id, error=str(err))
                return False
            raise
        return True

    async def passed(self, job: RemoteJob) -> None:
        log.info("runner.passed", agent_id=job.agent.id, trigger_id=job.trigger.id)

    async def failed(self, job: RemoteJob, error: Exception) -> None:
        log.warning("runner.job_failed", agent_id=job.agent.id, error=repr(error))

    async def finished(self, job: RemoteJob) -> None:
        return None

    def deps(self, job: RemoteJob, spec: JobSpec) -> RunDeps:
        """The model run's deps: the agent's secrets for its tools come from
        ``POST /runners/secrets`` under this runner's claim on the trigger (answered for the
        agent's own token only; runtime/tools.py)."""
        return RunDeps(
            agent_id=job.agent.id,
            org_id=job.agent.org_id,
            thread_id=job.thread_id,
            trigger_id=job.trigger.id,
            secrets=RemoteSecrets(
                self.client,
                agent_id=job.agent.id,
                thread_id=job.thread_id,
                trigger_seq=job.trigger.seq,
                runner_id=self.runner_id,
            ),
        )

    async def route(self, job: RemoteJob, classify: Classify) -> None:
        """Route one intake request: classify it with the agent's model here, then
        ``POST /runners/triage``, where the server picks the label (the model's, else
        keywords, else the fallback), forwards the request and replies in intake."""
        seat, agent, trigger = job.triage, job.agent, job.trigger
        assert seat is not None
        card = {"id": agent.id, "name": agent.name, "identity": agent.identity}
        answer = await classify(
            {**card, "model": agent.model},
            seat.config,
            trigger.content or "",
            trigger.sender.name,
            trigger.id,
        )
        answer = answer[:MAX_ANSWER] if answer else answer
        try:
            routed = await self._retrying(
                lambda: self.client.runners.triage(
                    agent.id, job.thread_id, trigger.seq, self.runner_id, answer=answer
                )
            )
        except ApiError as err:
            if err.status in (403, 404, 409, 422, 429):
                log.info("runner.triage_refused", agent_id=agent.id, error=str(err))
                return
            raise
        log.info(
            "runner.triaged",
            agent_id=agent.id,
            trigger_id=trigger.id,
            label=routed.label,
            forwarded_to=routed.forward_thread_id,
        )
        self.forwards += routed.forward_id is not None
        self._triage_replies += routed.reply_id is not None

    # ----------------------------------------------------------------- retries

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, retrying connection errors and 502/503/504 answers with jittered
        exponential backoff (up to ``max_backoff`` seconds) until it succeeds or is cancelled;
        any other ApiError propagates."""
        delay = 0.05
        while True:
            try:
                return await call()
            except TransportError as err:
                log.debug("runner.retry", error=str(err))
            except ApiError as err:
                if err.status not in RETRY_STATUSES:
                    raise
                log.debug("runner.retry", error=str(err))
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_backoff)
