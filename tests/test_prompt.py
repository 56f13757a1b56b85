"""Tests of the participate prompt (runtime/prompt.py): layout, note choice, echo hints."""

from __future__ import annotations

from agent_network.runtime.prompt import build_prompt, display_name, rank_notes, select_notes

KICKOFF = "We are ready to move the billing migration to production on Thursday."
BLOCKER = (
    "The remaining blocker is webhook validation: payment-provider webhooks to the new billing "
    "endpoint have not been validated end to end."
)
CHECKLIST = "Status before the production cutover: 7 of 8 checklist items are done."
KNOWLEDGE = [{"text": f"{BLOCKER} {CHECKLIST}"}]


def prompt_for(history: list[tuple[str, str, str]], knowledge: list[dict[str, str]] = KNOWLEDGE):
    return build_prompt(
        agent_name="Customer Ops Agent",
        org_name="Acme",
        identity="You know Acme's checklist.",
        thread_title="rollout-status",
        history=history,
        knowledge=knowledge,
    )


def test_message_is_the_user_turn_and_the_ask_starts_with_the_best_fact() -> None:
    p = prompt_for([("Alex Rivera (project lead)", "Acme", KICKOFF)])
    message, ask = p.user.split("\n\n")
    assert message == KICKOFF
    assert (
        ask == f'Reply to Alex Rivera of Acme in 1-2 sentences. Start with this fact: "{BLOCKER}"'
    )
    assert p.system.startswith("You are Customer Ops Agent, an AI agent working for Acme.")
    assert f"What you know: {BLOCKER} {CHECKLIST}" in p.system
    # no transcript line the model could go on with as someone else's turn
    assert "Alex Rivera (project lead) (Acme):" not in p.system + p.user


def test_earlier_messages_are_prose_in_the_system_prompt() -> None:
    p = prompt_for(
        [
            ("Alex Rivera (project lead)", "Acme", KICKOFF),
            ("Delivery Agent", "Globex", "Retries are still open."),
        ]
    )
    assert p.user.startswith("Retries are still open.\n\n")
    assert (
        f'Earlier in the thread "rollout-status": Alex Rivera of Acme wrote "{KICKOFF}".'
        in p.system
    )
    assert "Reply to Delivery Agent of Globex in 1-2 sentences." in p.user
    assert KICKOFF not in p.user
    assert p.other_orgs == ("Globex",)
    assert p.org_name == "Acme"
    assert p.echo_sources == (KICKOFF, "Retries are still open.")
    assert "Reply to Delivery Agent of Globex in 1-2 sentences." in p.echo_phrases


def test_retry_prompts_move_the_message_into_the_system_prompt_then_leave_it_out() -> None:
    p = prompt_for([("Alex Rivera", "Acme", KICKOFF)])
    first = p.retry
    assert first is not None
    assert first.system == p.system + f' The message you reply to: "{KICKOFF}"'
    assert first.user == p.user.removeprefix(f"{KICKOFF}\n\n")
    assert first.user.startswith("Reply to Alex Rivera of Acme in 1-2 sentences.")
    last = first.retry
    assert last is not None
    assert last.system == p.system
    assert last.user == f'Write your reply in 1-2 sentences. Start with this fact: "{BLOCKER}"'
    assert KICKOFF not in last.system + last.user
    assert last.retry is None
    assert last.echo_sources == first.echo_sources == p.echo_sources


def test_without_knowledge_the_ask_has_no_fact() -> None:
    p = prompt_for([("Alex Rivera", "Quickstart", "Summarize the top 3 approaches.")], [])
    assert (
        p.user
        == "Summarize the top 3 approaches.\n\nReply to Alex Rivera of Quickstart in 1-2 sentences."
    )
    assert "What you know" not in p.system


def test_own_earlier_messages_are_no_echo_sources() -> None:
    p = prompt_for(
        [
            ("Alex Rivera", "Acme", KICKOFF),
            ("Customer Ops Agent", "Acme", "Webhooks are open."),
            ("Delivery Agent", "Globex", "Which webhooks?"),
        ]
    )
    assert p.echo_sources == (KICKOFF, "Which webhooks?")


def test_a_note_already_said_in_the_thread_is_skipped() -> None:
    said = (  # the agent's earlier reply, a near copy of the note
        "As I said, the remaining blocker is webhook validation: the payment-provider webhooks "
        "to the new billing endpoint are not validated end to end."
    )
    p = prompt_for(
        [
            ("Alex Rivera", "Acme", KICKOFF),
            ("Customer Ops Agent", "Acme", said),
            ("Delivery Agent", "Globex", "Which blocker?"),
        ]
    )
    assert BLOCKER not in p.system
    assert f'Start with this fact: "{CHECKLIST}"' in p.user


def test_notes_sharing_a_word_with_the_message_come_first() -> None:
    salient = "The risk is an unresolved issue and a blocker that is still pending and open."
    fitting = "Invoices for Umbrella Retail go out manually on Friday 13 June."
    chunks = [{"text": f"{salient} {fitting}"}]
    assert rank_notes(chunks, "When do the Umbrella invoices go out?")[0] == fitting
    # without a shared word the status/risk words decide
    assert rank_notes(chunks, "Anything new?")[0] == salient


def test_select_notes_joins_the_ranked_notes() -> None:
    assert select_notes(KNOWLEDGE, KICKOFF) == " ".join(rank_notes(KNOWLEDGE, KICKOFF))
    assert select_notes(KNOWLEDGE, KICKOFF, said=[BLOCKER, CHECKLIST]) == ""


def test_display_name_drops_parenthetical_remarks() -> None:
    assert display_name("Alex Rivera (project lead)") == "Alex Rivera"
    assert display_name("Delivery Agent") == "Delivery Agent"
    assert display_name("(team)") == "(team)"
