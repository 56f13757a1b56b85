"""The remote runner: executes the ``participate`` and ``triage`` routines of the agents a
credential owns, in a process of its own, talking to the server only through the SDK's REST
client.

Start it with ``agent-network runner --url URL --token TOKEN`` (an org key runs every agent of
the org; an agent token runs that agent). Several remote runners, and the in-process runner of
the server, can run the same agents at once: they share the work through claims.

Design
------
- **What to run.** ``GET /runners/assignments`` lists the credential's agents with an active
  ``participate`` or ``triage`` routine, with name, org, identity, model and ``inbox_cap``, the
  threads to follow for each routine with ``since`` (when both routine and membership existed)
  and the triage routines' configs. It is re-listed every ``relist_seconds``: a thread that
  appears gets a follower, one that disappears (membership ended, routine paused) loses it, a
  thread whose set of agents (or triage configs) changed gets a new one.
- **Following a thread: long-poll REST.** One follower task per thread pages through
  ``GET /threads/{id}/envelopes`` (every envelope the credential may read, not only messages)
  from ``after=0`` and then long-polls it (``wait=poll_wait``). (Chosen over realtime rooms: the
  runner needs nothing but the REST surface, and a long-poll survives server restarts without
  any session state.)
- **Triggers: the in-process runner's rule** (:func:`~agent_network.runtime.thread_view.
  turn_takers`; the server checks it exactly when the trigger is claimed,
  :func:`~agent_network.services.claims.trigger_refusal`). Only envelopes committed after the
  agent's ``since`` whose ``audience`` admits the agent count. In a thread without a protocol
  (its ``thread.created`` names no participants) a message from somebody else triggers the
  agent. In a protocol thread the runner has no exact fold (its reads are audience-filtered),
  so every envelope that may give a participant agent its turn is a candidate — a message (also
  the agent's own: a workflow ``stay``), the ``thread.created``/``thread.ack`` that activates a
  thread whose first speaker is the agent, a ``context.set``, a budget change; not
  ``thread.closing``/``thread.closed``/``thread.reject`` — except one followed by a newer
  message (the turn follows the latest message). The claim then tells: a candidate that does not
  make the agent the expected speaker is refused (422) and dropped without a model call.
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
  claim (``POST /claims/complete``). Leases are short (``--lease``, default the setting
  ``claim_lease``, 10 s), and the runner id is stable across restarts on one host
  (:mod:`agent_network.runtime.identity`): a runner killed while answering and started again
  renews — takes back — its predecessor's claims during its catch-up instead of waiting for
  them to run out. A spent runaway budget does not refuse an answer to a person's message
  (:func:`~agent_network.protocol.lifecycle.budget_spent`).
- **The reply** is built as in the in-process runner: :func:`~agent_network.runtime.
  prompt.build_prompt` over the last ``history_limit`` messages up to the trigger that the agent
  may see (audience), the protocol notes (adapter, participants, a workflow's context) and the
  best ``knowledge_chunks`` chunks of ``GET /knowledge/search`` (skipped when the credential may
  not read knowledge, e.g. an agent token), then :func:`~agent_network.runtime.runner.
  generate_reply` with the agent's model resolved locally (``default_model`` for agents without
  one; ``test`` works). A trigger that is not a message (the agent opens the thread, or resumes
  after a context change) is answered from the history before it (none: the thread's first
  message, prompted with the title). The reply is posted with ``causation_id`` = the trigger
  (any envelope of the thread) and ``idempotency_key`` = ``reply:<agent>:<trigger>``, which the
  server stores exactly as the in-process runner's key, so two runners can never store two
  replies to one trigger, whatever happens to claims.
- **Protocol threads** (see ``runtime/runner.py`` for the whole behaviour). Before the model call
  the runner reads ``GET /threads/{id}`` and asks
  :func:`~agent_network.runtime.thread_view.thread_may_speak` (``status``, ``participants``,
  ``expected_speaker``, ``pending_acks``, budget): when the agent may not speak, no model is
  called and the trigger is completed (logged as ``runner.not_your_turn``). A trigger is
  dropped when a newer message exists (the agent already spoke, or the turn moved on). One
  agent's turns in one protocol thread run one at a time in this runner. The check is repeated
  right before the post. The reply's ``audience`` is the trigger's audience plus its sender,
  minus the agent (:func:`~agent_network.runtime.thread_view.reply_audience`; none when the
  trigger had none). In a workflow the agent gets the graph's tools from
  ``GET /threads/{id}/tools?agent_id=`` (falling back to the thread's ``thread.created``
  envelope, :func:`~agent_network.runtime.thread_view.graph_tools`, when the server has no such
  endpoint) and a generic ``handoff`` to the other participants, as pydantic-ai tools and as
  the ``[tool: argument]`` text convention; the calls are posted as ``tool_calls``.
- **Tools and secrets.** Each model run gets :class:`~agent_network.runtime.tools.RunDeps` as
  its deps, with the tools registered for the agent in this process
  (:func:`~agent_network.runtime.tools.register_agent_tools`); their
  :class:`~agent_network.runtime.tools.RemoteSecrets` fetch the agent's secrets from
  ``POST /runners/secrets`` under this runner's claim, which the server answers only for the
  agent's own token (a runner using an org key gives its tools no secret). A reply repeating
  one is refused by the server's egress default like any post.
- **Failures.** Connection errors and 502/503/504 answers are retried with jittered exponential
  backoff (up to ``max_backoff`` seconds), indefinitely: a restarting server is waited for, and
  the idempotent reply key makes a retried post safe. A refused post (closed thread, budget,
  rule, egress) completes the trigger without a reply. A wrong or revoked credential stops the
  runner (the error propagates out of :meth:`RemoteRunner.run`).
- **Structured concurrency.** :meth:`RemoteRunner.run` owns one task group: the workers, the
  followers (each in its own cancel scope), lease renewals and delayed retries. Cancelling it
  (SIGTERM/SIGINT in the CLI) stops everything; the claims held at that moment are released
  (``POST /claims/release``, as the in-process runner releases its own on a clean stop), so
  other runners take them over at once.

- **Triage routines.** An agent's triage routine follows its intake threads (assignment entries
  with ``preset`` ``triage``; the routine's config comes with the assignment). A request — a
  message there from somebody else, visible to the agent, that is no triage forward or reply
  (:func:`is_request`) — is the triage routine's, not the agent's participate routine's. It is
  claimed like any trigger; the runner asks the agent's model for the label
  (:func:`~agent_network.runtime.runner.classify_request`, skipped when ``use_model`` is
  false) and posts the answer to ``POST /runners/triage``, where the server decides the label
  (the model's, else keywords, else the fallback), forwards the request and replies in intake
  with every check and audit of the in-process runner. The forward is never written by the
  runner, so its ``data.triage`` marker cannot be forged over REST. (A runner restarted
  between the forward and the reply asks the model once more; the server then ignores the
  answer and writes only the reply.)
- **inbox_cap.** At most the agent's ``inbox_cap`` jobs wait or run in this process; a trigger
  beyond it is dropped: its claim is completed with ``dropped="inbox_cap"``, which the server
  audits as ``rule.refused`` (the in-process runner drops and audits the same way).

- **Failures only the runner sees** — the model failed, its reply came out empty, the job
  raised — complete the claim with ``dropped`` ``failed`` / ``empty_reply`` (and a
  ``detail``), which the server audits as ``routine.failed`` / ``routine.skipped``, as the
  in-process runner audits them.

Limits: ``inbox_cap`` counts per runner process, so N runners may hold N times the cap between
them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from agent_network.config import Settings
from agent_network.errors import AgentNetworkError
from agent_network.protocol.adapters.graph import ToolSpec
from agent_network.protocol.events import (
    EV_MESSAGE,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
)
from agent_network.protocol.lifecycle import person_message
from agent_network.runtime.identity import take_runner_id
from agent_network.runtime.models import resolve_model_name
from agent_network.runtime.prompt import build_prompt
from agent_network.runtime.runner import Reply, classify_request, generate_reply, new_runner_id
from agent_network.runtime.thread_view import (
    PASS_REPLY,
    ToolBox,
    graph_tools,
    handoff_names,
    participant_id,
    reply_audience,
    thread_may_speak,
)
from agent_network.runtime.tools import RemoteSecrets, RunDeps, agent_tools
from agent_network.runtime.triage import TriageConfig, is_triage_output, parse_config
from agent_network.services.claims import reply_key

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


def context_line(context: Mapping[str, Any] | None) -> str | None:
    """The prompt line of a workflow's context (as the in-process runner writes it)."""
    if not context:
        return None
    shown = ", ".join(
        f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'), ensure_ascii=False)}"
        for k, v in sorted(context.items())
    )
    return f"Workflow context: {shown}"


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
    ``default_model`` (for agents without a model), ``history_limit`` (messages in a prompt),
    ``knowledge_chunks`` (chunks in a prompt), ``max_backoff`` (seconds between retries),
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
        self.replies = 0
        self.forwards = 0
        self.dropped = 0
        self.jobs_done = 0
        self._pending: dict[str, int] = {}  # agent id -> its jobs queued, running or retrying
        self._send: MemoryObjectSendStream[RemoteJob]
        self._recv: MemoryObjectReceiveStream[RemoteJob]
        self._send, self._recv = anyio.create_memory_object_stream[RemoteJob](math.inf)
        self._known: set[tuple[str, str]] = set()  # (agent_id, trigger id) seen by this process
        self._followers: dict[str, tuple[ThreadPlan, anyio.CancelScope]] = {}
        self._knowledge_readable = knowledge_chunks > 0
        self._created: dict[str, dict[str, Any]] = {}  # thread id -> thread.created data
        # (agent_id, thread_id) -> lock: one agent's turns in one protocol thread, one at a time
        self._turn_locks: dict[tuple[str, str], anyio.Lock] = {}
        self._tg: TaskGroup | None = None

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
            for _ in range(self.workers):
                tg.start_soon(self._worker)
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
                    self._created[tid] = dict(env.data)
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
        agent's ``inbox_cap`` jobs are already waiting or running here (the claim is completed
        with ``dropped="inbox_cap"``, which the server audits, so no runner answers it)."""
        key = (job.agent.id, job.trigger.id)
        if key in self._known:
            return
        self._known.add(key)
        cap = job.agent.inbox_cap
        if cap is not None and self._pending.get(job.agent.id, 0) >= cap:
            await self._drop(job)
            return
        self._pending[job.agent.id] = self._pending.get(job.agent.id, 0) + 1
        await self._send.send(job)

    async def _drop(self, job: RemoteJob) -> None:
        log.info(
            "runner.inbox_cap",
            agent_id=job.agent.id,
            trigger_id=job.trigger.id,
            cap=job.agent.inbox_cap,
        )
        await self._complete(job, "inbox_cap", None)
        self.dropped += 1

    async def _complete(self, job: RemoteJob, dropped: str | None, detail: str | None) -> None:
        """Mark ``job``'s trigger done (``dropped``/``detail``: why it stays unanswered, for the
        server's audit log). A refusal — another runner took it over (the reply key still keeps
        it to one reply), or access is gone — is logged."""
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
                self._pending[job.agent.id] -= 1
                if not self._pending[job.agent.id]:
                    del self._pending[job.agent.id]

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
            dropped: tuple[str, str | None] | None = None
            try:
                async with self._turn(job):
                    dropped = await self._answer(job)
            except Exception as exc:
                error = exc
                dropped = ("failed", f"{type(exc).__name__}: {exc}"[:500])
            tg.cancel_scope.cancel()
        # answered, refused or failed: nobody takes it again
        await self._complete(job, *(dropped or (None, None)))
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

    @contextlib.asynccontextmanager
    async def _turn(self, job: RemoteJob) -> AsyncIterator[None]:
        """Hold the (agent, thread) lock of a protocol thread while the job runs (an open
        thread's jobs run freely)."""
        if not job.protocol:
            yield
            return
        key = (job.agent.id, job.thread_id)
        lock = self._turn_locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._turn_locks.pop(key, None)

    async def _thread_view(self, thread_id: str) -> dict[str, Any]:
        """``GET /threads/{id}`` as a plain dict (with the fields a newer server adds)."""
        thread = await self._retrying(lambda: self.client.threads.get(thread_id))
        return thread.model_dump(mode="json")

    async def _tools(self, job: RemoteJob, view: Mapping[str, Any]) -> ToolBox:
        """The workflow tools of the job's agent now: the graph's from
        ``GET /threads/{id}/tools?agent_id=``, plus a generic ``handoff`` to the other
        participants (``view`` is ``GET /threads/{id}``). A server without that endpoint: the
        tools read from the thread's ``thread.created`` envelope."""
        agent_id = job.agent.id
        try:
            found = await self._retrying(
                lambda: self.client.threads.tools(job.thread_id, agent_id=agent_id)
            )
        except ApiError as err:
            created = self._created.get(job.thread_id, {})
            log.info("runner.tools_from_created", thread_id=job.thread_id, error=str(err))
            return graph_tools(created, agent_id)
        specs = tuple(
            ToolSpec(
                t.name,
                t.description,
                tuple(t.speakers) if t.speakers is not None else None,
                t.handoff,
                t.finish,
            )
            for t in found
        )
        people = [
            (participant_id(p), str(p.get("name") or "") if isinstance(p, Mapping) else "")
            for p in view.get("participants") or []
        ]
        ids = {pid for pid, _ in people}
        names = handoff_names(self._created.get(job.thread_id, {}).get("names"), people)

        def resolve(who: str) -> str | None:
            if who in ids:
                return who
            pid = names.get(who)
            return pid if pid in ids else None

        targets = tuple(
            name if name and names.get(name) == pid else pid
            for pid, name in people
            if pid != agent_id
        )
        return ToolBox(specs, targets, resolve)

    async def _newer_message(self, job: RemoteJob) -> bool:
        """True when a message newer than the trigger exists (a protocol thread's turn follows
        the latest message: the agent already spoke, or it answers that one instead)."""
        page = await self._retrying(
            lambda: self.client.threads.messages(
                job.thread_id, after=job.trigger.seq, limit=PAGE, wait=0.0
            )
        )
        return bool(page.items)

    @staticmethod
    def _protocol_notes(view: Mapping[str, Any], agent_id: str) -> list[str]:
        """Prompt lines about the thread's protocol for the agent whose turn it is (as the
        in-process runner writes them): the adapter and the other participants, a workflow's
        context. [] for an open thread."""
        adapter = view.get("adapter") or "open"
        if adapter == "open":
            return []
        others = ", ".join(
            str(p.get("name") or p.get("id")) if isinstance(p, Mapping) else participant_id(p)
            for p in view.get("participants") or []
            if participant_id(p) != agent_id
        )
        lines = [f"This is a {adapter} thread with {others}; it is your turn to speak."]
        context = context_line(view.get("context"))
        if context is not None:
            lines.append(context)
        return lines

    async def _answer(self, job: RemoteJob) -> tuple[str, str | None] | None:
        """Answer one claimed job (or route it, for a triage routine). Returns None when it
        replied or decided not to for a reason the server knows (not its turn, superseded, a
        refused post), or ``(dropped, detail)`` for a failure only this runner saw — the model
        failed (``failed``) or its reply came out empty (``empty_reply``) — which completing
        the claim reports to the audit log."""
        if job.triage is not None:
            await self._route(job, job.triage)
            return None
        agent, trigger = job.agent, job.trigger
        key = reply_key(agent.id, trigger.id)
        if job.protocol and await self._newer_message(job):
            log.debug("runner.superseded", agent_id=agent.id, trigger_id=trigger.id)
            return None
        view = await self._thread_view(job.thread_id)
        answers = person_message(trigger.type, trigger.sender.kind)  # see budget_spent
        if not thread_may_speak(view, agent.id, answers_person=answers):
            log.info(
                "runner.not_your_turn",
                agent_id=agent.id,
                trigger_id=trigger.id,
                expected=view.get("expected_speaker"),
                status=view.get("status"),
            )
            return None
        tools = await self._tools(job, view) if view.get("adapter") == "workflow" else None
        prompt = build_prompt(
            agent_name=agent.name,
            org_name=agent.org_name,
            identity=agent.identity,
            thread_title=job.title,
            history=list(job.history),
            knowledge=await self._knowledge(job),
            notes=tools.prompt_lines() if tools else (),
            situation=self._protocol_notes(view, agent.id) if job.protocol else (),
        )
        model_name = resolve_model_name(agent.model, self.default_model)
        try:
            answer = await generate_reply(
                model_name=model_name,
                prompt=prompt,
                speaker_name=agent.name,
                other_names=sorted({n for n, _, _ in job.history if n != agent.name}),
                seed_key=key,
                tools=tools or None,
                model_seed=self.model_seed,
                deps=self._deps(job),
                extra_tools=agent_tools(agent.id),
            )
        except AgentNetworkError as err:
            log.warning("runner.model_failed", agent_id=agent.id, error=f"{err.code}: {err}")
            return "failed", f"{err.code}: {err}"[:500]
        if (
            not answer.content
            and view.get("adapter") == "discussion"
            and view.get("expected_speaker") == agent.id
        ):  # the round-robin waits for this agent: pass rather than stall (the in-process
            # runner also passes in workflows, where it can fold the pass first)
            answer = Reply(PASS_REPLY, answer.tool_calls)
        if not answer.content:
            log.warning("runner.empty_reply", agent_id=agent.id, trigger_id=trigger.id)
            return "empty_reply", None
        view = await self._thread_view(job.thread_id)
        if not thread_may_speak(view, agent.id, answers_person=answers):  # it moved meanwhile
            log.info("runner.not_your_turn", agent_id=agent.id, trigger_id=trigger.id)
            return None
        extra: dict[str, Any] = {}
        if answer.tool_calls:
            extra["tool_calls"] = answer.tool_calls
        audience = reply_audience(
            trigger.audience,
            (trigger.sender.kind, trigger.sender.id),
            agent.id,
            [participant_id(p) for p in view.get("participants") or []] if job.protocol else [],
        )
        if audience is not None:
            extra["audience"] = audience
        try:
            await self._retrying(
                lambda: self.client.threads.post(
                    job.thread_id,
                    answer.content,
                    agent_id=agent.id,
                    idempotency_key=key,
                    causation_id=trigger.id,
                    **extra,
                )
            )
        except ApiError as err:
            if err.status in (403, 404, 409, 422, 429):
                log.info("runner.reply_refused", agent_id=agent.id, error=str(err))
                return None
            raise
        self.replies += 1
        return None

    def _deps(self, job: RemoteJob) -> RunDeps:
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

    async def _route(self, job: RemoteJob, seat: TriageSeat) -> None:
        """Route one intake request: classify it with the agent's model here (unless the
        routine does not use the model), then ``POST /runners/triage``, where the server picks
        the label (the model's, else keywords, else the fallback), forwards the request and
        replies in intake with every check of the in-process runner."""
        agent, trigger = job.agent, job.trigger
        answer: str | None = None
        if seat.config.use_model:
            answer = await classify_request(
                model_name=resolve_model_name(agent.model, self.default_model),
                agent_name=agent.name,
                identity=agent.identity,
                config=seat.config,
                request=trigger.content or "",
                sender_name=trigger.sender.name,
                seed_key=reply_key(agent.id, trigger.id),
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
        self.replies += routed.reply_id is not None

    async def _knowledge(self, job: RemoteJob) -> list[dict[str, Any]]:
        """Best chunks of the agent's org knowledge for the trigger; [] when not readable."""
        if not self._knowledge_readable:
            return []
        query = job.trigger.content or (job.history[-1][2] if job.history else job.title)
        query = query[:1000]
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
