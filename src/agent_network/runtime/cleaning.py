"""Cleaning of replies written by a small model: the one place where that happens.

A small model (the bundled SmolLM2-135M in particular) rarely stops where a person would. It
prefixes its reply with its own name, goes on to speak as the other participants of the thread,
leaks chat-template tokens, wraps the reply in quotes, repeats the transcript format of its prompt
and rambles. :func:`clean_reply` turns such raw output into the text that is posted, or into
``""`` when nothing worth posting is left.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

__all__ = ["MAX_REPLY_CHARS", "clean_reply"]

MAX_REPLY_CHARS = 800
"""Longest reply :func:`clean_reply` returns, in characters."""

# Role words a chat transcript uses for a turn ("User: ...", "Assistant: ...").
_ROLE_WORDS = ("user", "assistant", "system", "human")

# `<|im_start|>` opens a new turn, `<|im_end|>` / `<|endoftext|>` / `</s>` close the reply:
# everything from the first of them on is another turn or noise.
_TURN_BOUNDARY_TOKEN = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|</s>", re.IGNORECASE
)
# Any other chat-template token (`<|assistant|>`, `<s>`...) is dropped where it stands.
_TEMPLATE_TOKEN = re.compile(r"<\|[^|<>\n]{0,40}\|>|<s>", re.IGNORECASE)

# Decoration allowed in front of a turn marker: indentation, quotes, bold/italic marks, bullets.
_DECORATION = r"[ \t\"'“”\u2018\u2019«»*_>\-]*"
# Where a turn can start: at the beginning of a line, or after the end of a sentence on the same
# line (the sentence's closing quote or bracket stays with it).
_TURN_START = r"(?:^|(?<=[.!?…])[\"'”\u2019)\]]*[ \t]+)"
# A label "[Anyone @ Anywhere]:" or "[Anyone]:", the transcript format of the prompts.
_BRACKET_LABEL = r"\[[^\[\]\n]{1,80}\][ \t]*:"
_BOLD = r"[*_]{0,3}"  # bold or italic marks
_ROLE_LABEL = (
    _BOLD
    + r"(?:" + "|".join(_ROLE_WORDS) + r")"
    + _BOLD
    + r"(?:[ \t]*\([^()\n]{1,80}\))?"  # "User (Acme):"
    + _BOLD + r"[ \t]*:" + _BOLD
)  # fmt: skip
_ASSISTANT_LABEL = _BOLD + r"assistant" + _BOLD + r"[ \t]*:" + _BOLD
_HEADING = r"\#{3,}"

_OPEN_TO_CLOSE_QUOTE = {
    '"': '"',
    "“": "”",
    "„": "“",
    "«": "»",
    "'": "'",
    "\u2018": "\u2019",
    "`": "`",
}
_DOUBLE_QUOTES = '"“”„«»'

_SENTENCE_END = re.compile(r"[.!?…][\"'”\u2019)\]]*(?=\s|$)")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s+")
_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_MEANINGFUL = re.compile(r"[^\W_]")
# Below this many characters a sentence boundary is too early to cut at: cut at a word instead.
_MIN_SENTENCE_CUT = MAX_REPLY_CHARS // 4


def clean_reply(
    text: str,
    *,
    speaker_name: str,
    other_names: Sequence[str] = (),
    max_sentences: int | None = None,
) -> str:
    """Clean a raw model reply into the text to post, applying these rules in order.

    1. **Chat-template tokens.** A leading ``<|im_start|>assistant`` (or ``<|im_start|>`` plus the
       speaker's own name) header is removed. From the first remaining ``<|im_start|>``,
       ``<|im_end|>``, ``<|endoftext|>`` or ``</s>`` on, everything is cut (another turn, or noise
       after the end of this one). Any other ``<|...|>`` or ``<s>`` token is dropped.
    2. **Own-name prefix.** A leading label of the speaker's own name is removed: ``Name:``,
       ``Name (Org):``, ``Name @ Org:``, ``[Name @ Org]:``, ``**Name**:`` (case-insensitive), and
       likewise a leading ``Assistant:``.
    3. **Other turns.** Everything is cut from the first place where a turn starts: at the
       beginning of a line (after indentation, quotes, ``*``/``-`` decoration), or mid-line
       right after a sentence end (``. ! ? …``), a label of any name in ``other_names`` (same
       forms as in rule 2, case-insensitive), of the speaker's own name (the model starting a new
       turn of its own), a role marker (``User:``, ``Assistant:``, ``System:``, ``Human:``, also
       with an ``(Org)``), a bracketed transcript label (``[Anyone @ Org]:``, ``[Anyone]:``), or
       a ``###`` heading. A name that is merely mentioned ("I told Alex Rivera: ..."
       mid-sentence) is kept.
    4. **Layout.** Trailing spaces are removed from lines; a line, or a sentence, that repeats an
       earlier one (ignoring case and spacing) is dropped, since a looping model says the same
       thing again; runs of blank lines collapse to one blank line and the whole text is stripped.
    5. **Quotes.** Quotes around the whole reply are removed (``"..."``, ``“...”``, ``'...'``,
       ``«...»``, backticks), and so is a lone double quote left at either end without a partner.
    6. **Length.** A reply longer than :data:`MAX_REPLY_CHARS` (800) characters is cut at the last
       sentence end that fits; if that would keep less than a quarter of it, at the last word
       that fits, followed by ``…``. The result is never longer than the cap.
    7. **Nothing left.** If no letter or digit remains, the result is ``""``: the caller then posts
       nothing.
    8. **Brevity** (only with ``max_sentences``). A leading salutation line ("Hi Alex,",
       "Dear team,", a line holding only a participant's name) and pleasantry sentences ("I hope
       you're doing well.") are dropped, the reply is joined into one paragraph, an unfinished
       last sentence is dropped when a finished one precedes it, and at most ``max_sentences``
       sentences are kept.

    The rules are applied again until the text no longer changes, so
    ``clean_reply(clean_reply(x, ...), ...) == clean_reply(x, ...)``.

    Args:
        text: The raw text the model produced.
        speaker_name: The display name of the agent that wrote the reply.
        other_names: Display names of the other participants (people and agents) of the thread.
        max_sentences: Keep at most this many sentences (rule 8); ``None`` keeps them all.

    Returns:
        The cleaned reply, at most :data:`MAX_REPLY_CHARS` characters, or ``""``.

    Raises:
        Nothing: any string is accepted.
    """
    template_header, own_prefix, turn_marker = _patterns(speaker_name, tuple(other_names))

    current = text
    # A pass that changes the text shortens it (bar turning a lone "\r" into "\n"), so this
    # reaches a fixed point, in practice within two or three passes; the bound is a safety net.
    for _ in range(len(text) + 2):
        cleaned = _clean_once(current, template_header, own_prefix, turn_marker)
        if max_sentences is not None:
            cleaned = _brief(cleaned, max_sentences, (speaker_name, *other_names))
        if cleaned == current:
            break
        current = cleaned
    return current


@functools.lru_cache(maxsize=256)
def _patterns(
    speaker_name: str, other_names: tuple[str, ...]
) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """The compiled template-header, own-prefix and turn-marker patterns for these names."""
    own = _name_label(speaker_name)
    others = [_name_label(name) for name in other_names if name.strip()]
    own_labels = [own, _ASSISTANT_LABEL] if own else [_ASSISTANT_LABEL]
    own_prefix = re.compile(
        r"\A" + _DECORATION + r"(?:" + "|".join(own_labels) + r")", re.IGNORECASE
    )
    header_names = [
        r"assistant",
        *([re.escape(speaker_name.strip())] if speaker_name.strip() else []),
    ]
    template_header = re.compile(
        r"\A\s*<\|im_start\|>[ \t]*(?:" + "|".join(header_names) + r")[ \t]*:?[ \t]*\n?",
        re.IGNORECASE,
    )
    markers = [*others, *([own] if own else []), _ROLE_LABEL, _BRACKET_LABEL, _HEADING]
    turn_marker = re.compile(
        _TURN_START + r"(?P<marker>" + _DECORATION + r"(?:" + "|".join(markers) + r"))",
        re.IGNORECASE | re.MULTILINE,
    )

    return template_header, own_prefix, turn_marker


def _name_label(name: str) -> str:
    """Regex for a turn label of ``name``: ``Name:``, ``Name (Org):``, ``[Name @ Org]:``..."""
    words = name.split()
    if not words:
        return ""
    escaped = r"[ \t]+".join(re.escape(word) for word in words)
    bold = _BOLD
    return (
        r"\[?" + bold + escaped + bold
        + r"(?:[ \t]*@[ \t]*[^\]\[:\n]{1,80})?"  # "@ Org"
        + r"[ \t]*\]?"
        + r"(?:[ \t]*\([^()\n]{1,80}\))?"  # "(Org)"
        + bold + r"[ \t]*:" + bold
    )  # fmt: skip


def _clean_once(
    text: str,
    template_header: re.Pattern[str],
    own_prefix: re.Pattern[str],
    turn_marker: re.Pattern[str],
) -> str:
    """One pass of the rules documented on :func:`clean_reply`."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    # 1. Chat-template tokens.
    text = template_header.sub("", text, count=1)
    boundary = _TURN_BOUNDARY_TOKEN.search(text)
    if boundary:
        text = text[: boundary.start()]
    text = _TEMPLATE_TOKEN.sub("", text)

    # 2. Own-name (or "Assistant:") prefix, possibly repeated.
    while True:
        match = own_prefix.match(text)
        if not match:
            break
        text = text[match.end() :]

    # 3. Cut at the first turn of someone else (or a new turn of the speaker's own).
    match = turn_marker.search(text)
    if match:
        text = text[: match.start("marker")]

    # 4. Layout.
    text = _TRAILING_SPACE.sub("", text)
    text = _drop_repeats(text)
    text = _BLANK_LINES.sub("\n\n", text).strip()

    # 5. Quotes.
    text = _strip_quotes(text)

    # 6. Length.
    if len(text) > MAX_REPLY_CHARS:
        text = _truncate(text)

    # 7. Nothing left.
    if not _MEANINGFUL.search(text):
        return ""
    return text


def _drop_repeats(text: str) -> str:
    """Drop each line, and each sentence within a line, that repeats an earlier one."""
    seen_lines: set[str] = set()
    seen_sentences: set[str] = set()
    kept: list[str] = []
    for line in text.split("\n"):
        key = " ".join(line.split()).casefold()
        if not key:
            kept.append("")
            continue
        if key in seen_lines:
            continue
        seen_lines.add(key)
        sentences: list[str] = []
        for sentence in _SENTENCE_SPLIT.split(line.strip()):
            sentence_key = " ".join(sentence.split()).casefold()
            if sentence_key in seen_sentences:
                continue
            seen_sentences.add(sentence_key)
            sentences.append(sentence)
        if sentences:
            indent = line[: len(line) - len(line.lstrip())]
            kept.append(indent + " ".join(sentences))
    return "\n".join(kept)


def _strip_quotes(text: str) -> str:
    if len(text) >= 2 and _OPEN_TO_CLOSE_QUOTE.get(text[0]) == text[-1]:
        inner = text[1:-1]
        # Only when the quotes enclose the whole reply, not '"A" and "B"'.
        if text[0] not in inner and text[-1] not in inner:
            return inner.strip()
    if text and text[0] in _DOUBLE_QUOTES and not any(q in text[1:] for q in _DOUBLE_QUOTES):
        return text[1:].strip()
    if text and text[-1] in _DOUBLE_QUOTES and not any(q in text[:-1] for q in _DOUBLE_QUOTES):
        return text[:-1].strip()
    return text


def _truncate(text: str) -> str:
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= MAX_REPLY_CHARS]
    if ends and ends[-1] >= _MIN_SENTENCE_CUT:
        return text[: ends[-1]].rstrip()
    head = text[: MAX_REPLY_CHARS - 1]
    space = max(head.rfind(" "), head.rfind("\n"))
    if space >= _MIN_SENTENCE_CUT:
        head = head[:space]
    return head.rstrip() + "…"


_SALUTATION = re.compile(
    r"\A(?:hi|hello|hey|dear|greetings|good (?:morning|afternoon|evening))\b[^\n.!?]{0,60}[,!:]?"
    r"[ \t]*(?:\n|\Z)",
    re.IGNORECASE,
)


# Pleasantries that carry nothing ("I hope you're doing well.", "I hope this finds you well.").
_FILLER = re.compile(
    r"\A(?:i hope (?:you(?:'re| are)|this (?:message |email )?finds you)[^.!?]{0,40}well"
    r"|thanks? (?:you )?for (?:your|the) (?:message|update|note))[^.!?]*[.!?]\Z",
    re.IGNORECASE,
)


def _brief(text: str, max_sentences: int, names: Sequence[str]) -> str:
    """Rule 8: drop a salutation or name-only first line, keep the first sentences."""
    text = _SALUTATION.sub("", text, count=1).lstrip()
    first, _, rest = text.partition("\n")
    bare = first.strip(" \t*_:,.-\"'")
    is_name_line = any(
        bare.lower().startswith(n.lower()) and len(bare) <= len(n) + 30 for n in names
    )
    if rest and is_name_line and not _SENTENCE_END.search(first):
        text = rest.lstrip()
    flat = " ".join(text.split())
    sentences = [s for s in _SENTENCE_SPLIT.split(flat) if not _FILLER.match(s)]
    if not sentences:
        return ""
    if len(sentences) > 1 and not _SENTENCE_END.search(sentences[-1]):
        sentences = sentences[:-1]
    return " ".join(sentences[:max_sentences]).strip()
