"""Calling an agent's model: the cleaned reply to a prompt (:func:`generate_reply`) and a triage
classification (:func:`classify_request`), used by the runner engine for both runners. Design:
docs/architecture.md, "Runners: one engine, two ports".
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from pydantic_ai import Agent as ModelAgent
from pydantic_ai import Tool
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.settings import ModelSettings

from agent_network.runtime.cleaning import (
    clean_reply,
    drop_defective_sentences,
    drop_echoes,
    reply_defects,
)
from agent_network.runtime.models import build_model
from agent_network.runtime.prompt import Prompt
from agent_network.runtime.thread_view import ToolBox
from agent_network.runtime.tools import RunDeps
from agent_network.runtime.triage import TriageConfig, classification_prompt

log = structlog.get_logger(__name__)

__all__ = ["Reply", "classify_request", "generate_reply", "local_seed"]

MODEL_TIMEOUT = 300.0  # seconds for one model call
REPLY_ATTEMPTS = 3  # model calls per trigger while the cleaned reply is empty or defective
REPLY_MAX_TOKENS = 200
RETRY_TEMPERATURE = 0.7  # the local model's temperature from the third attempt on
REPLY_MAX_SENTENCES = 3
CLASSIFY_MAX_TOKENS = 16  # tokens of a triage model's answer (a label)


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
