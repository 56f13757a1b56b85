"""Tests of clean_reply: one concrete case per rule, then properties over generated replies."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_network.runtime.cleaning import (
    MAX_REPLY_CHARS,
    clean_reply,
    drop_defective_sentences,
    drop_echoes,
    name_forms,
    reply_defects,
)

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


# --- names in their other forms (rules 2 and 3) ---


def test_name_without_its_parenthetical_is_a_turn_label_too() -> None:
    out = clean_reply(
        "The parcel ships on Monday.\nAlex Rivera: Great, thanks!",
        speaker_name=SPEAKER,
        other_names=["Alex Rivera (project lead)"],
    )
    assert out == "The parcel ships on Monday."


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "The parcel ships on Monday. Sam Chen of Globex: And mine?",
            "The parcel ships on Monday.",
        ),
        ("Delivery Agent of Globex: The parcel ships on Monday.", "The parcel ships on Monday."),
        ("Sam Chen of Globex Inc: And mine?", ""),
    ],
)
def test_name_of_org_is_a_turn_label(raw: str, expected: str) -> None:
    assert clean(raw) == expected


def test_name_forms() -> None:
    assert name_forms("Alex Rivera (project lead)") == ["Alex Rivera (project lead)", "Alex Rivera"]
    assert name_forms("Alex Rivera (project lead)", first_name=True)[-1] == "Alex"
    assert name_forms("Delivery Agent", first_name=True) == ["Delivery Agent"]  # a role
    assert name_forms("  ") == []


# --- rule 4: repeats ignore punctuation ---


def test_repeated_sentence_with_other_punctuation_is_dropped() -> None:
    raw = "The 10 remaining items are done. The 10 remaining items are DONE! Call me."
    assert clean(raw) == "The 10 remaining items are done. Call me."


def test_repeated_line_with_other_punctuation_is_dropped() -> None:
    assert clean("It ships Monday.\nIt ships Monday!\nCall me.") == "It ships Monday.\nCall me."


# --- rule 8: salutations on the same line, name-only replies ---


def brief(text: str, *others: str) -> str:
    return clean_reply(text, speaker_name=SPEAKER, other_names=others or OTHERS, max_sentences=3)


@pytest.mark.parametrize(
    "raw",
    [
        "Hi [Customer Name]! the parcel ships on Monday.",
        "Hello Alex, the parcel ships on Monday.",
        "Alex, the parcel ships on Monday.",
        "Alex Rivera - the parcel ships on Monday.",
        "Sam Chen \u2014 The parcel ships on Monday.",
        "Alex Rivera of Acme Corp, the parcel ships on Monday.",
    ],
)
def test_salutation_on_the_same_line_is_dropped(raw: str) -> None:
    assert brief(raw) == "The parcel ships on Monday."


def test_salutation_with_a_parenthetical_name_is_dropped() -> None:
    raw = "Alex Rivera (project lead) (Acme) - the parcel ships on Monday."
    assert brief(raw, "Alex Rivera (project lead)") == "The parcel ships on Monday."


@pytest.mark.parametrize(
    "raw",
    [
        "Hello world programs are the first thing people write.",
        "Alexander, the courier, ships it on Monday.",
        "Sam Chen will ship it on Monday.",
        "Alex of course ships it on Monday.",
    ],
)
def test_text_that_only_starts_like_a_salutation_is_kept(raw: str) -> None:
    assert brief(raw) == raw


@pytest.mark.parametrize(
    "raw", ["Research Agent of Quickstart", "Research Agent", '"Research Agent (Quickstart):"']
)
def test_reply_that_is_only_a_name_is_empty(raw: str) -> None:
    assert brief(raw, "Research Agent") == ""


def test_reply_that_starts_with_a_name_and_goes_on_is_kept() -> None:
    raw = "Research Agent of Quickstart will send the summary."
    assert brief(raw, "Research Agent") == raw


# --- rule 9: bracketed names ---


def test_bracketed_participant_and_org_names_lose_their_brackets() -> None:
    out = clean_reply(
        "[Acme] and [Alex Rivera] are ready; [Customer Name] is not.",
        speaker_name=SPEAKER,
        other_names=["Alex Rivera (project lead)"],
        org_names=["Acme", "Globex"],
    )
    assert out == "Acme and Alex Rivera are ready; [Customer Name] is not."


# --- reply_defects and drop_defective_sentences ---


def defects(text: str) -> list[str]:
    return reply_defects(
        text,
        speaker_name=SPEAKER,
        other_names=["Alex Rivera (project lead)", "Customer Ops Agent"],
        other_orgs=["Acme"],
    )


@pytest.mark.parametrize(
    "text",
    [
        "Hi [Customer Name], the parcel ships on Monday.",
        "Signed, [Your Name].",
        "Dear {name}, it ships.",
        "Dear <customer name>, it ships.",
        "Your order XXX ships on Monday.",
    ],
)
def test_placeholders_are_defects(text: str) -> None:
    assert [d for d in defects(text) if d.startswith("placeholder: ")], text


@pytest.mark.parametrize(
    "text",
    [
        "I'm Alex Rivera, the project lead.",
        "I am Alex and the parcel ships on Monday.",
        "This is the Customer Ops Agent speaking.",
        "My name is Alex Rivera.",
        "Alex Rivera here: it ships on Monday.",
        "It ships on Monday. Best regards, Alex Rivera",
        "It ships on Monday. - Alex",
        "I'm from Acme and it ships on Monday.",
        "We at Acme ship on Monday.",
        "I'm an AI agent working for Acme.",
        "On behalf of Acme, thanks.",
        "It ships. Acme: thanks!",
        "It ships. User: thanks!",
        "It ships. Customer Ops Agent (Acme): thanks!",
    ],
)
def test_speaking_as_someone_else_is_a_defect(text: str) -> None:
    assert [d for d in defects(text) if d.startswith("speaks as someone else: ")], text


def test_repeated_sentence_is_a_defect() -> None:
    assert defects("It ships Monday. It ships monday!") == ["repeated sentence: It ships monday!"]


@pytest.mark.parametrize(
    "text",
    [
        "I told Alex Rivera that the parcel ships on Monday.",
        "Thanks, Alex. The parcel ships on Monday.",
        "See [1] and tick [x]: the parcel ships on Monday.",
        "I'm the Delivery Agent and I work with Acme on this.",
        "Acme's rollout is on Monday, see [the runbook](https://example.com).",
        "The parcel ships on Monday.",
    ],
)
def test_fine_replies_have_no_defect(text: str) -> None:
    assert defects(text) == []


def test_bracketed_part_of_a_participant_name_is_no_placeholder() -> None:
    assert (
        reply_defects("J.R. [QA] approved it.", speaker_name="Bot", other_names=["J.R. [QA]"]) == []
    )


def test_defective_sentences_are_dropped() -> None:
    out = drop_defective_sentences(
        "Hi [Customer Name]. I'm Alex Rivera. The parcel ships on Monday. "
        "The parcel ships on Monday! Call me.",
        speaker_name=SPEAKER,
        other_names=["Alex Rivera (project lead)"],
    )
    assert out == "The parcel ships on Monday. Call me."
    assert defects(out) == []


def test_reply_of_defective_sentences_only_drops_to_empty() -> None:
    out = drop_defective_sentences(
        "I'm Alex Rivera. Dear [Customer Name].",
        speaker_name=SPEAKER,
        other_names=["Alex Rivera"],
    )
    assert out == ""


# --- drop_echoes ---


def test_copied_instructions_are_cut_out() -> None:
    out = drop_echoes(
        'In 2 sentences. Start with this fact: "The cutover is on Thursday 12 June."',
        phrases=[
            "Reply to Alex Rivera in 1-2 sentences.",
            "in 1-2 sentences",
            "Start with this fact:",
        ],
    )
    assert out == '"The cutover is on Thursday 12 June."'


def test_copied_sentences_of_the_thread_are_dropped() -> None:
    out = drop_echoes(
        "We are ready to move the billing migration on Thursday! Webhooks are not validated. Yes.",
        sources=["We are ready to move the billing migration on Thursday.", "Yes."],
    )
    assert out == "Webhooks are not validated. Yes."  # "Yes." is too short to count as a copy


def test_reply_that_only_copies_is_empty() -> None:
    assert (
        drop_echoes("Reply to Alex in 1-2 sentences.", phrases=["Reply to Alex in 1-2 sentences."])
        == ""
    )


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
