"""The in-process runner: executes ``participate`` and ``triage`` routines for the agents of every
org.

For each trigger envelope, every active participate routine whose agent it triggers gets a job:
claim the trigger (a lease in ``runner_claims``, shared with remote runners:
``services/claims.py``), run the checks before a model call
(:func:`~agent_network.services.claims.preflight`), assemble the prompt, call the agent's model
through pydantic-ai (:func:`generate_reply`, also used by the remote runner), clean the reply,
post it through the hub with the trigger as causation and the idempotency key
``reply:<agent>:<trigger>`` — so an agent answers one trigger at most once, also after a restart,
a redelivery or a double claim — then complete the claim. A trigger whose claim another runner
holds is retried when that lease expires (take-over if it crashed; leases are short — the
setting ``claim_lease``, 10 s — and renewed every third of it while a job runs). A durable
cursor per (agent, thread) records progress; on start the runner catches up from its cursors and
from claims left open by a runner that died. The runner's id is stable across restarts
(:mod:`agent_network.runtime.identity`), so the claims its own dead predecessor left are renewed
— taken back — at once rather than after their lease.

Protocol threads (adapters ``consulting``, ``conversation``, ``discussion``, ``workflow``, or
any thread with a participant list):

- **Speak only when allowed.** Before the model call the runner asks
  :func:`~agent_network.protocol.may_speak` on the thread's current state (status, membership,
  acks, budget, turn order — the hub's own rules, without writing). When it says no, no model is
  called and the trigger is done (cursor advanced, claim completed). While the thread is live
  that is audited: as ``routine.skipped`` with the adapter's reason (``not_your_turn: ...``), or
  — a spent runaway budget, already caught by the preflight — as ``envelope.message`` with
  ``agent_budget_exhausted``, as the hub would; a closing, closed or not yet active thread is
  not audited. The same question is asked again right before the append (the state may have
  moved while the model ran), with the same outcome; the hub's own refusal at the append
  (NotYourTurnError, ProtocolViolationError) ends the job without a reply like
  ThreadClosedError. An agent that already spoke after its trigger does not speak again for it
  (its turn was used), and one agent's turns in one protocol thread run one at a time in this
  runner (two runners may still both call a model for two triggers of one turn; the hub keeps
  the second reply out).
- **Triggers.** In an open thread a ``message`` from somebody else triggers every member agent.
  In a protocol thread (see :func:`~agent_network.runtime.thread_view.turn_takers`) ANY envelope
  triggers the agent that is the expected speaker in the state right after it (folded up to it):
  the ``thread.created``/``thread.ack`` that made the thread active when the first speaker is an
  agent (it then writes the thread's opening message, prompted with the title), a
  ``context.set``, a workflow Handoff naming it, the previous speaker's message. Where anyone may
  speak (``conversation``) a message triggers the other participant agents. An envelope whose
  ``audience`` excludes the agent never triggers it. Keys and claims are per trigger envelope as
  above, so there is still one reply per (agent, trigger).
- **Audience.** The history in the prompt holds only the messages the agent may see (audience
  None = everyone; else the sender and the listed ids). A reply to an envelope with an audience
  goes to that audience plus the trigger's sender, minus the agent itself
  (:func:`~agent_network.runtime.thread_view.reply_audience`); a reply to an envelope without one
  goes to everyone.
- **Workflow tools.** In an active workflow thread the speaker gets the graph's tools for it
  (:func:`~agent_network.protocol.tools_for`) plus a generic ``handoff(target, reason)`` (the
  graph admits a Handoff in any workflow message), in two ways that end in one record
  (:class:`~agent_network.runtime.thread_view.ToolBox`): as pydantic-ai tools, for models that call
  tools; and as a text convention, for models that do not (the bundled local model): the prompt
  lists each tool as a tag (``- Approve the draft: [approve]``,
  ``- Send the draft back: [request_revision: reason]``, ``- pass the turn to writer:
  [handoff: name]``) and a trailing ``[tool]`` or ``[tool: argument]`` in the model's text (of
  any model) is taken as a call of that tool and stripped from the content. A tool whose spec
  has ``handoff`` records ``Handoff(target=spec.handoff, reason=<argument>)``, one with
  ``finish`` records ``Finish(summary=<argument>, reason=spec.finish)``, any other a plain
  ``"ok"``; at most one Handoff/Finish per turn. The reply is appended with
  ``data={"content": ..., "tool_calls": [tool_call(name, result, args=...), ...]}``, which the
  workflow adapter routes on. A reply that is only a tag gets a short content naming the tool
  (``"Approve."``).

Triage routines (hub-and-spoke; the pure parts are in :mod:`agent_network.runtime.triage`):

- **Requests.** A ``message`` in one of the routine's ``intake`` threads, from somebody other
  than the agent, that is not a forward or reply of any triage agent (``data["triage"]``) and
  that the agent may see. Where an agent has both routines, its triage routine takes the
  intake requests (its participate routine answers everything else). Jobs, claims, cursors and
  catch-up are those of participate (:func:`triage_participations` lists the intake threads).
- **Handling** (:meth:`Runner._triage`): the participate checks (preflight, may it speak), then
  classify (the model's first label, else keywords, else the fallback), check the route thread,
  apply the egress policy to the forwarded text and count it against the rate, forward it
  (``triage:<agent>:<request>``), and reply in intake (``reply:<agent>:<request>``; when the
  forward was refused, that the request stays in intake). A forward
  already stored (a runner stopped in between) is completed with the reply only, without a
  model call. A remote runner (``runtime/remote.py``) classifies with the agent's model in its
  own process and has the server run the rest (:meth:`Runner.route_request`, behind
  ``POST /runners/triage``).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic_ai import Agent as ModelAgent
from pydantic_ai import Tool
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.settings import ModelSettings
from sqlalchemy import RowMapping, select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    InvalidRequestError,
    NotYourTurnError,
    ProtocolViolationError,
    RunawayBudgetError,
    ThreadClosedError,
)
from agent_network.hub import AccessChangedError
from agent_network.model.envelope import Actor, Envelope
from agent_network.model.rule import Rule
from agent_network.protocol.adapters.base import Proposal
from agent_network.protocol.adapters.workflow import WorkflowState
from agent_network.protocol.events import EV_MESSAGE
from agent_network.protocol.fold import step
from agent_network.protocol.knobs import LIVE_STATUSES
from agent_network.protocol.lifecycle import admit, may_speak, person_message
from agent_network.protocol.state import ThreadState
from agent_network.runtime.cleaning import (
    clean_reply,
    drop_defective_sentences,
    drop_echoes,
    reply_defects,
)
from agent_network.runtime.identity import take_runner_id
from agent_network.runtime.models import build_model, resolve_model_name
from agent_network.runtime.prompt import Prompt, build_prompt
from agent_network.runtime.thread_view import (
    PASS_REPLY,
    ToolBox,
    passes_turn,
    reply_audience,
    toolbox_for,
    turn_takers,
    visible_to,
)
from agent_network.runtime.tools import RunDeps, agent_tools
from agent_network.runtime.triage import (
    MARKER,
    TriageConfig,
    classification_prompt,
    decide,
    forward_content,
    forward_key,
    is_request,
    marker,
    parse_config,
    reply_content,
    undelivered_content,
    unroutable_content,
)
from agent_network.services.base import ServiceContext
from agent_network.services.claims import (
    Refusal,
    agent_in_thread,
    participations,
    preflight,
    reply_key,
    thread_open_to_agent,
    triage_participations,
)
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.policy import (
    EgressRefusedError,
    EgressResult,
    check_outgoing,
    matches_data,
)
from agent_network.services.rules import RuleService, RuleViolationError, parse_rule
from agent_network.services.secrets import RunSecrets
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
from agent_network.store.wal import find_by_idempotency, read_envelopes

log = structlog.get_logger(__name__)

MODEL_TIMEOUT = 300.0  # seconds for one model call
ACCESS_RETRIES = 5  # appends of one reply when access keeps being removed meanwhile
REPLY_ATTEMPTS = 3  # model calls per trigger while the cleaned reply is empty or defective
REPLY_MAX_TOKENS = 200
RETRY_TEMPERATURE = 0.7  # the local model's temperature from the third attempt on
REPLY_MAX_SENTENCES = 3
RETRY_MARGIN = 0.2  # seconds after another runner's lease expires before trying to take over
DISPATCH_RETRIES = 8  # looks for a protocol thread's rows committed just after its envelope
STATE_CACHE = 1024  # protocol threads whose folded state (at the last dispatch) is kept
CLASSIFY_MAX_TOKENS = 16  # tokens of a triage model's answer (a label)
PRESETS = ("participate", "triage")  # the routine presets this runner executes

__all__ = [
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

CLASSIFY = object()  # _triage's default: ask the agent's model (else: the given answer)


@dataclass(frozen=True, slots=True)
class Job:
    """One agent answering one trigger envelope, by its routine's ``preset`` (``participate``
    or ``triage``)."""

    agent_id: str
    routine_id: str
    trigger: Envelope
    preset: str = "participate"


@dataclass(frozen=True, slots=True)
class TriageOutcome:
    """What one triage job did: the route ``label`` chosen (None: nothing matched), the stored
    forward (None: not forwarded) and the stored reply in intake (None: no reply, e.g. refused
    or not the agent's turn)."""

    label: str | None
    forward: Envelope | None
    reply: Envelope | None


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


@dataclass(frozen=True, slots=True)
class Reply:
    """A model's cleaned reply: ``content`` ("" when nothing worth posting came out) and the
    workflow ``tool_calls`` it made (``tool_call`` entries; [] outside workflows)."""

    content: str
    tool_calls: list[dict[str, Any]]


def local_seed(seed_key: str, attempt: int, model_seed: int = 0) -> int:
    """The local model's sampling seed (an unsigned 32-bit int) for ``attempt`` (0, 1, ...) at
    answering the trigger named by ``seed_key``, mixed with the deployment's ``model_seed``
    (:attr:`~agent_network.config.Settings.model_seed`; 0 gives the seeds of earlier versions)."""
    mixed = f"{seed_key}:{attempt}" if model_seed == 0 else f"{model_seed}:{seed_key}:{attempt}"
    return zlib.crc32(mixed.encode())


async def generate_reply(
    *,
    model_name: str,
    prompt: Prompt,
    speaker_name: str,
    other_names: list[str],
    seed_key: str,
    tools: ToolBox | None = None,
    model_seed: int = 0,
    deps: RunDeps | None = None,
    extra_tools: Sequence[Tool[Any]] = (),
) -> Reply:
    """Call the model ``model_name`` with ``prompt`` and return the cleaned reply.

    Each call's text is cleaned (:func:`~agent_network.runtime.cleaning.clean_reply`), stripped
    of what the model copied from the prompt (:func:`~agent_network.runtime.cleaning.
    drop_echoes` with the prompt's ``echo_sources`` and ``echo_phrases``) and cleaned again,
    keeping at most :data:`REPLY_MAX_SENTENCES` sentences. The model is called again, up to
    :data:`REPLY_ATTEMPTS` calls, each with the previous prompt's ``retry`` (when it has one),
    while that comes out empty or with a defect
    (:func:`~agent_network.runtime.cleaning.reply_defects`: a template placeholder, speaking
    as another participant of ``other_names`` or org of the prompt's ``other_orgs``, a repeated
    sentence). When no call gave a reply without defects, the first reply that still has a
    sentence after its defective ones are dropped
    (:func:`~agent_network.runtime.cleaning.drop_defective_sentences`) is returned, so no
    defect is ever posted. Each call gets at most :data:`REPLY_MAX_TOKENS` tokens and
    :data:`MODEL_TIMEOUT` seconds. The local model gets a seed derived from ``seed_key``, the
    attempt and ``model_seed`` (:func:`local_seed`; reproducible per trigger, other samples for
    another ``model_seed``). ``tools`` (a workflow speaker's :class:`ToolBox`) are given to the
    model as pydantic-ai tools, and a trailing ``[tool]``/``[tool: argument]`` tag in its text
    is taken as a call of that tool (stripped from the content); the calls of the attempt that
    produced the reply are returned. An attempt where pydantic-ai gives up on the model
    (UnexpectedModelBehavior, e.g. no text after its output retries) counts as empty.
    A reply that is only a tool call gets a short content naming the tool. ``deps`` (the
    agent's :class:`~agent_network.runtime.tools.RunDeps`, with its secrets) is the model
    run's pydantic-ai ``deps``, which ``extra_tools`` (the agent's own tools,
    :func:`~agent_network.runtime.tools.agent_tools`) read through their ``RunContext``.
    Returns ``Reply("", [])`` when every attempt came out empty. Raises ModelUnavailableError (the
    model cannot be built), TimeoutError (a call took too long) and whatever the model's
    provider raises.
    """
    model = build_model(model_name)
    orgs = tuple(o for o in (prompt.org_name, *prompt.other_orgs) if o)
    fallback: Reply | None = None
    asked = prompt
    for attempt in range(REPLY_ATTEMPTS):
        settings: ModelSettings = {"max_tokens": REPLY_MAX_TOKENS}
        if model_name.startswith("local:"):
            # reproducible per (agent, trigger, attempt, model_seed); a new sample on each retry
            settings["seed"] = local_seed(seed_key, attempt, model_seed)
            if attempt >= 2:  # two samples were empty or defective: sample more freely
                settings["temperature"] = RETRY_TEMPERATURE
        if tools:
            tools.reset()
        if attempt:  # the last attempt came out empty or defective: a plainer prompt
            asked = asked.retry or asked
        offered: list[Tool[Any]] = [*(tools.pydantic_tools() if tools else ()), *extra_tools]
        agent: ModelAgent[Any, str] = ModelAgent(
            model, system_prompt=asked.system, tools=offered, deps_type=object
        )
        try:
            with anyio.fail_after(MODEL_TIMEOUT):
                result = await agent.run(asked.user, model_settings=settings, deps=deps)
        except UnexpectedModelBehavior as exc:  # e.g. no text after its retries: an empty try
            log.info("runner.model_misbehaved", error=str(exc))
            continue
        raw = str(result.output)
        if tools:
            raw = tools.take_tags(raw)
        reply = clean_reply(raw, speaker_name=speaker_name, other_names=other_names, org_names=orgs)
        reply = drop_echoes(reply, sources=prompt.echo_sources, phrases=prompt.echo_phrases)
        reply = clean_reply(
            reply,
            speaker_name=speaker_name,
            other_names=other_names,
            max_sentences=REPLY_MAX_SENTENCES,
            org_names=orgs,
        )
        calls: list[dict[str, Any]] = []
        if tools:
            reply = tools.take_tags(reply)  # a tag the raw text hid behind trailing noise
            calls = list(tools.calls)
            if not reply and calls:
                reply = calls[-1]["name"].replace("_", " ").capitalize() + "."
        if not reply:
            continue
        defects = reply_defects(
            reply,
            speaker_name=speaker_name,
            other_names=other_names,
            other_orgs=prompt.other_orgs,
        )
        if not defects:
            return Reply(reply, calls)
        log.info("runner.reply_defective", attempt=attempt, defects=defects[:5])
        if fallback is None:
            salvaged = drop_defective_sentences(
                reply,
                speaker_name=speaker_name,
                other_names=other_names,
                other_orgs=prompt.other_orgs,
            )
            if salvaged:
                fallback = Reply(salvaged, calls)
    return fallback or Reply("", [])


async def classify_request(
    *,
    model_name: str,
    agent_name: str,
    identity: str,
    config: TriageConfig,
    request: str,
    sender_name: str,
    seed_key: str,
) -> str | None:
    """A triage agent's model's answer to the classification prompt
    (:func:`~agent_network.runtime.triage.classification_prompt`) for ``request`` from
    ``sender_name``, cleaned; at most :data:`CLASSIFY_MAX_TOKENS` tokens, temperature 0, and for
    the local model a seed from ``seed_key``. Returns None when the model fails (it cannot be
    built, a timeout of :data:`MODEL_TIMEOUT` seconds, a provider error): then the keywords
    decide (:func:`~agent_network.runtime.triage.decide`). Used by both runners."""
    prompt = classification_prompt(
        config,
        agent_name=agent_name,
        identity=identity,
        request=request,
        sender_name=sender_name,
    )
    settings: ModelSettings = {"max_tokens": CLASSIFY_MAX_TOKENS, "temperature": 0.0}
    if model_name.startswith("local:"):
        settings["seed"] = zlib.crc32(seed_key.encode())
    try:
        model = build_model(model_name)
        with anyio.fail_after(MODEL_TIMEOUT):
            result = await ModelAgent(model, system_prompt=prompt.system).run(
                prompt.user, model_settings=settings
            )
    except Exception as exc:  # the keyword classifier still routes the request
        log.warning("runner.triage_model_failed", agent_name=agent_name, error=repr(exc))
        return None
    return clean_reply(str(result.output), speaker_name=agent_name, other_names=[], max_sentences=2)


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
        # protocol threads: state folded up to the last dispatched envelope (LRU)
        self._states: OrderedDict[str, ThreadState] = OrderedDict()
        # (agent_id, thread_id) -> lock: one agent's turns in one protocol thread, one at a time
        self._turn_locks: dict[tuple[str, str], anyio.Lock] = {}

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
            self._tg = tg
            for _ in range(self._workers):
                tg.start_soon(self._worker)
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
        await self._idle.wait()

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
                and self._tg is not None
                and await self._rows_pending(conn, env.thread_id, wanted)
            ):
                # the thread's rows are written right after its first envelopes: look again
                self._tg.start_soon(self._dispatch_later, env, only_agent, attempt + 1)
                return
            # an agent's triage routine goes first: where it takes a request, it answers it
            rows.sort(key=lambda r: r[4] != "triage")
            for routine_id, agent_id, raw_rule, org_id, preset, config in rows:
                if preset == "triage" and not self._triage_request(env, agent_id, config):
                    continue
                if agent_id in jobs or (agent_id, env.id) in self._queued:
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
        if cap is not None and self._pending_by_agent.get(agent_id, 0) >= cap:
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
            cursors = {(a, t): seq for a, t, seq in await all_cursors(conn)}
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

    # ------------------------------------------------------------------ jobs

    async def _worker(self) -> None:
        async for job in self._recv:
            retry_in: float | None = None
            try:
                retry_in = await self._handle(job)
            except anyio.get_cancelled_exc_class():
                # stopping: the trigger stays unhandled (its cursor does not move), so the next
                # start's catch-up dispatches it again. (Advancing the cursor here — the
                # transaction is shielded — lost triggers whose job was cancelled before its
                # claim was written.)
                raise
            except Exception as exc:  # a job never takes the runner down
                log.exception("runner.job_failed", agent_id=job.agent_id, error=repr(exc))
                await self._audit(job, "routine.failed", f"{type(exc).__name__}: {exc}")
            if retry_in is not None and self._tg is not None:
                # another runner holds the trigger: look again when its lease runs out
                self._tg.start_soon(self._retry_later, job, retry_in)
            else:
                await self._finished(job)

    async def _retry_later(self, job: Job, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(job)

    async def _finished(self, job: Job) -> None:
        async with write_transaction(self.ctx.engine) as conn:
            await advance_cursor(conn, job.agent_id, job.trigger.thread_id, job.trigger.seq)
        self._queued.discard((job.agent_id, job.trigger.id))
        self.jobs_done += 1
        self._pending -= 1
        self._pending_by_agent[job.agent_id] -= 1
        if self._pending == 0:
            self._idle.set()

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

    async def _complete(self, job: Job) -> None:
        async with write_transaction(self.ctx.engine) as conn:
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
                async with self._turn(job):
                    await self._answer(job, key)
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()
        await self._complete(job)  # answered, refused or failed: nobody takes it again
        if error is not None:
            raise error
        return None

    @contextlib.asynccontextmanager
    async def _turn(self, job: Job) -> Any:
        """Hold the (agent, thread) lock of a protocol thread while the job runs (an open
        thread's jobs run freely, as before)."""
        if not (await self.ctx.hub.state(job.trigger.thread_id)).participants:
            yield
            return
        key = (job.agent_id, job.trigger.thread_id)
        lock = self._turn_locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._turn_locks.pop(key, None)

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
        if job.preset == "triage":
            await self._triage(job, key)
            return
        trigger = job.trigger
        checked_at = self.ctx.access_epoch  # before the access check (see _reply)
        async with self.ctx.engine.connect() as conn:
            agent, thread = await _agent_and_thread(conn, job.agent_id, trigger.thread_id)
            if agent is None or thread is None:
                return
            if not await agent_in_thread(conn, agent["id"], thread):
                return  # removed (visa revoked, left, deleted) after the trigger was queued
            refusal = await preflight(self.ctx, self.rules, conn, agent, thread, trigger)
            if refusal is not None:
                if refusal.audit:
                    await self._audit(job, refusal.action, refusal.reason, org_id=agent["org_id"])
                return
            state = await self.ctx.hub.state(trigger.thread_id)
            actor = Actor("agent", agent["id"], agent["org_id"], agent["name"])
            envs = await self.ctx.hub.read(trigger.thread_id)
            if state.participants and any(
                e.type == EV_MESSAGE and e.sender_id == agent["id"] and e.seq > trigger.seq
                for e in envs
            ):
                return  # it spoke after this trigger: that was its turn
            if await self._not_your_turn(job, state, actor):
                return
            history_envs = [
                e
                for e in envs
                if e.type == EV_MESSAGE and e.seq <= trigger.seq and visible_to(agent["id"], e)
            ][-self.ctx.settings.history_limit :]
            names = await sender_names(conn, history_envs)
            notes = await self._protocol_notes(conn, state, agent["id"])
        history = [
            (names[e.sender_id][0], names[e.sender_id][1], str(e.data.get("content", "")))
            for e in history_envs
        ]
        query = history[-1][2] if history else str(thread["title"])
        if trigger.type == EV_MESSAGE:
            query = str(trigger.data.get("content", ""))
        knowledge = await self.knowledge.retrieve(
            agent["org_id"], agent["id"], query, self.ctx.settings.knowledge_chunks
        )
        tools = toolbox_for(state, agent["id"])
        prompt = build_prompt(
            agent_name=agent["name"],
            org_name=agent["org_name"],
            identity=agent["identity"],
            thread_title=thread["title"],
            history=history,
            knowledge=knowledge,
            notes=tools.prompt_lines(),
            situation=notes,
        )
        model_name = resolve_model_name(agent["model"], self.ctx.settings.model)
        deps = RunDeps(  # the agent's secrets reach its tools here only (runtime/tools.py)
            agent_id=agent["id"],
            org_id=agent["org_id"],
            thread_id=trigger.thread_id,
            trigger_id=trigger.id,
            secrets=RunSecrets(
                self.ctx,
                org_id=agent["org_id"],
                agent_id=agent["id"],
                thread_id=trigger.thread_id,
                trigger_id=trigger.id,
            ),
        )
        try:
            answer = await generate_reply(
                model_name=model_name,
                prompt=prompt,
                speaker_name=agent["name"],
                other_names=sorted({n for n, _, _ in history if n != agent["name"]}),
                seed_key=key,
                tools=tools or None,
                model_seed=self.ctx.settings.model_seed,
                deps=deps,
                extra_tools=agent_tools(agent["id"]),
            )
        except AgentNetworkError as err:
            await self._audit(
                job, "routine.failed", f"{err.code}: {err.message}", org_id=agent["org_id"]
            )
            return
        reply = answer.content
        if not reply and passes_turn(state, actor):
            reply = PASS_REPLY  # the protocol waits for this agent: pass rather than stall
            await self._audit(
                job,
                "routine.passed",
                f"the model's reply was empty after cleaning ({REPLY_ATTEMPTS} attempts); "
                "passed the turn",
                org_id=agent["org_id"],
                outcome="accepted",
            )
        if not reply:
            await self._audit(
                job,
                "routine.skipped",
                f"the model's reply was empty after cleaning ({REPLY_ATTEMPTS} attempts)",
                org_id=agent["org_id"],
            )
            return
        checked = await self._checked(job, agent, trigger.thread_id, reply, answer.tool_calls)
        if checked is None:
            return  # refused by the org's egress policy (audited)
        reply = checked.content
        try:
            self.rules.take_rate(agent)
        except RuleViolationError as err:
            await self._audit(
                job, "envelope.message", f"{err.code}: {err.message}", org_id=agent["org_id"]
            )
            return
        now = await self.ctx.hub.state(trigger.thread_id)
        if await self._not_your_turn(job, now, actor):  # the state moved while the model ran
            return
        data: dict[str, Any] = {"content": reply}
        if checked.tool_calls:
            data["tool_calls"] = checked.tool_calls
        await self._reply(trigger, actor, now, data, key, checked_at)

    async def _reply(
        self,
        trigger: Envelope,
        actor: Actor,
        now: ThreadState,
        data: dict[str, Any],
        key: str,
        checked_at: int,
    ) -> Envelope | None:
        """Append the agent's reply to ``trigger`` (``data``, idempotency ``key``) addressed
        like the trigger (:func:`reply_audience`) and return it; None when the hub refused it
        (the hub audited the refusal) or the agent lost access to the thread. ``checked_at`` is
        the access epoch read before the agent's access was checked: if access was removed
        since, the hub refuses the append and the agent's access is checked again."""
        refused = (RunawayBudgetError, ThreadClosedError, NotYourTurnError, ProtocolViolationError)
        for _ in range(ACCESS_RETRIES):
            try:
                with contextlib.suppress(*refused):  # the hub audited the refusal
                    return await self.ctx.hub.append(
                        trigger.thread_id,
                        type=EV_MESSAGE,
                        data=data,
                        sender=actor,
                        audience=reply_audience(
                            trigger.audience,
                            (trigger.sender_kind, trigger.sender_id),
                            actor.id,
                            now.participant_ids,
                        ),
                        causation_id=trigger.id,
                        idempotency_key=key,
                        checked_at=checked_at,
                    )
                return None
            except AccessChangedError:
                checked_at = self.ctx.access_epoch
                if not await self._still_in(actor.id, trigger.thread_id):
                    return None  # removed while it answered: nothing is posted
        return None

    async def _still_in(self, agent_id: str, thread_id: str) -> bool:
        """Whether the agent still takes part in the thread (after access was removed)."""
        async with self.ctx.engine.connect() as conn:
            agent, thread = await _agent_and_thread(conn, agent_id, thread_id)
            return (
                agent is not None
                and thread is not None
                and await agent_in_thread(conn, agent_id, thread)
            )

    # ---------------------------------------------------------------- triage

    async def route_request(self, job: Job, answer: str | None) -> TriageOutcome | None:
        """Route the intake request ``job.trigger`` for the triage routine ``job.routine_id``
        with the classification ``answer`` a remote runner's model gave (None: the model
        failed, the keywords decide) — :meth:`_triage` without the model call, every check
        included. The caller holds the trigger's claim. Returns None when the job stopped
        before routing (see :meth:`_triage`)."""
        return await self._triage(job, reply_key(job.agent_id, job.trigger.id), answer=answer)

    async def _triage(
        self, job: Job, key: str, *, answer: object = CLASSIFY
    ) -> TriageOutcome | None:
        """Route one intake request of a triage routine (see :mod:`agent_network.runtime.triage`).

        Checks as for participate (the routine is still active and watches the thread, the
        agent takes part, :func:`preflight`, may it speak), then: if a forward of this request
        is already stored in one of the route threads (a runner stopped between the forward
        and the reply), only the reply is written, with that forward's label and no model call.
        Otherwise it classifies (:func:`classify_request`, or ``answer`` when given; then
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
        checked_at = self.ctx.access_epoch  # before the access checks (see _reply)
        async with self.ctx.engine.connect() as conn:
            agent, thread = await _agent_and_thread(conn, job.agent_id, trigger.thread_id)
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
                await self._audit(job, "routine.failed", err.message, org_id=agent["org_id"])
                return None
            if trigger.thread_id not in config.intake:
                return None  # reconfigured after the request was queued
            if not await agent_in_thread(conn, agent["id"], thread):
                return None
            refusal = await preflight(self.ctx, self.rules, conn, agent, thread, trigger)
            if refusal is not None:
                if refusal.audit:
                    await self._audit(job, refusal.action, refusal.reason, org_id=agent["org_id"])
                return None
            actor = Actor("agent", agent["id"], agent["org_id"], agent["name"])
            if await self._not_your_turn(job, await self.ctx.hub.state(trigger.thread_id), actor):
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
            elif answer is CLASSIFY:
                answer = await classify_request(
                    model_name=resolve_model_name(agent["model"], self.ctx.settings.model),
                    agent_name=agent["name"],
                    identity=agent["identity"],
                    config=config,
                    request=request,
                    sender_name=sender_name,
                    seed_key=key,
                )
            label, how = decide(config, answer if isinstance(answer, str) else None, request)
            if label is not None:
                forwarded, may_reply = await self._forward(
                    job, agent, actor, config, label, how, thread, sender_name, request
                )
                if forwarded is None and not may_reply:
                    return TriageOutcome(label, None, None)
        delivered = forwarded is not None or label is None
        if forwarded is not None and label is not None:
            async with self.ctx.engine.connect() as conn:
                title = (
                    await conn.execute(
                        select(threads.c.title).where(threads.c.id == forwarded.thread_id)
                    )
                ).scalar()
            content = reply_content(label, str(title or forwarded.thread_id))
        else:
            content = (
                unroutable_content(config.labels)
                if label is None
                else undelivered_content(label)  # the forward was refused (audited)
            )
            try:  # the only post for this request: it counts against the rate
                self.rules.take_rate(agent)
            except RuleViolationError as err:
                await self._audit(
                    job, "envelope.message", f"{err.code}: {err.message}", org_id=agent["org_id"]
                )
                return TriageOutcome(label, forwarded, None)
        posted = await self._egress(job, agent, trigger.thread_id, content)
        if posted is None:
            return TriageOutcome(label, forwarded, None)
        now = await self.ctx.hub.state(trigger.thread_id)
        if await self._not_your_turn(job, now, actor):
            return TriageOutcome(label, forwarded, None)
        data = {
            "content": posted,
            MARKER: marker(
                "reply",
                label=label,
                how=how,
                intake_thread_id=trigger.thread_id,
                request_id=trigger.id,
                delivered=delivered,
            ),
        }
        reply = await self._reply(trigger, actor, now, data, key, checked_at)
        return TriageOutcome(label, forwarded, reply)

    async def _forward(
        self,
        job: Job,
        agent: Any,
        actor: Actor,
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
        checked_at = self.ctx.access_epoch  # before the route's access check (see _reply)
        refusal = await self._route_refusal(agent, label, route_id)
        if refusal is not None:
            await self._audit(job, refusal.action, refusal.reason, org_id=agent["org_id"])
            return None, True
        content = await self._egress(
            job, agent, route_id, forward_content(sender_name, intake["title"], request)
        )
        if content is None:
            return None, True
        try:
            self.rules.take_rate(agent)
        except RuleViolationError as err:
            await self._audit(
                job, "envelope.message", f"{err.code}: {err.message}", org_id=agent["org_id"]
            )
            return None, False
        data = {
            "content": content,
            MARKER: marker(
                "forward",
                label=label,
                how=how,
                intake_thread_id=trigger.thread_id,
                request_id=trigger.id,
            ),
        }
        try:
            forwarded = await self.ctx.hub.append(
                route_id,
                type=EV_MESSAGE,
                data=data,
                sender=actor,
                causation_id=trigger.id,
                idempotency_key=forward_key(agent["id"], trigger.id),
                checked_at=checked_at,
            )
        except (RunawayBudgetError, ThreadClosedError, NotYourTurnError, ProtocolViolationError):
            return None, True  # the hub audited the refusal
        except AccessChangedError:
            return None, True  # access was removed after the route was checked: not forwarded
        return forwarded, True

    async def _route_refusal(self, agent: Any, label: str, thread_id: str) -> Refusal | None:
        """Why the agent may not forward into route ``label``'s thread ``thread_id`` now (it
        is gone, the agent no longer takes part, it is closed, its runaway budget is spent, the
        agent's rule forbids posting there, or its protocol does not let the agent speak), or
        None."""
        where = f"route {label!r} (thread {thread_id!r})"
        async with self.ctx.engine.connect() as conn:
            route = (
                (
                    await conn.execute(
                        select(threads).where(
                            threads.c.id == thread_id, threads.c.deleted_at.is_(None)
                        )
                    )
                )
                .mappings()
                .first()
            )
            if route is None or not await agent_in_thread(conn, agent["id"], route):
                return Refusal("routine.failed", f"{where}: the agent does not take part in it")
            state = await self.ctx.hub.state(thread_id)
            if state.status not in LIVE_STATUSES:
                return Refusal("routine.failed", f"{where}: the thread is {state.status}")
            if state.consecutive_agent >= state.agent_budget:
                return Refusal(
                    "envelope.message",
                    f"{RunawayBudgetError.code}: {where}: budget of {state.agent_budget} "
                    "consecutive agent messages spent; nothing forwarded",
                )
            try:
                await self.rules.check_send(
                    conn,
                    agent,
                    thread_id=thread_id,
                    team_id=route["team_id"],
                    adapter=state.adapter,
                    consume_rate=False,
                )
            except RuleViolationError as err:
                return Refusal("envelope.message", f"{err.code}: {where}: {err.message}")
            if not may_speak(state, Actor("agent", agent["id"], agent["org_id"], agent["name"])):
                return Refusal("routine.skipped", f"{where}: the agent may not speak there now")
        return None

    async def _egress(self, job: Job, agent: Any, thread_id: str, content: str) -> str | None:
        """``content`` after the org's egress policy (:meth:`_checked`), or None when it
        refuses it."""
        checked = await self._checked(job, agent, thread_id, content, None)
        return None if checked is None else checked.content

    async def _checked(
        self,
        job: Job,
        agent: Any,
        thread_id: str,
        content: str,
        tool_calls: list[dict[str, Any]] | None,
    ) -> EgressResult | None:
        """A message (``content`` and ``tool_calls``) after the org's egress policy for
        ``thread_id`` — its rules and its defaults: the org's own stored secrets, common key
        formats (services/policy.py :func:`check_outgoing`) — with redactions audited, or None
        when the policy refuses it (audited as ``egress.refused``). Audit records name rules,
        secrets and spans, never the text."""
        try:
            result = await check_outgoing(
                self.ctx, agent["org_id"], thread_id, content, tool_calls or None
            )
        except EgressRefusedError as err:
            await self._audit(
                job,
                "egress.refused",
                ", ".join(err.rules),
                org_id=agent["org_id"],
                data={"rules": err.rules, **matches_data(err.matches)},
            )
            return None
        if result.redacted:
            await self._audit(
                job,
                "egress.redacted",
                ", ".join(result.redacted),
                org_id=agent["org_id"],
                outcome="accepted",
                data={"rules": result.redacted, **result.audit_data()},
            )
        return result

    async def _protocol_notes(self, conn: Any, state: ThreadState, agent_id: str) -> list[str]:
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

    async def _not_your_turn(self, job: Job, state: ThreadState, actor: Actor) -> bool:
        """Whether the agent may NOT speak now (the hub's own rules, via :func:`admit` without
        writing). A refusal is audited while the thread is live: a spent budget as
        ``envelope.message`` with ``agent_budget_exhausted`` (as the hub would), anything else
        as ``routine.skipped`` with the adapter's reason (``not_your_turn: ...``); a closing,
        closed or not yet active thread is not audited."""
        trigger = job.trigger
        answers = person_message(trigger.type, trigger.sender_kind)  # see budget_spent
        if may_speak(state, actor, answers_person=answers):
            return False
        try:
            admit(
                state,
                Proposal(type=EV_MESSAGE, data={"content": ""}, sender=actor),
                answers_person=answers,
            )
        except AgentNetworkError as err:
            if state.status in LIVE_STATUSES:
                action = (
                    "envelope.message" if isinstance(err, RunawayBudgetError) else "routine.skipped"
                )
                reason = f"{err.code}: {err.message}; no reply posted"
                await self._audit(job, action, reason, org_id=actor.org_id)
        return True

    async def _audit(
        self,
        job: Job,
        action: str,
        reason: str,
        *,
        org_id: str | None = None,
        outcome: str = "refused",
        data: dict[str, Any] | None = None,
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
            data={"trigger_id": job.trigger.id, "routine_id": job.routine_id, **(data or {})},
        )
        async with write_transaction(self.ctx.engine) as conn:
            await insert_audit(conn, [row])


async def _agent_and_thread(
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
