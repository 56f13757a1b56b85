"""Prompt assembly for the ``participate`` routine: identity, visible history, own knowledge.

What an agent may see is decided here and only here: its own identity, the message envelopes of
the thread it answers in (as the runner passes them), and chunks of its own org's knowledge
(org-wide and its own). Nothing of another org except what that org posted into the shared thread.

The layout is deliberately plain so that a 135M-parameter model can follow it: the message to
answer is quoted, a few earlier lines give context, and the knowledge is reduced to the handful of
sentences that best fit the message (:func:`select_notes`) instead of whole documents.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent_network.knowledge.chunking import fts_query

MAX_NOTES_CHARS = 320
MAX_NOTES = 2
CONTEXT_LINES = 4

# Words that mark a sentence as a status, risk or decision (what a colleague would pass on).
_SALIENT_WORDS = (
    "blocker blocked blocking risk risks unresolved issue issues open pending recommend "
    "recommended must cannot not delay delayed fail failed failure problem remaining before "
    "validate validated validation status"
)
_SALIENT = frozenset(_SALIENT_WORDS.split())
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9*`(])")
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
_MARKUP = re.compile(r"[#*`|>_]+")


@dataclass(frozen=True, slots=True)
class Prompt:
    """``system`` (who the agent is) and ``user`` (the message, context, notes and the ask)."""

    system: str
    user: str


def transcript_line(name: str, org_name: str, content: str) -> str:
    """One line of context: ``Name (Org): content`` on a single line."""
    return f"{name} ({org_name}): {' '.join(content.split())}"


def select_notes(
    chunks: Sequence[dict[str, Any]], query: str, *, max_chars: int = MAX_NOTES_CHARS
) -> str:
    """The sentences of ``chunks`` that best fit ``query``, best first, within ``max_chars``.

    Lines are split into sentences; sentences of fewer than 6 or more than 45 words (headings,
    metadata, tables) are skipped, as are headings, table rows and ``**Field:**`` lines. Each
    sentence scores 1 per query word it shares and 2 per status/risk word (blocker, risk,
    unresolved, recommend, …): in a working thread the open problems are what a colleague passes
    on. The index's chunk order breaks ties. Markdown markup is stripped. Returns "" when there
    is nothing to say.
    """
    query_words = {w.strip('"') for w in fts_query(query).split(" OR ") if w}
    scored: list[tuple[int, int, str]] = []
    order = 0
    for chunk in chunks:
        text = "\n".join(
            line
            for line in str(chunk.get("text", "")).splitlines()
            if not line.lstrip().startswith(("#", "|", "**"))
        )
        lines = _paragraphs(_MARKUP.sub(" ", text))
        for raw in (s for line in lines for s in _SENTENCE.split(line)):
            sentence = raw.strip(" -:")
            words_list = _WORD.findall(sentence.lower())
            if not 6 <= len(words_list) <= 45:
                continue
            words = set(words_list)
            score = len(words & query_words) + 2 * len(words & _SALIENT)
            scored.append((-score, order, sentence))
            order += 1
    scored.sort()
    picked: list[str] = []
    used = 0
    for _, _, sentence in scored[:MAX_NOTES]:
        if used + len(sentence) > max_chars:
            continue
        picked.append(sentence if sentence.endswith((".", "!", "?")) else sentence + ".")
        used += len(sentence) + 1
    return " ".join(picked)


def _paragraphs(text: str) -> list[str]:
    """Lines joined into paragraphs: a line continues the previous one unless blank, a list item
    or a table row starts it."""
    out: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("-", "+", "1.", "2.", "3.", "4.", "5.")):
            if current:
                out.append(" ".join(current))
            current = [stripped.lstrip("-+0123456789. ")] if stripped else []
        else:
            current.append(stripped)
    if current:
        out.append(" ".join(current))
    return [" ".join(p.split()) for p in out if p.strip()]


def build_prompt(
    *,
    agent_name: str,
    org_name: str,
    identity: str,
    thread_title: str,
    history: Sequence[tuple[str, str, str]],
    knowledge: Sequence[dict[str, Any]],
    notes: Sequence[str] = (),
    situation: Sequence[str] = (),
) -> Prompt:
    """Build the prompt for ``agent_name`` answering the last entry of ``history``.

    ``history`` holds ``(speaker name, speaker org name, content)``, oldest first, ending with the
    message to answer; empty when the agent opens the thread (its turn came from the thread
    becoming active, not from a message): then it is asked for the thread's first message.
    ``knowledge`` holds chunks from :meth:`KnowledgeService.retrieve`; ``notes`` are
    instructions placed right before the ask (a workflow's tools as tags); ``situation`` lines
    describe the thread's protocol (adapter, the others, whose turn, a workflow's context) and
    go into the system prompt, not next to the ask: the bundled 135M model repeats a sentence
    placed there instead of answering (measured on ``examples/protocols/workflow.py``).
    """
    system = f"You are {agent_name}, an AI agent working for {org_name}."
    if identity.strip():
        system += " " + " ".join(identity.split())
    if situation:
        system += " " + " ".join(" ".join(line.split()) for line in situation)
    parts: list[str] = []
    if not history:
        parts.append(f'You open the thread "{thread_title}".')
        notes_text = select_notes(knowledge, thread_title)
        if notes_text:
            parts.append(f"What you know: {notes_text}")
        parts.extend(notes)
        parts.append(f'Write the first message of "{thread_title}" (1-2 sentences).')
        return Prompt(system=system, user="\n".join(parts))
    speaker, speaker_org, content = history[-1]
    earlier = history[:-1][-CONTEXT_LINES:]
    if earlier:
        parts.append(
            f'Earlier in "{thread_title}":\n' + "\n".join(transcript_line(*h) for h in earlier)
        )
    parts.append(f'Message from {speaker} of {speaker_org}: "{" ".join(content.split())}"')
    notes_text = select_notes(knowledge, content)
    if notes_text:
        parts.append(f"What you know: {notes_text}")
        ask = f"Write your reply to {speaker} (1-2 sentences) that tells them what you know."
    else:
        ask = f"Write your reply to {speaker} (1-2 sentences)."
    parts.extend(notes)
    parts.append(ask)
    return Prompt(system=system, user="\n".join(parts))
