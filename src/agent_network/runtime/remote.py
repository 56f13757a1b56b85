"""The remote runner: executes the ``participate`` routines of the agents a credential owns, in a
process of its own, talking to the server only through the SDK's REST client.

Start it with ``agent-network runner --url URL --token TOKEN`` (an org key runs every agent of
the org; an agent token runs that agent). Several remote runners, and the in-process runner of
the server, can run the same agents at once: they share the work through claims.

Design
------
- **What to run.** ``GET /runners/assignments`` lists the credential's agents with an active
  ``participate`` routine, with name, org, identity and model, and the threads each takes part
  in with ``since`` (when both routine and membership existed). It is re-listed every
  ``relist_seconds``: a thread that appears gets a follower, one that disappears (membership
  ended, routine paused) loses it, a thread whose set of agents changed gets a new one.
- **Following a thread: long-poll REST.** One follower task per thread pages through
  ``GET /threads/{id}/messages`` from ``after=0`` and then long-polls it (``wait=poll_wait``).
  (Chosen over realtime rooms: the runner needs nothing but the REST surface, and a long-poll
  survives server restarts without any session state.) Every message from somebody else,
  committed after the agent's ``since``, is a trigger for the agent.
- **Catch-up is durable, derived from the server, not local state.** On (re)start a follower
  reads the thread's whole history first; a trigger is skipped when the WAL already holds the
  agent's reply to it (a message from the agent with that ``causation_id``) or when its claim is
  done (``GET /claims/done``). Everything else is claimed: a restarted runner catches up on every
  trigger it (or anybody) missed.
- **Claims.** Before the model call the runner claims the trigger (``POST /claims`` with its
  ``runner_id`` and ``lease_seconds``) and renews the claim every third of the lease while it
  works. ``claim_held``: another runner works on it — look again when that lease runs out
  (``retry_after``), which is how a crashed runner's work is taken over. ``claim_done``: answered
  already, or refused by the server's checks before a model call (closed thread, spent budget,
  the agent's rule) — drop it. After replying (or deciding not to) the runner completes the
  claim (``POST /claims/complete``).
- **The reply** is built exactly as in the in-process runner: :func:`~agent_network.runtime.
  prompt.build_prompt` over the last ``history_limit`` messages up to the trigger and the best
  ``knowledge_chunks`` chunks of ``GET /knowledge/search`` (skipped when the credential may not
  read knowledge, e.g. an agent token), then :func:`~agent_network.runtime.runner.generate_reply`
  with the agent's model resolved locally (``default_model`` for agents without one; ``test``
  works). It is posted with ``causation_id`` = the trigger and ``idempotency_key`` =
  ``reply:<agent>:<trigger>``, which the server stores exactly as the in-process runner's key, so
  two runners can never store two replies to one trigger, whatever happens to claims.
- **Failures.** Connection errors and 502/503/504 answers are retried with jittered exponential
  backoff (up to ``max_backoff`` seconds), indefinitely: a restarting server is waited for, and
  the idempotent reply key makes a retried post safe. A refused post (closed thread, budget,
  rule, egress) completes the trigger without a reply. A wrong or revoked credential stops the
  runner (the error propagates out of :meth:`RemoteRunner.run`).
- **Structured concurrency.** :meth:`RemoteRunner.run` owns one task group: the workers, the
  followers (each in its own cancel scope), lease renewals and delayed retries. Cancelling it
  (SIGTERM/SIGINT in the CLI) stops everything; claims held at that moment simply expire.

Limits: the agent's ``inbox_cap`` applies to the in-process runner only; refusals decided by the
remote runner itself (model failures, empty replies) are logged here, not in the audit log (the
server's own checks at claim time are audited there).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agent_network.client import (
    ApiError,
    Assignment,
    AsyncClient,
    Claim,
    Envelope,
    EnvelopePage,
    PermissionDenied,
    TransportError,
)
from agent_network.errors import AgentNetworkError
from agent_network.runtime.models import resolve_model_name
from agent_network.runtime.prompt import build_prompt
from agent_network.runtime.runner import generate_reply, new_runner_id
from agent_network.services.claims import reply_key

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({502, 503, 504})
PAGE = 500  # envelopes per history page
RETRY_MARGIN = 0.2  # seconds after another runner's lease runs out before trying again


@dataclass(frozen=True, slots=True)
class AgentCard:
    """What the runner knows of one agent it runs (from ``GET /runners/assignments``)."""

    id: str
    name: str
    org_id: str
    org_name: str
    identity: str
    model: str | None


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """One followed thread: its title and the agents answering in it, each with ``since``."""

    thread_id: str
    title: str
    agents: tuple[tuple[AgentCard, datetime], ...]


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """One agent answering one trigger, with the messages up to it (oldest first)."""

    agent: AgentCard
    thread_id: str
    title: str
    trigger: Envelope
    history: tuple[tuple[str, str, str], ...]


def _when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def plans_from(assignments: list[Assignment]) -> dict[str, ThreadPlan]:
    """``thread_id -> ThreadPlan`` from ``GET /runners/assignments``."""
    by_thread: dict[str, tuple[str, list[tuple[AgentCard, datetime]]]] = {}
    for item in assignments:
        a = item.agent
        card = AgentCard(a.id, a.name, a.org_id or "", a.org_name or "", a.identity, a.model)
        for t in item.threads:
            entry = by_thread.setdefault(t.thread_id, (t.title, []))
            entry[1].append((card, _when(t.since)))
    return {
        tid: ThreadPlan(tid, title, tuple(sorted(agents, key=lambda p: p[0].id)))
        for tid, (title, agents) in by_thread.items()
    }


class RemoteRunner:
    """Runs the routines of the agents ``client``'s credential owns (see the module docstring).

    Arguments: ``runner_id`` (claims name it; default unique per process), ``lease_seconds``
    (claim lease, renewed every third of it), ``workers`` (jobs at once), ``relist_seconds``
    (how often assignments are re-read), ``poll_wait`` (long-poll seconds, at most 60),
    ``default_model`` (for agents without a model), ``history_limit`` (messages in a prompt),
    ``knowledge_chunks`` (chunks in a prompt), ``max_backoff`` (seconds between retries).
    Counters for progress and tests: ``replies`` (replies posted), ``jobs_done``.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        runner_id: str | None = None,
        lease_seconds: float = 30.0,
        workers: int = 2,
        relist_seconds: float = 10.0,
        poll_wait: float = 20.0,
        default_model: str | None = None,
        history_limit: int = 12,
        knowledge_chunks: int = 3,
        max_backoff: float = 2.0,
    ) -> None:
        if not 0 < lease_seconds <= 3600:
            raise ValueError("lease_seconds must be in (0, 3600]")
        if not 0 <= poll_wait <= 60:
            raise ValueError("poll_wait must be between 0 and 60 seconds")
        if workers < 1 or relist_seconds <= 0 or history_limit < 1 or knowledge_chunks < 0:
            raise ValueError("workers, relist_seconds and history_limit must be positive")
        self.client = client
        self.runner_id = runner_id or new_runner_id("remote")
        self.lease_seconds = lease_seconds
        self.workers = workers
        self.relist_seconds = relist_seconds
        self.poll_wait = poll_wait
        self.default_model = default_model
        self.history_limit = history_limit
        self.knowledge_chunks = knowledge_chunks
        self.max_backoff = max_backoff
        self.replies = 0
        self.jobs_done = 0
        self._send: MemoryObjectSendStream[RemoteJob]
        self._recv: MemoryObjectReceiveStream[RemoteJob]
        self._send, self._recv = anyio.create_memory_object_stream[RemoteJob](math.inf)
        self._known: set[tuple[str, str]] = set()  # (agent_id, trigger id) seen by this process
        self._followers: dict[str, tuple[ThreadPlan, anyio.CancelScope]] = {}
        self._knowledge_readable = knowledge_chunks > 0
        self._tg: TaskGroup | None = None

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. ``task_status.started()`` once the first assignments are read
        and their followers started. Raises ApiError when the credential is refused."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for _ in range(self.workers):
                tg.start_soon(self._worker)
            await self._relist()
            log.info(
                "runner.started",
                runner_id=self.runner_id,
                threads=len(self._followers),
                agents=len({a.id for p, _ in self._followers.values() for a, _ in p.agents}),
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
        done: dict[str, set[int]] = {}
        for agent, _ in plan.agents:
            done[agent.id] = await self._done(agent.id, tid)
        ours = {a.id for a, _ in plan.agents}
        history: deque[tuple[str, str, str]] = deque(maxlen=self.history_limit)
        answered: set[tuple[str, str]] = set()
        backlog: list[RemoteJob] = []
        after, live = 0, False
        while True:
            page = await self._page(tid, after, self.poll_wait if live else 0.0)
            for env in page.items:
                history.append((env.sender.name, env.sender.org_name or "", env.content or ""))
                if env.sender.id in ours and env.causation_id:
                    answered.add((env.sender.id, env.causation_id))
                for agent, since in plan.agents:
                    if env.sender.id == agent.id or env.created_at <= since:
                        continue
                    if env.seq in done[agent.id]:
                        continue
                    job = RemoteJob(agent, tid, plan.title, env, tuple(history))
                    if live:
                        await self._enqueue(job)
                    else:
                        backlog.append(job)
            if not live and page.next_after == after:
                for job in backlog:
                    if (job.agent.id, job.trigger.id) not in answered:
                        await self._enqueue(job)
                backlog.clear()
                live = True
            after = page.next_after

    async def _page(self, thread_id: str, after: int, wait: float) -> EnvelopePage:
        return await self._retrying(
            lambda: self.client.threads.messages(thread_id, after=after, limit=PAGE, wait=wait)
        )

    async def _done(self, agent_id: str, thread_id: str) -> set[int]:
        found = await self._retrying(lambda: self.client.runners.done(agent_id, thread_id))
        return set(found.done)

    async def _enqueue(self, job: RemoteJob) -> None:
        key = (job.agent.id, job.trigger.id)
        if key not in self._known:
            self._known.add(key)
            await self._send.send(job)

    # -------------------------------------------------------------------- jobs

    async def _worker(self) -> None:
        async for job in self._recv:
            retry_in: float | None = None
            try:
                retry_in = await self._handle(job)
            except Exception as exc:  # a job never takes the runner down
                log.exception("runner.job_failed", agent_id=job.agent.id, error=repr(exc))
            if retry_in is not None and self._tg is not None:
                self._tg.start_soon(self._retry_later, job, retry_in)
            else:
                self.jobs_done += 1

    async def _retry_later(self, job: RemoteJob, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(job)

    async def _handle(self, job: RemoteJob) -> float | None:
        """Claim, answer and complete one job. Returns None when finished, or the seconds after
        which to look again (another runner holds the trigger)."""
        try:
            await self._retrying(lambda: self._claim(job))
        except ApiError as err:
            if err.code == "claim_held":
                wait = err.retry_after if err.retry_after is not None else self.lease_seconds
                return wait + RETRY_MARGIN
            if err.code == "claim_done" or err.status in (403, 404, 422):
                log.debug("runner.not_claimed", agent_id=job.agent.id, reason=str(err))
                return None
            raise
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_claim, job)
            try:
                await self._answer(job)
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()
        try:  # answered, refused or failed: nobody takes it again
            await self._retrying(
                lambda: self.client.runners.complete(
                    job.agent.id, job.thread_id, job.trigger.seq, self.runner_id
                )
            )
        except ApiError as err:  # taken over meanwhile: the reply key keeps it to one reply
            log.warning("runner.complete_refused", agent_id=job.agent.id, error=str(err))
        if error is not None:
            raise error
        return None

    async def _claim(self, job: RemoteJob) -> Claim:
        return await self.client.runners.claim(
            job.agent.id,
            job.thread_id,
            job.trigger.seq,
            self.runner_id,
            lease_seconds=self.lease_seconds,
        )

    async def _keep_claim(self, job: RemoteJob) -> None:
        """Renew ``job``'s claim every third of the lease (until cancelled)."""
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            try:
                await self._claim(job)
            except (ApiError, TransportError) as err:
                log.warning("runner.renew_failed", error=str(err))

    async def _answer(self, job: RemoteJob) -> None:
        agent, trigger = job.agent, job.trigger
        key = reply_key(agent.id, trigger.id)
        prompt = build_prompt(
            agent_name=agent.name,
            org_name=agent.org_name,
            identity=agent.identity,
            thread_title=job.title,
            history=list(job.history),
            knowledge=await self._knowledge(job),
        )
        model_name = resolve_model_name(agent.model, self.default_model)
        try:
            reply = await generate_reply(
                model_name=model_name,
                prompt=prompt,
                speaker_name=agent.name,
                other_names=sorted({n for n, _, _ in job.history if n != agent.name}),
                seed_key=key,
            )
        except AgentNetworkError as err:
            log.warning("runner.model_failed", agent_id=agent.id, error=f"{err.code}: {err}")
            return
        if not reply:
            log.warning("runner.empty_reply", agent_id=agent.id, trigger_id=trigger.id)
            return
        try:
            await self._retrying(
                lambda: self.client.threads.post(
                    job.thread_id,
                    reply,
                    agent_id=agent.id,
                    idempotency_key=key,
                    causation_id=trigger.id,
                )
            )
        except ApiError as err:
            if err.status in (403, 404, 409, 422, 429):
                log.info("runner.reply_refused", agent_id=agent.id, error=str(err))
                return
            raise
        self.replies += 1

    async def _knowledge(self, job: RemoteJob) -> list[dict[str, Any]]:
        """Best chunks of the agent's org knowledge for the trigger; [] when not readable."""
        if not self._knowledge_readable:
            return []
        query = (job.trigger.content or "")[:1000]
        try:
            hits = await self._retrying(
                lambda: self.client.knowledge.search(
                    query, agent_id=job.agent.id, limit=self.knowledge_chunks
                )
            )
        except PermissionDenied:
            log.info("runner.no_knowledge", reason="this credential may not read knowledge")
            self._knowledge_readable = False
            return []
        except ApiError as err:
            log.warning("runner.knowledge_failed", error=str(err))
            return []
        return [hit.model_dump() for hit in hits]

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
