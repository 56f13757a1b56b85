"""Prompt assembly for the ``participate`` routine: identity, visible history, own knowledge.

What an agent may see is decided here and only here: its own identity, the message envelopes of
the thread it answers in, and chunks of its own org's knowledge (org-wide and its own). Nothing
of another org except what that org posted into the shared thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_CHUNK_CHARS = 600


@dataclass(frozen=True, slots=True)
class Prompt:
    """``system`` (instructions) and ``user`` (the transcript and the ask) for one model call."""

    system: str
    user: str


def transcript_line(name: str, org_name: str, content: str) -> str:
    """One line of the transcript: ``Name (Org): content``."""
    return f"{name} ({org_name}): {content.strip()}"


def build_prompt(
    *,
    agent_name: str,
    org_name: str,
    identity: str,
    thread_title: str,
    history: Sequence[tuple[str, str, str]],
    knowledge: Sequence[dict[str, Any]],
) -> Prompt:
    """Build the prompt for ``agent_name`` answering the last line of ``history``.

    ``history`` holds ``(speaker name, speaker org name, content)`` oldest first; ``knowledge``
    holds chunks from :meth:`KnowledgeService.retrieve` (``document`` and ``text`` keys).
    """
    parts = [f"You are {agent_name}, an AI agent working for {org_name}."]
    if identity.strip():
        parts.append(identity.strip())
    parts.append(f'You are taking part in the shared thread "{thread_title}".')
    if knowledge:
        notes = "\n".join(
            f"- ({k['document']}) {_squash(k['text'])[:MAX_CHUNK_CHARS]}" for k in knowledge
        )
        parts.append(f"Facts from {org_name}'s own notes:\n{notes}")
    parts.append(
        f"Write only {agent_name}'s next message: one to three short sentences, useful and "
        "specific. Do not write lines for anyone else and do not repeat the conversation."
    )
    lines = "\n".join(transcript_line(*h) for h in history)
    user = f"Conversation so far:\n{lines}\n\nWrite {agent_name}'s reply now."
    return Prompt(system="\n\n".join(parts), user=user)


def _squash(text: str) -> str:
    return " ".join(text.split())
