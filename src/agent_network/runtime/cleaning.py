"""Cleaning of replies written by a small model: the one place where that happens.

A small model (the bundled SmolLM2-135M in particular) rarely stops where a person would. It
prefixes its reply with its own name, goes on to speak as the other participants of the thread,
leaks chat-template tokens, wraps the reply in quotes, repeats the transcript format of its prompt
and rambles; it writes template placeholders (``[Customer Name]``), claims to be another
participant ("I'm Alex Rivera") and copies its prompt. :func:`clean_reply` turns such raw output
into the text that is posted, or into ``""`` when nothing worth posting is left;
:func:`drop_echoes` removes what it copied from its prompt; :func:`reply_defects` finds what
still makes a cleaned reply unfit to post (so that the caller samples again), and
:func:`drop_defective_sentences` is the last resort that removes it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

__all__ = [
    "MAX_REPLY_CHARS",
    "clean_reply",
    "drop_defective_sentences",
    "drop_echoes",
    "name_forms",
    "reply_defects",
]

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
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[\W_]+")
_PARENTHETICAL = re.compile(r"\([^()]*\)")
# Last words of a name that make it a role or an agent rather than a person ("Delivery Agent").
_ROLE_NOUNS = frozenset(
    ("agent", "agents", "bot", "assistant", "ai", "team", "lead", "manager", "desk", "support")
)
# Below this many characters a sentence boundary is too early to cut at: cut at a word instead.
_MIN_SENTENCE_CUT = MAX_REPLY_CHARS // 4


def clean_reply(
    text: str,
    *,
    speaker_name: str,
    other_names: Sequence[str] = (),
    max_sentences: int | None = None,
    org_names: Sequence[str] = (),
) -> str:
    """Clean a raw model reply into the text to post, applying these rules in order.

    A *name* below is a participant's display name or its :func:`name_forms` (without a
    parenthetical remark: ``Alex Rivera (project lead)`` -> ``Alex Rivera``).

    1. **Chat-template tokens.** A leading ``<|im_start|>assistant`` (or ``<|im_start|>`` plus the
       speaker's own name) header is removed. From the first remaining ``<|im_start|>``,
       ``<|im_end|>``, ``<|endoftext|>`` or ``</s>`` on, everything is cut (another turn, or noise
       after the end of this one). Any other ``<|...|>`` or ``<s>`` token is dropped.
    2. **Own-name prefix.** A leading label of the speaker's own name is removed: ``Name:``,
       ``Name (Org):``, ``Name @ Org:``, ``Name of Org:``, ``[Name @ Org]:``, ``**Name**:``
       (case-insensitive), and likewise a leading ``Assistant:``.
    3. **Other turns.** Everything is cut from the first place where a turn starts: at the
       beginning of a line (after indentation, quotes, ``*``/``-`` decoration), or mid-line
       right after a sentence end (``. ! ? …``), a label of any name in ``other_names`` (same
       forms as in rule 2, case-insensitive), of the speaker's own name (the model starting a new
       turn of its own), a role marker (``User:``, ``Assistant:``, ``System:``, ``Human:``, also
       with an ``(Org)``), a bracketed transcript label (``[Anyone @ Org]:``, ``[Anyone]:``), or
       a ``###`` heading. A name that is merely mentioned ("I told Alex Rivera: ..."
       mid-sentence) is kept.
    4. **Layout.** Trailing spaces are removed from lines; a line, or a sentence, that repeats an
       earlier one (ignoring case, spacing, apostrophes and punctuation: "Done." and "done!" are
       the same sentence) is dropped, since a looping model says the same thing again; runs of
       blank lines collapse to one blank line and the whole text is stripped.
    5. **Quotes.** Quotes around the whole reply are removed (``"..."``, ``“...”``, ``'...'``,
       ``«...»``, backticks), and so is a lone double quote left at either end without a partner.
    6. **Length.** A reply longer than :data:`MAX_REPLY_CHARS` (800) characters is cut at the last
       sentence end that fits; if that would keep less than a quarter of it, at the last word
       that fits, followed by ``…``. The result is never longer than the cap.
    7. **Nothing left.** If no letter or digit remains, the result is ``""``: the caller then posts
       nothing.
    8. **Brevity** (only with ``max_sentences``). A leading salutation line ("Hi Alex,",
       "Dear team,", a line holding only a participant's name), a leading salutation that the
       reply goes on after on the same line ("Hi Alex, the ..." / "Alex Rivera - the ..." /
       "Alex of Acme, the ..." / "Alex, the ...": a greeting word or a name, then ``,`` ``!``
       ``:`` or a dash; the next letter is upper-cased) and pleasantry sentences ("I hope
       you're doing well.") are dropped, the reply is joined into one paragraph, an unfinished
       last sentence is dropped when a finished one precedes it, and at most
       ``max_sentences`` sentences are kept. A reply that is only a participant's name (also
       with ``of Org`` or ``(...)`` after it) comes out empty.
    9. **Bracketed names.** A name of the speaker, of ``other_names`` or of ``org_names`` in
       square brackets ("[Acme]", the model's template habit) loses its brackets.

    The rules are applied again until the text no longer changes, so
    ``clean_reply(clean_reply(x, ...), ...) == clean_reply(x, ...)``.

    Args:
        text: The raw text the model produced.
        speaker_name: The display name of the agent that wrote the reply.
        other_names: Display names of the other participants (people and agents) of the thread.
        max_sentences: Keep at most this many sentences (rule 8); ``None`` keeps them all.
        org_names: Names of the orgs in the thread (rule 9).

    Returns:
        The cleaned reply, at most :data:`MAX_REPLY_CHARS` characters, or ``""``.

    Raises:
        Nothing: any string is accepted.
    """
    template_header, own_prefix, turn_marker = _patterns(speaker_name, tuple(other_names))
    names = (speaker_name, *other_names)
    bracketed = _bracketed_names((*names, *org_names))
    greeting = _greeting(names)
    name_only = _name_only(names)

    current = text
    # A pass that changes the text shortens it (bar turning a lone "\r" into "\n"), so this
    # reaches a fixed point, in practice within two or three passes; the bound is a safety net.
    for _ in range(len(text) + 2):
        cleaned = _clean_once(current, template_header, own_prefix, turn_marker)
        if max_sentences is not None:
            cleaned = _brief(cleaned, max_sentences, names, greeting)
            if name_only is not None and name_only.match(cleaned):
                cleaned = ""
        if bracketed is not None:
            cleaned = bracketed.sub(r"\g<name>", cleaned)
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


def name_forms(name: str, *, first_name: bool = False) -> list[str]:
    """The ways a reply may write the participant ``name``: the name itself, the name without
    parenthetical remarks (``Alex Rivera (project lead)`` -> ``Alex Rivera``) and, with
    ``first_name``, the first word of a name of two or more words that looks like a person's
    (its last word is not a role such as Agent, Bot, Assistant, Team, Lead). Longest first,
    without blanks or duplicates; [] for a blank name."""
    forms = [" ".join(name.split()), " ".join(_PARENTHETICAL.sub(" ", name).split())]
    bare = forms[1].split()
    if first_name and len(bare) >= 2 and bare[-1].casefold() not in _ROLE_NOUNS:
        forms.append(bare[0])
    unique = {f.casefold(): f for f in forms if f}
    return sorted(unique.values(), key=len, reverse=True)


def _name_alternation(names: Sequence[str], *, first_name: bool = False) -> str:
    """Regex alternation (a group) of every form of ``names``, spaces matching any run of spaces
    and tabs; "" when there is none."""
    forms = {f for name in names for f in name_forms(name, first_name=first_name)}
    if not forms:
        return ""
    escaped = (r"[ \t]+".join(re.escape(w) for w in f.split()) for f in forms)
    return "(?:" + "|".join(sorted(escaped, key=len, reverse=True)) + ")"


def _name_label(name: str) -> str:
    """Regex for a turn label of ``name``: ``Name:``, ``Name (Org):``, ``[Name @ Org]:``,
    ``Name of Org:``..."""
    escaped = _name_alternation([name])
    if not escaped:
        return ""
    bold = _BOLD
    return (
        r"\[?" + bold + escaped + bold
        + r"(?:[ \t]*@[ \t]*[^\]\[:\n]{1,80})?"  # "@ Org"
        + r"(?:[ \t]+of[ \t]+[^\]\[:\n.!?]{1,60})?"  # "of Org"
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
        if not line.strip():
            kept.append("")
            continue
        key = _sentence_key(line) or " ".join(line.split()).casefold()
        if key in seen_lines:
            continue
        seen_lines.add(key)
        sentences: list[str] = []
        for sentence in _SENTENCE_SPLIT.split(line.strip()):
            sentence_key = _sentence_key(sentence) or " ".join(sentence.split()).casefold()
            if sentence_key in seen_sentences:
                continue
            seen_sentences.add(sentence_key)
            sentences.append(sentence)
        if sentences:
            indent = line[: len(line) - len(line.lstrip())]
            kept.append(indent + " ".join(sentences))
    return "\n".join(kept)


def _sentence_key(sentence: str) -> str:
    """``sentence`` compared for repeats: case-folded, apostrophes dropped, every run of other
    non-alphanumeric characters one space; "" when it has no letter or digit."""
    folded = _APOSTROPHES.sub("", sentence.casefold())
    return " ".join(_NON_WORD.sub(" ", folded).split())


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


# " of Acme Corp" after a name: capitalised words only ("Alex of Acme", not "Alex of course").
_OF_ORG = r"[ \t]+of[ \t]+(?-i:[A-Z][\w&'-]*(?:[ \t]+[A-Z][\w&'-]*){0,4})"
_GREETING_WORDS = r"(?:hi|hello|hey|dear|greetings|good (?:morning|afternoon|evening))"
_SALUTATION = re.compile(
    r"\A" + _GREETING_WORDS + r"\b[^\n.!?]{0,60}[,!:]?"
    r"[ \t]*(?:\n|\Z)",
    re.IGNORECASE,
)


# Pleasantries that carry nothing ("I hope you're doing well.", "I hope this finds you well.").
_FILLER = re.compile(
    r"\A(?:i hope (?:you(?:'re| are)|this (?:message |email )?finds you)[^.!?]{0,40}well"
    r"|thanks? (?:you )?for (?:your|the) (?:message|update|note))[^.!?]*[.!?]\Z",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=256)
def _greeting(names: tuple[str, ...]) -> re.Pattern[str]:
    """A salutation at the start of a reply that goes on on the same line (rule 8)."""
    alternation = _name_alternation(names, first_name=True)
    by_name = ""
    if alternation:
        by_name = r"|" + _DECORATION + alternation + r"[*_]*(?:" + _OF_ORG + r")?"
        by_name += r"(?:[ \t]*\([^()\n]{1,60}\))?"
    return re.compile(
        r"\A(?:" + _GREETING_WORDS + r"\b[^\n.!?:,]{0,60}" + by_name + r")"
        r"[ \t]*(?:[,!:]|[ \t][-\u2013\u2014])[ \t]*(?=[^\W_])",
        re.IGNORECASE,
    )


@functools.lru_cache(maxsize=256)
def _name_only(names: tuple[str, ...]) -> re.Pattern[str] | None:
    """A reply that is nothing but a participant's name (rule 8); None without names."""
    alternation = _name_alternation(names)
    if not alternation:
        return None
    return re.compile(
        r"\A" + _DECORATION + alternation
        + r"(?:" + _OF_ORG + r"|[ \t]*\([^()\n]{1,60}\))*"
        + r"[\s*_:,.\-\u2013\u2014\"'”\u2019]*\Z",
        re.IGNORECASE,
    )  # fmt: skip


def _brief(text: str, max_sentences: int, names: Sequence[str], greeting: re.Pattern[str]) -> str:
    """Rule 8: drop a salutation or name-only first line, keep the first sentences."""
    text = _SALUTATION.sub("", text, count=1).lstrip()
    match = greeting.match(text)
    if match and match.end() < len(text):
        rest = text[match.end() :]
        text = rest[0].upper() + rest[1:]
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


@functools.lru_cache(maxsize=256)
def _bracketed_names(names: tuple[str, ...]) -> re.Pattern[str] | None:
    """``[Name]`` for every form of ``names`` (rule 9); None when there is no name."""
    alternation = _name_alternation(names)
    if not alternation:
        return None
    return re.compile(r"\[[ \t]*(?P<name>" + alternation + r")[ \t]*\](?!\()", re.IGNORECASE)


# --------------------------------------------------------------------------- echoes and defects

_ECHO_MIN_WORDS = 4  # shorter sentences ("Thanks.", "Sounds good.") are no echo
_DIGITS = re.compile(r"\d+(?:[-\u2013]\d+)?")
_NUMBER_RANGE = r"\d+(?:[ \t]*(?:[-\u2013]|to|or)[ \t]*\d+)?"  # "1-2" echoed as "2", "1 to 2"

# Template fill-ins: "[Customer Name]" (not a markdown link "[text](url)"), "{name}", "<name>",
# "XXX", "___".
_PLACEHOLDER = re.compile(
    r"\[(?P<square>[^\[\]\n]{1,60})\](?!\()"
    r"|\{[A-Za-z_][\w .'-]{0,60}\}"
    r"|<[A-Za-z_][\w .'-]{0,60}>"
    r"|\bX{3,}\b|_{3,}"
)
# Bracketed text that is no fill-in: a citation "[1]", "[2, 3]", a checkbox "[x]", "[ ]".
_NOT_A_PLACEHOLDER = re.compile(r"[\d ,\-]*|[ \txX]")
# Claiming an identity: "I'm ...", "I am ...", "this is ...", "my name is ...".
_CLAIM = r"\b(?:i[ \t]*am|i['\u2019]?m|this[ \t]+is|my[ \t]+name[ \t]+is)[ \t]+(?:the[ \t]+)?"
_SIGN_OFF = r"\b(?:(?:best|kind|warm)[ \t]+)?(?:regards|wishes|sincerely|cheers|yours)"
_WE = r"\b(?:i[ \t]*am|i['\u2019]?m|we[ \t]+are|we['\u2019]re)[ \t]+"
_FOR = r"working[ \t]+for|speaking[ \t]+for|on[ \t]+behalf[ \t]+of"
_SENTENCE_START = r"(?:^|(?<=[.!?…])[\"'”\u2019)\]]*[ \t]+)" + _DECORATION


@functools.lru_cache(maxsize=256)
def _as_someone_else(other_names: tuple[str, ...], other_orgs: tuple[str, ...]) -> re.Pattern[str]:
    """Where a reply speaks as another participant or org (see :func:`reply_defects`)."""
    names = _name_alternation(other_names, first_name=True)
    orgs = _name_alternation(other_orgs)
    roles = r"(?:" + "|".join(_ROLE_WORDS) + r")"
    label_tail = (
        r"[*_]*(?:[ \t]*@[ \t]*[^\]\[:\n]{1,80})?(?:[ \t]+of[ \t]+[^\]\[:\n.!?]{1,60})?"
        r"[ \t]*\]?(?:[ \t]*\([^()\n]{1,80}\))?[*_]*[ \t]*:"
    )
    alternatives = [_SENTENCE_START + r"\[?[*_]*" + roles + label_tail]
    if names:
        alternatives += [
            _CLAIM + names + r"\b",
            _SENTENCE_START + names + r"[ \t]+here\b",
            _SIGN_OFF + r"[ \t]*[,.!]?[ \t]*[-\u2013\u2014]?[ \t]*" + names + r"\W*\Z",
            r"(?:^|[ \t])[-\u2013\u2014][ \t]*" + names + r"[ \t.]*\Z",
            _SENTENCE_START + r"\[?[*_]*" + names + label_tail,
        ]
    if orgs:
        alternatives += [
            _WE + r"(?:from|with|at|" + _FOR + r")[ \t]+" + orgs + r"\b",
            _WE
            + r"(?:an?|the)[ \t]+(?:[\w-]+[ \t]+){0,3}?(?:from|at|"
            + _FOR
            + r")[ \t]+"
            + orgs
            + r"\b",
            r"\b(?:i|we)[ \t]+work[ \t]+(?:for|at)[ \t]+" + orgs + r"\b",
            _WE + orgs + r"(?:['\u2019]s)?\b",
            r"\b(?:we|us|here)[ \t]+at[ \t]+" + orgs + r"\b",
            r"\bon[ \t]+behalf[ \t]+of[ \t]+" + orgs + r"\b",
            _SENTENCE_START + r"\[?[*_]*" + orgs + r"[*_]*\]?[ \t]*:",
        ]
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.IGNORECASE | re.MULTILINE)


def _placeholders(text: str, known_names: Sequence[str]) -> list[str]:
    """The template fill-ins of ``text``; bracketed parts of ``known_names`` do not count."""
    for name in known_names:
        if name.strip():
            text = re.sub(re.escape(name.strip()), " ", text, flags=re.IGNORECASE)
    return [
        m.group(0)
        for m in _PLACEHOLDER.finditer(text)
        if m.group("square") is None or not _NOT_A_PLACEHOLDER.fullmatch(m.group("square"))
    ]


def reply_defects(
    text: str,
    *,
    speaker_name: str,
    other_names: Sequence[str] = (),
    other_orgs: Sequence[str] = (),
) -> list[str]:
    """What makes the cleaned reply ``text`` unfit to post, one description per defect found.

    - ``placeholder: <text>``: a template fill-in — ``[...]`` of 1-60 characters that is not a
      markdown link, a citation (``[1]``) or a checkbox (``[x]``), ``{name}``, ``<name>``,
      ``XXX``, ``___`` (bracketed parts of the participants' own names do not count).
    - ``speaks as someone else: <text>``: the reply claims to be another participant — ``I'm``
      / ``I am`` / ``this is`` / ``my name is`` followed by one of ``other_names`` (in any of
      their :func:`name_forms`, first names included), ``<name> here`` starting a sentence, a
      sign-off (``Best regards, <name>``, ``- <name>``) ending the reply — or one of
      ``other_orgs`` (``I'm from / with / at / working for <org>``, ``I'm an AI agent from /
      at / working for <org>``, ``I work for <org>``, ``we at <org>``, ``on behalf of <org>``,
      ``I'm <org>'s``), or writes a turn labelled with another name, org or a
      chat role (``<name>:``, ``[<name> @ <org>]:``, ``<org>:``, ``User:``) starting a sentence.
    - ``repeated sentence: <text>``: a sentence that repeats an earlier one of the reply
      (ignoring case, spacing, apostrophes and punctuation).

    Args:
        text: A reply after :func:`clean_reply`.
        speaker_name: The display name of the agent that wrote it.
        other_names: Display names of the other participants.
        other_orgs: Names of the other participants' orgs, without the speaker's own.

    Returns:
        The defects in order of kind ([] when the reply is fit to post).
    """
    defects = [
        f"placeholder: {p}" for p in _placeholders(text, (speaker_name, *other_names, *other_orgs))
    ]
    pattern = _as_someone_else(_others(speaker_name, other_names), tuple(other_orgs))
    defects += [f"speaks as someone else: {m.group(0).strip()}" for m in pattern.finditer(text)]
    seen: set[str] = set()
    for sentence in _sentences(text):
        key = _sentence_key(sentence)
        if key and key in seen:
            defects.append(f"repeated sentence: {sentence}")
        seen.add(key)
    return defects


def drop_defective_sentences(
    text: str,
    *,
    speaker_name: str,
    other_names: Sequence[str] = (),
    other_orgs: Sequence[str] = (),
) -> str:
    """The last resort for a reply with :func:`reply_defects`: ``text`` without them.

    A sentence with a placeholder, or where the reply speaks as someone else, is dropped (and
    everything after a turn labelled with another name, which is that turn); of repeated
    sentences the first is kept. The remaining sentences are joined by single spaces (the text
    is one paragraph, as :func:`clean_reply` leaves it with ``max_sentences``). Returns ``""``
    when no letter or digit is left; ``text`` stripped when it had no defect.
    """
    known = (speaker_name, *other_names, *other_orgs)
    pattern = _as_someone_else(_others(speaker_name, other_names), tuple(other_orgs))
    kept: list[str] = []
    seen: set[str] = set()
    for sentence in _sentences(text):
        if _placeholders(sentence, known) or pattern.search(sentence):
            continue
        key = _sentence_key(sentence)
        if key in seen:
            continue
        seen.add(key)
        kept.append(sentence)
    out = " ".join(kept)
    return out if _MEANINGFUL.search(out) else ""


def drop_echoes(text: str, *, sources: Sequence[str] = (), phrases: Sequence[str] = ()) -> str:
    """Remove from ``text`` what a model copied from its prompt instead of answering.

    Every occurrence of one of ``phrases`` (the prompt's own instructions, such as ``Reply to
    Alex in 1-2 sentences.``; case-insensitive, any spacing, a number or range such as ``1-2``
    matching any number or range, a final ``.`` ``:`` ``,`` ``;`` ``!`` or ``?`` optional) is
    cut out, and every sentence of
    at least 4 words that repeats a sentence of one of ``sources`` (the messages already in the
    thread; compared ignoring case, spacing, apostrophes and punctuation) is dropped.
    Punctuation and spaces left at the start are stripped, and runs of spaces collapse.

    Returns:
        What is left, or ``""`` when no letter or digit is.
    """
    for phrase in phrases:
        words = phrase.strip().rstrip(".:,;!?").split()
        if words:
            pattern = r"\s+".join(
                _NUMBER_RANGE if _DIGITS.fullmatch(w) else re.escape(w) for w in words
            )
            text = re.sub(pattern + r"[.:,;!?]?", " ", text, flags=re.IGNORECASE)
    said = {
        key
        for source in sources
        for sentence in _SENTENCE_SPLIT.split(" ".join(source.split()))
        if len((key := _sentence_key(sentence)).split()) >= _ECHO_MIN_WORDS
    }
    lines = []
    for line in text.split("\n"):
        kept = [s for s in _SENTENCE_SPLIT.split(line) if _sentence_key(s) not in said]
        lines.append(" ".join(kept))
    out = re.sub(r"[ \t]{2,}", " ", "\n".join(lines))
    out = re.sub(r"\A[\s.,;:!?\-\u2013\u2014]+", "", out).strip()
    return out if _MEANINGFUL.search(out) else ""


def _others(speaker_name: str, other_names: Sequence[str]) -> tuple[str, ...]:
    """``other_names`` without the forms the speaker's own name shares (a first name)."""
    own = {f.casefold() for f in name_forms(speaker_name, first_name=True)}
    return tuple(n for n in other_names if n.strip() and n.casefold() not in own)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]
