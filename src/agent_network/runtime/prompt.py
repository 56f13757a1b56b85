"""Prompt assembly for the ``participate`` routine: identity, visible history, own knowledge.

What an agent may see is decided here and only here: its own identity, the message envelopes of
the thread it answers in (as the runner passes them), and chunks of its own org's knowledge
(org-wide and its own). Nothing of another org except what that org posted into the shared thread.

The layout is deliberately plain so that a 135M-parameter model can follow it: the message to
answer is the user turn itself, followed by one short ask; who the agent is, the few earlier
messages and what it knows go into the system prompt; and the knowledge is reduced to the
handful of sentences that best fit the message (:func:`select_notes`) instead of whole documents,
the best of which the ask tells the agent to start with. Measured with ``bench/replies.py``: the
bundled model continues a transcript (``Name (Org): ...``) placed in the user turn as the turn of
someone else, and copies a quoted fact placed last in the ask far more often than one in a list
of notes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from agent_network.knowledge.chunking import fts_query

MAX_NOTES_CHARS = 320
MAX_NOTES = 2
CONTEXT_LINES = 4
SAID_SHARE = 0.6  # share of a note's words found in one earlier message: said already

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
_PARENTHETICAL = re.compile(r"\([^()]*\)")


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a model is asked: ``system`` (who the agent is, the earlier messages, what it knows)
    and ``user`` (the message to answer and the ask).

    The other fields tell the reply's cleaning (:func:`~agent_network.runtime.runner.
    generate_reply`) what the model could copy instead of answering, and who else is there:
    ``echo_sources``, the messages of the others already in the thread (a reply sentence
    repeating one of their sentences is dropped); ``echo_phrases``, the prompt's own
    instructions (removed where a reply repeats them); ``org_name``, the agent's org;
    ``other_orgs``, the orgs of the other participants whose messages are in the prompt (a
    reply claiming to be of one of them is defective);
    ``retry``, a plainer prompt for the next attempt after a reply came out empty or defective
    (it may have a ``retry`` of its own, for the attempt after that).
    All default to empty, for prompts that are not replies in a thread.
    """

    system: str
    user: str
    echo_sources: tuple[str, ...] = ()
    echo_phrases: tuple[str, ...] = ()
    org_name: str = ""
    other_orgs: tuple[str, ...] = ()
    retry: Prompt | None = None


def transcript_line(name: str, org_name: str, content: str) -> str:
    """One line of context: ``Name (Org): content`` on a single line."""
    return f"{name} ({org_name}): {' '.join(content.split())}"


def select_notes(
    chunks: Sequence[dict[str, Any]],
    query: str,
    *,
    max_chars: int = MAX_NOTES_CHARS,
    said: Sequence[str] = (),
) -> str:
    """The sentences of ``chunks`` that best fit ``query``, best first, within ``max_chars``.

    Lines are split into sentences; sentences of fewer than 6 or more than 45 words (headings,
    metadata, tables) are skipped, as are headings, table rows and ``**Field:**`` lines. Each
    sentence scores 1 per query word it shares and 2 per status/risk word (blocker, risk,
    unresolved, recommend, …): in a working thread the open problems are what a colleague passes
    on. A sentence sharing no query word comes after every one that does; the index's chunk
    order breaks ties. A sentence already said in the thread is skipped:
    at least :data:`SAID_SHARE` of its words (3+ letters) are in one of the texts of ``said``.
    Markdown markup is stripped. Returns "" when there is nothing to say.
    """
    return " ".join(rank_notes(chunks, query, max_chars=max_chars, said=said))


def rank_notes(
    chunks: Sequence[dict[str, Any]],
    query: str,
    *,
    max_chars: int = MAX_NOTES_CHARS,
    said: Sequence[str] = (),
) -> list[str]:
    """The sentences :func:`select_notes` joins, as a list (best first), each ending with
    ``.``, ``!`` or ``?``; ``[]`` when there is nothing to say."""
    query_words = {w.strip('"') for w in fts_query(query).split(" OR ") if w}
    said_words = [_long_words(text) for text in said]
    scored: list[tuple[bool, int, int, str]] = []
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
            if _already_said(sentence, said_words):
                continue
            words = set(words_list)
            shared = len(words & query_words)
            score = shared + 2 * len(words & _SALIENT)
            scored.append((shared == 0, -score, order, sentence))
            order += 1
    scored.sort()
    picked: list[str] = []
    used = 0
    for _, _, _, sentence in scored[:MAX_NOTES]:
        if used + len(sentence) > max_chars:
            continue
        picked.append(sentence if sentence.endswith((".", "!", "?")) else sentence + ".")
        used += len(sentence) + 1
    return picked


def _long_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3}


def _already_said(sentence: str, said_words: Sequence[set[str]]) -> bool:
    words = _long_words(sentence)
    return bool(words) and any(len(words & said) >= SAID_SHARE * len(words) for said in said_words)


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


def display_name(name: str) -> str:
    """``name`` without parenthetical remarks: ``"Alex Rivera (project lead)"`` ->
    ``"Alex Rivera"`` (unchanged when nothing is left)."""
    bare = " ".join(_PARENTHETICAL.sub(" ", name).split())
    return bare or name.strip()


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

    Layout of a reply prompt: the system prompt says who the agent is (name, org, ``identity``,
    ``situation``), the last :data:`CONTEXT_LINES` earlier messages as prose (``Earlier in the
    thread "T": Alex Rivera of Acme wrote "..."``) and ``What you know:`` with the notes of
    :func:`select_notes` (sentences already said in the thread skipped). The user turn is the
    message itself, then ``notes``, then the ask: ``Reply to <name> of <org> in 1-2
    sentences.`` plus, when there are notes, ``Start with this fact: "<best note>"``. Names are
    shown without parenthetical remarks (:func:`display_name`). Who wrote the message is said
    only in the ask: named in the system prompt, the bundled model starts its reply with that
    name as a label (measured). The ``retry`` prompt moves the message into the system prompt
    (``The message you reply to: "..."``), leaving the notes and the ask in the user turn, and
    its own ``retry`` leaves the message and the name of its sender out (``Write your reply in
    1-2 sentences.`` and the fact): the bundled model often just repeats a short message,
    wherever in the prompt it stands, and starts with the sender's name as a label (measured).

    Returns the :class:`Prompt` with ``echo_sources`` (the contents of ``history`` not written
    by ``agent_name``: an agent may restate its own point, not pass off another's),
    ``echo_phrases`` (the ask's instructions), ``org_name`` and ``other_orgs`` (the orgs of
    ``history``'s speakers other than ``org_name``) set.
    """
    system = f"You are {agent_name}, an AI agent working for {org_name}."
    if identity.strip():
        system += " " + " ".join(identity.split())
    if situation:
        system += " " + " ".join(" ".join(line.split()) for line in situation)
    said = tuple(content for _, _, content in history)
    other_orgs = tuple(sorted({org for _, org, _ in history if org and org != org_name}))
    parts: list[str] = []
    if not history:
        parts.append(f'You open the thread "{thread_title}".')
        notes_text = select_notes(knowledge, thread_title)
        if notes_text:
            parts.append(f"What you know: {notes_text}")
        parts.extend(notes)
        parts.append(f'Write the first message of "{thread_title}" (1-2 sentences).')
        return Prompt(
            system=system,
            user="\n".join(parts),
            echo_phrases=(f'Write the first message of "{thread_title}"', "What you know:"),
            org_name=org_name,
        )
    speaker, speaker_org, content = history[-1]
    earlier = history[:-1][-CONTEXT_LINES:]
    if earlier:
        system += f' Earlier in the thread "{thread_title}": ' + " ".join(
            f'{display_name(name)} of {org} wrote "{_flat(text)}".' for name, org, text in earlier
        )
    picked = rank_notes(knowledge, content, said=said)
    if picked:
        system += " What you know: " + " ".join(picked)
    addressee = display_name(speaker)
    of_org = f" of {speaker_org}" if speaker_org.strip() else ""
    reply_to = f"Reply to {addressee}{of_org} in 1-2 sentences."
    fact = f' Start with this fact: "{picked[0]}"' if picked else ""
    ask = reply_to + fact
    tools = ["\n".join(notes)] if notes else []
    phrases = (
        reply_to,
        "in 1-2 sentences",
        "Start with this fact:",
        "What you know:",
        "The message you reply to:",
        "Write your reply",
    )
    without_message = Prompt(
        system=system,
        user="\n\n".join([*tools, "Write your reply in 1-2 sentences." + fact]),
        echo_sources=tuple(text for name, _, text in history if name != agent_name),
        echo_phrases=phrases,
        org_name=org_name,
        other_orgs=other_orgs,
    )
    in_system = replace(
        without_message,
        system=f'{system} The message you reply to: "{_flat(content)}"',
        user="\n\n".join([*tools, ask]),
        retry=without_message,
    )
    return replace(
        without_message, user="\n\n".join([_flat(content), *tools, ask]), retry=in_system
    )


def _flat(text: str) -> str:
    return " ".join(text.split())
