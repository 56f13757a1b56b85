"""The runner engine: runs routine jobs — claim, get the job, call the model, post, complete — over
a :class:`Port`, with the rules for a pass, an empty reply and a failure written once. Two ports
exist: in process (``runtime/runner.py``, over the hub and services) and remote
(``runtime/remote.py``, over the SDK). Each port discovers its triggers and hands them to
:meth:`Engine.submit`. Design: docs/architecture.md, "Runners: one engine, two ports".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agent_network.errors import AgentNetworkError
from agent_network.runtime.models import resolve_model_name
from agent_network.runtime.prompt import build_prompt
from agent_network.runtime.reply import REPLY_ATTEMPTS, classify_request, generate_reply
from agent_network.runtime.thread_view import PASS_REPLY, toolbox_from
from agent_network.runtime.tools import RunDeps, agent_tools
from agent_network.runtime.triage import TriageConfig
from agent_network.services.claims import reply_key
from agent_network.services.jobs import JobSpec

log = structlog.get_logger(__name__)

J = TypeVar("J")
J_in = TypeVar("J_in", contravariant=True)

Classify = Callable[[Mapping[str, Any], TriageConfig, str, str, str], Awaitable[str | None]]
"""``(agent: {id, name, identity, model}, config, request, sender name, request id) -> the
model's label answer`` (None: the model failed or is not used; the keywords decide)."""

Dropped = Literal["inbox_cap", "failed", "empty_reply"]
"""Why a job ends without a reply for a reason only the runner sees (audited by the port)."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A port's answer to a claim: ``granted`` (then ``spec``: the job, None when the server
    says there is nothing to answer; ``token``: the port's own data for the post), or
    ``retry_in`` seconds (another runner holds the trigger), or neither (done already)."""

    granted: bool
    spec: JobSpec | None = None
    retry_in: float | None = None
    token: Any = None


@dataclass(frozen=True, slots=True)
class Ident:
    """What the engine needs to know of a job: the agent, the thread, the trigger (id and the
    text a classification reads), the agent's ``inbox_cap`` (None: none) and whether a
    triage routine routes it (``triage``)."""

    agent_id: str
    thread_id: str
    trigger_id: str
    inbox_cap: int | None = None
    triage: bool = False


class Port(Protocol[J_in]):
    """What a runner engine needs from the world (in process or remote)."""

    default_model: str | None
    model_seed: int
    lease_seconds: float

    def ident(self, job: J_in) -> Ident:
        """The job's agent, thread and trigger."""
        ...

    async def claim(self, job: J_in, *, renew: bool = False) -> Claimed:
        """Claim (or renew) the job's trigger and, on a first grant, build its job."""
        ...

    async def complete(self, job: J_in, dropped: Dropped | None, detail: str | None) -> None:
        """Mark the trigger done; ``dropped`` (audited): why it stays unanswered."""
        ...

    async def protocol(self, job: J_in) -> bool:
        """Whether the job's thread has a protocol (its jobs run one at a time per agent)."""
        ...

    async def post(
        self,
        job: J_in,
        spec: JobSpec,
        claimed: Claimed,
        content: str,
        tool_calls: list[dict[str, Any]],
    ) -> bool:
        """Post the reply through the server's post path; False when it was refused."""
        ...

    async def passed(self, job: J_in) -> None:
        """Record that the agent passed its turn after an empty model reply."""
        ...

    async def route(self, job: J_in, classify: Classify) -> None:
        """Have the server route a triage request; ``classify`` asks the agent's model for
        the label (the in-process port calls it after the server's checks, the remote one
        before posting the answer)."""
        ...

    def deps(self, job: J_in, spec: JobSpec) -> RunDeps:
        """The model run's deps (the agent's secrets for its tools)."""
        ...

    async def failed(self, job: J_in, error: Exception) -> None:
        """A job raised outside its claim (logged or audited)."""
        ...

    async def finished(self, job: J_in) -> None:
        """The job is done for this runner (e.g. its cursor moves)."""
        ...


class Engine(Generic[J]):
    """Jobs, workers, claims and their renewal, turn locks, inbox_cap and retry-later for one
    runner. ``workers``: jobs at once. Counters: ``jobs_done``, ``replies``, ``dropped``."""

    def __init__(self, port: Port[J], *, workers: int = 2, retry_margin: float = 0.2) -> None:
        self.port = port
        self.workers = workers
        self.retry_margin = retry_margin
        self._send: MemoryObjectSendStream[J]
        self._recv: MemoryObjectReceiveStream[J]
        self._send, self._recv = anyio.create_memory_object_stream[J](math.inf)
        self.jobs_done = 0
        self.replies = 0
        self.dropped = 0
        self.pending = 0
        self.pending_by_agent: dict[str, int] = {}
        self.queued: set[Hashable] = set()  # (agent_id, trigger id) queued or running
        self.idle = anyio.Event()
        self.idle.set()
        self.tg: TaskGroup | None = None
        self._turn_locks: dict[tuple[str, str], anyio.Lock] = {}

    async def run(self, tg: TaskGroup) -> None:
        """Start the workers in ``tg`` (they stop with it)."""
        self.tg = tg
        for _ in range(self.workers):
            tg.start_soon(self._worker)

    def known(self, agent_id: str, trigger_id: str) -> bool:
        """Whether this engine has the (agent, trigger) job queued or running."""
        return (agent_id, trigger_id) in self.queued

    def over_cap(self, agent_id: str, cap: int | None) -> bool:
        """Whether the agent's ``inbox_cap`` jobs already wait or run here."""
        return cap is not None and self.pending_by_agent.get(agent_id, 0) >= cap

    async def submit(self, job: J) -> bool:
        """Queue ``job`` once per (agent, trigger); False when it is a duplicate or over the
        agent's ``inbox_cap`` (then completed with ``dropped="inbox_cap"``)."""
        ident = self.port.ident(job)
        key = (ident.agent_id, ident.trigger_id)
        if key in self.queued:
            return False
        if self.over_cap(ident.agent_id, ident.inbox_cap):
            log.info("runner.inbox_cap", agent_id=ident.agent_id, trigger_id=ident.trigger_id)
            await self.port.complete(job, "inbox_cap", None)
            self.dropped += 1
            return False
        self.queued.add(key)
        self.pending_by_agent[ident.agent_id] = self.pending_by_agent.get(ident.agent_id, 0) + 1
        self.pending += 1
        self.idle = anyio.Event() if self.idle.is_set() else self.idle
        await self._send.send(job)
        return True

    async def _worker(self) -> None:
        async for job in self._recv:
            retry_in: float | None = None
            try:
                retry_in = await self._handle(job)
            except anyio.get_cancelled_exc_class():
                raise  # stopping: the trigger stays unhandled; the next start catches up
            except Exception as exc:  # a job never takes the runner down
                log.exception("runner.job_failed", error=repr(exc))
                await self.port.failed(job, exc)
            if retry_in is not None and self.tg is not None:
                # another runner holds the trigger: look again when its lease runs out
                self.tg.start_soon(self._retry_later, job, retry_in)
            else:
                await self._finished(job)

    async def _retry_later(self, job: J, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(job)

    async def _finished(self, job: J) -> None:
        ident = self.port.ident(job)
        await self.port.finished(job)
        self.queued.discard((ident.agent_id, ident.trigger_id))
        self.jobs_done += 1
        self.pending -= 1
        left = self.pending_by_agent[ident.agent_id] - 1
        if left:
            self.pending_by_agent[ident.agent_id] = left
        else:
            del self.pending_by_agent[ident.agent_id]
        if self.pending == 0:
            self.idle.set()

    async def _handle(self, job: J) -> float | None:
        """Claim, answer and complete one job (under the turn lock of a protocol thread, so
        the job is built after the agent's previous turn there). Returns None when finished,
        or the seconds after which to look again (another runner holds the trigger)."""
        async with self._turn(job):
            claimed = await self.port.claim(job)
            if claimed.retry_in is not None:
                return max(self.retry_margin, claimed.retry_in + self.retry_margin)
            if not claimed.granted:
                return None
            dropped: tuple[Dropped, str | None] | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_claim, job)
                try:
                    dropped = await self._answer(job, claimed)
                except Exception as exc:
                    log.exception("runner.job_failed", error=repr(exc))
                    dropped = ("failed", f"{type(exc).__name__}: {exc}"[:500])
                tg.cancel_scope.cancel()
            # answered, refused or failed: nobody takes it again
            await self.port.complete(job, *(dropped or (None, None)))
        return None

    async def _keep_claim(self, job: J) -> None:
        """Renew the job's claim every third of the lease (until cancelled)."""
        while True:
            await anyio.sleep(self.port.lease_seconds / 3)
            try:
                renewed = await self.port.claim(job, renew=True)
            except Exception as exc:  # a failed renewal only risks a duplicate model call
                log.warning("runner.renew_failed", error=repr(exc))
                continue
            if not renewed.granted:
                log.warning("runner.claim_lost", agent_id=self.port.ident(job).agent_id)

    @contextlib.asynccontextmanager
    async def _turn(self, job: J) -> AsyncIterator[None]:
        """Hold the (agent, thread) lock of a protocol thread while the job runs (an open
        thread's jobs run freely). Jobs routed by triage run freely too."""
        if not await self.port.protocol(job):
            yield
            return
        ident = self.port.ident(job)
        key = (ident.agent_id, ident.thread_id)
        lock = self._turn_locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._turn_locks.pop(key, None)

    async def _answer(self, job: J, claimed: Claimed) -> tuple[Dropped, str | None] | None:
        """The rules, once for both ports: route a triage request; else build the prompt from
        the job, call the model, pass the turn on an empty reply where the protocol waits for
        the agent, drop an empty reply (``empty_reply``) or a model failure (``failed``),
        post the reply otherwise. Returns why it was dropped, or None."""
        ident = self.port.ident(job)
        if ident.triage:
            await self.port.route(job, self.classify)
            return None
        spec = claimed.spec
        if spec is None:
            return None  # the server says: nothing to answer (not its turn, spoke already...)
        agent = spec.agent
        tools = (
            toolbox_from(spec.tools, spec.handoff_targets, spec.participants, spec.names)
            if spec.tools or spec.handoff_targets
            else None
        )
        history = [(h[0], h[1], h[2]) for h in spec.history]
        prompt = build_prompt(
            agent_name=agent["name"],
            org_name=agent["org_name"],
            identity=agent["identity"],
            thread_title=spec.title,
            history=history,
            knowledge=spec.knowledge,
            notes=tools.prompt_lines() if tools else (),
            situation=spec.situation,
        )
        try:
            answer = await generate_reply(
                model_name=resolve_model_name(agent["model"], self.port.default_model),
                prompt=prompt,
                speaker_name=agent["name"],
                other_names=sorted({n for n, _, _ in history if n != agent["name"]}),
                seed_key=reply_key(ident.agent_id, ident.trigger_id),
                tools=tools,
                model_seed=self.port.model_seed,
                deps=self.port.deps(job, spec),
                extra_tools=agent_tools(ident.agent_id),
            )
        except AgentNetworkError as err:
            log.warning("runner.model_failed", agent_id=ident.agent_id, error=str(err))
            return "failed", f"{err.code}: {err.message}"[:500]
        content = answer.content
        if not content and spec.pass_on_empty:
            content = PASS_REPLY  # the protocol waits for this agent: pass rather than stall
            await self.port.passed(job)
        if not content:
            log.info("runner.empty_reply", agent_id=ident.agent_id, attempts=REPLY_ATTEMPTS)
            return "empty_reply", None
        if await self.port.post(job, spec, claimed, content, answer.tool_calls):
            self.replies += 1
        return None

    async def classify(
        self,
        agent: Mapping[str, Any],
        config: TriageConfig,
        request: str,
        sender_name: str,
        request_id: str,
    ) -> str | None:
        """The agent's model's answer to the classification prompt (None: not asked)."""
        if not config.use_model:
            return None
        return await classify_request(
            model_name=resolve_model_name(agent.get("model"), self.port.default_model),
            agent_name=str(agent["name"]),
            identity=str(agent.get("identity") or ""),
            config=config,
            request=request,
            sender_name=sender_name,
            seed_key=reply_key(str(agent["id"]), request_id),
        )
