"""Tests of clean_reply: one concrete case per rule, then properties over generated replies."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_network.runtime.cleaning import MAX_REPLY_CHARS, clean_reply

SPEAKER = "Delivery Agent"
OTHERS = ("Alex Rivera", "Sam Chen")


def clean(text: str) -> str:
    return clean_reply(text, speaker_name=SPEAKER, other_names=OTHERS)


# --- rule 2: own-name prefix ---


@pytest.mark.parametrize(
    "raw",
    [
        "Delivery Agent: The parcel ships on Monday.",
        "delivery agent: The parcel ships on Monday.",
        "Delivery Agent (Acme): The parcel ships on Monday.",
        "Delivery Agent @ Acme: The parcel ships on Monday.",
        "[Delivery Agent @ Acme]: The parcel ships on Monday.",
        "**Delivery Agent:** The parcel ships on Monday.",
        "**Delivery Agent**: The parcel ships on Monday.",
        "  Delivery Agent:   The parcel ships on Monday.  ",
        "Assistant: The parcel ships on Monday.",
        "Assistant: Delivery Agent: The parcel ships on Monday.",
    ],
)
def test_leading_own_name_is_removed(raw: str) -> None:
    assert clean(raw) == "The parcel ships on Monday."


def test_own_name_inside_the_reply_is_kept() -> None:
    raw = "Yes, Delivery Agent here, and the parcel ships on Monday."
    assert clean(raw) == raw


# --- rule 3: other turns ---


@pytest.mark.parametrize(
    "raw",
    [
        "The parcel ships on Monday.\nAlex Rivera: Great, thanks!",
        "The parcel ships on Monday.\nalex rivera: Great, thanks!",
        "The parcel ships on Monday.\nSam Chen (Globex): And mine?",
        "The parcel ships on Monday.\n[Sam Chen @ Globex]: And mine?",
        "The parcel ships on Monday.\n**Alex Rivera:** Great, thanks!",
        "The parcel ships on Monday.\n  - Alex Rivera: Great, thanks!",
        "The parcel ships on Monday. Alex Rivera: Great, thanks!",
        "The parcel ships on Monday.  Sam Chen (Globex): And mine?",
        "The parcel ships on Monday.\nUser: Thanks.",
        "The parcel ships on Monday.\nHuman: Thanks.",
        "The parcel ships on Monday. System: be brief",
        "The parcel ships on Monday.\nAssistant: Anything else?",
        "The parcel ships on Monday.\n[Jordan Lee @ Initech]: Hello?",
        "The parcel ships on Monday.\n### Instruction: write a poem",
        "The parcel ships on Monday.\nDelivery Agent: Anything else I can do?",
    ],
)
def test_reply_is_cut_where_another_turn_starts(raw: str) -> None:
    assert clean(raw) == "The parcel ships on Monday."


def test_exclamation_or_question_mark_also_ends_a_sentence() -> None:
    assert clean("It ships Monday! Sam Chen (Globex): And mine?") == "It ships Monday!"
    assert clean("Shall I ship it? User (Acme): yes") == "Shall I ship it?"


def test_closing_quote_stays_with_the_sentence_before_a_cut() -> None:
    raw = 'I said "the parcel ships on Monday." Alex Rivera: ok'
    assert clean(raw) == 'I said "the parcel ships on Monday."'


def test_mentioning_a_name_mid_sentence_is_not_a_turn() -> None:
    raw = "I told Alex Rivera: the parcel ships on Monday."
    assert clean(raw) == raw


def test_name_that_only_starts_like_another_name_is_not_a_turn() -> None:
    raw = "Okay.\nAlex Riveras: is not a participant here."
    assert clean(raw) == raw


def test_reply_that_starts_as_someone_else_is_empty() -> None:
    assert clean("Alex Rivera: When does my parcel ship?") == ""
    assert clean("User: When does my parcel ship?") == ""
    assert clean("[Jordan Lee @ Initech]: Hello?") == ""


# --- rule 1: chat-template tokens ---


def test_chat_template_header_is_removed_and_next_turn_cut() -> None:
    raw = "<|im_start|>assistant\nThe parcel ships on Monday.<|im_end|>\n<|im_start|>user\nThanks"
    assert clean(raw) == "The parcel ships on Monday."


@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>"])
def test_turn_boundary_tokens_end_the_reply(token: str) -> None:
    assert clean(f"The parcel ships on Monday.{token}Something else.") == (
        "The parcel ships on Monday."
    )


def test_other_template_tokens_are_dropped() -> None:
    assert clean("<s>The parcel <|assistant|>ships on Monday.") == "The parcel ships on Monday."


# --- rules 4 and 5: layout and quotes ---


@pytest.mark.parametrize(
    "raw",
    [
        '"The parcel ships on Monday."',
        "“The parcel ships on Monday.”",
        "'The parcel ships on Monday.'",
        "«The parcel ships on Monday.»",
        '"The parcel ships on Monday.',
        'The parcel ships on Monday."',
        '  "  The parcel ships on Monday.  "  ',
        '"Delivery Agent: The parcel ships on Monday. Alex Rivera: thanks"',
    ],
)
def test_surrounding_quotes_are_removed(raw: str) -> None:
    assert clean(raw) == "The parcel ships on Monday."


def test_rules_are_applied_again_after_quotes_come_off() -> None:
    # Removing the backticks exposes a prefix, and then a turn of someone else.
    assert clean("`Delivery Agent: The parcel ships on Monday.`") == "The parcel ships on Monday."
    assert clean("`Alex Rivera: Thanks!`") == ""


def test_inner_quotes_are_kept() -> None:
    raw = '"Fragile" and "urgent" are both on the label.'
    assert clean(raw) == raw


def test_blank_line_runs_collapse_and_trailing_spaces_go() -> None:
    raw = "First line.   \n\n\n\n\nSecond line.\n\n\n"
    assert clean(raw) == "First line.\n\nSecond line."


def test_repeated_lines_and_sentences_are_dropped() -> None:
    raw = "It ships Monday.\nIt ships Monday.\nSure! Sure! Sure! Call me."
    assert clean(raw) == "It ships Monday.\nSure! Call me."


# --- rule 6: length ---


def test_long_reply_is_cut_at_a_sentence_boundary() -> None:
    sentences = [f"Sentence number {i} is about parcel {i}." for i in range(100)]
    out = clean(" ".join(sentences))
    assert 0 < len(out) <= MAX_REPLY_CHARS
    assert out.endswith(".")
    assert len(out) > MAX_REPLY_CHARS - 50  # cut at the last sentence that fits, not earlier
    assert " ".join(sentences).startswith(out)


def test_long_reply_without_sentences_is_cut_at_a_word_with_ellipsis() -> None:
    raw = " ".join(f"word{i}" for i in range(400))
    out = clean(raw)
    assert len(out) <= MAX_REPLY_CHARS
    assert out.endswith("…")
    assert raw.startswith(out[:-1])
    assert out[-2].isdigit()  # a whole word, not a stray space


# --- rule 7: nothing left ---


@pytest.mark.parametrize(
    "raw", ["", "   ", "...", '""', "<|im_end|>", "Delivery Agent:", "Delivery Agent: ...", "\n\n"]
)
def test_nothing_meaningful_gives_empty_string(raw: str) -> None:
    assert clean(raw) == ""


def test_without_other_names_role_markers_still_cut() -> None:
    out = clean_reply("Fine.\nUser: next question", speaker_name="Bot")
    assert out == "Fine."


def test_names_with_regex_characters_are_matched_literally() -> None:
    out = clean_reply(
        "A+ (Ops): Done. J.R. [QA]: Ok? x",
        speaker_name="A+ (Ops)",
        other_names=["J.R. [QA]"],
    )
    assert out == "Done."


# --- properties ---

_NAME = st.lists(
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8
    ),
    min_size=1,
    max_size=3,
).map(" ".join)

_TEXT = st.text(
    alphabet=st.sampled_from(
        [
            *string.ascii_letters,
            *string.digits,
            *" \t\n.,!?:;()[]@#*_-'\"`",
            *"“”«»…\u2018\u2019",
        ]
    ),
    max_size=120,
)


@st.composite
def _conversation(draw: st.DrawFn) -> tuple[str, list[str], str]:
    names = draw(st.lists(_NAME, min_size=2, max_size=4, unique_by=str.lower))
    speaker, others = names[0], names[1:]
    others = [
        o for o in others if speaker.lower() not in o.lower() and o.lower() not in speaker.lower()
    ]
    label = st.sampled_from([*names, "User", "Assistant", "System"]).flatmap(
        lambda n: st.sampled_from(
            [f"{n}:", f"\n{n}:", f" {n} (Org):", f"\n[{n} @ Org]:", f". {n}:", f"**{n}:**"]
        )
    )
    token = st.sampled_from(
        ["<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "### ", "\n\n\n"]
    )
    pieces = draw(st.lists(st.one_of(_TEXT, label, token), max_size=12))
    filler = draw(st.integers(min_value=0, max_value=3))
    text = "".join(pieces) + " More words here." * (filler * 20)
    return speaker, others, text


def _turns_of(name: str, text: str) -> list[str]:
    """Places where ``name`` starts a turn, found independently of the implementation."""
    found: list[str] = []
    for line in text.split("\n"):
        for piece in re.split(r"(?<=[.!?…])\s+", line):
            head = piece.lstrip(" \t\"'“”\u2018\u2019«»*_>-").lower()
            head = head.removeprefix("[").lstrip("*_")
            label = name.lower()
            if head.startswith(label):
                rest = head[len(label) :]
                if re.match(r"[ \t*_\]]*(?:\([^()\n]{1,80}\))?[ \t*_]*:", rest):
                    found.append(piece)
    return found


@settings(max_examples=400, deadline=None)
@given(_conversation())
def test_property_no_turn_of_another_speaker_survives(conv: tuple[str, list[str], str]) -> None:
    speaker, others, text = conv
    out = clean_reply(text, speaker_name=speaker, other_names=others)
    for name in others:
        assert _turns_of(name, out) == [], (name, out)
    for role in ("User", "System", "Assistant", speaker):
        assert _turns_of(role, out) == [], (role, out)
    assert "<|im_start|>" not in out
    assert "<|im_end|>" not in out


@settings(max_examples=400, deadline=None)
@given(_conversation())
def test_property_never_longer_than_the_cap(conv: tuple[str, list[str], str]) -> None:
    speaker, others, text = conv
    assert len(clean_reply(text, speaker_name=speaker, other_names=others)) <= MAX_REPLY_CHARS


@settings(max_examples=400, deadline=None)
@given(_conversation())
def test_property_idempotent(conv: tuple[str, list[str], str]) -> None:
    speaker, others, text = conv
    once = clean_reply(text, speaker_name=speaker, other_names=others)
    assert clean_reply(once, speaker_name=speaker, other_names=others) == once


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000), _NAME, st.lists(_NAME, max_size=3))
def test_property_arbitrary_text(text: str, speaker: str, others: list[str]) -> None:
    out = clean_reply(text, speaker_name=speaker, other_names=others)
    assert len(out) <= MAX_REPLY_CHARS
    assert out == out.strip()
    assert clean_reply(out, speaker_name=speaker, other_names=others) == out
