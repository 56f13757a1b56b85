"""Thread protocols at the hub level: adapters (open, consulting, conversation, discussion,
custom), the lifecycle (invited -> active -> closing -> closed), TTL and ack timeouts and the
expectations driven by ``hub.sweep(now)``, and audience validation.

Every test runs the real :class:`Hub` over a real SQLite file; time is driven by passing ``now``
to ``sweep`` (computed from the stored envelopes' ``created_at``), never by sleeping, except the
one test of the background sweeper task, which waits for the close it must produce.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent_network.errors import (
    AgentNetworkError,
    InvalidAudienceError,
    InvalidRequestError,
    NotFoundError,
    NotYourTurnError,
    ProtocolViolationError,
    RunawayBudgetError,
    ThreadClosedError,
)
from agent_network.hub import Hub
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.ids import new_id
from agent_network.protocol import (
    BaseAdapter,
    Proposal,
    acks_within,
    max_silence,
    may_speak,
    register_adapter,
    reply_within,
    thread_created_data,
    turn_within,
)
from agent_network.protocol.deadlines import next_due
from agent_network.protocol.events import (
    EV_EXPECTATION_VIOLATED,
    EV_MESSAGE,
    EV_NOTIFY,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
)
from agent_network.protocol.fold import fold
from agent_network.protocol.knobs import epoch
from agent_network.protocol.state import ThreadState
from agent_network.store.engine import create_engine, database_url

ORG = "org_protocols"
SYSTEM = Sender("system", "key_test", ORG)
ALICE = Sender("agent", "agt_alice", ORG)
BOB = Sender("agent", "agt_bob", ORG)
CAROL = Sender("agent", "agt_carol", ORG)
DAVE = Sender("user", "usr_dave", ORG)
OUTSIDER = Sender("agent", "agt_outsider", ORG)


def who(actor: Sender) -> tuple[str, str]:
    return (actor.kind, actor.id)


@contextlib.asynccontextmanager
async def running_hub(db: Path, *, sweep_interval: float | None = None) -> AsyncIterator[Hub]:
    engine = create_engine(database_url(db))
    try:
        async with Hub.open(engine, sweep_interval=sweep_interval) as hub:
            yield hub
    finally:
        await engine.dispose()


async def open_thread(
    hub: Hub, adapter: str, *members: Sender, **knobs: Any
) -> tuple[str, Envelope]:
    tid = new_id("thr")
    data = {
        "title": f"{adapter} thread",
        "team_id": "team_x",
        **thread_created_data(adapter, [who(m) for m in members], **knobs),
    }
    created = await hub.append(tid, type=EV_THREAD_CREATED, data=data, sender=SYSTEM)
    return tid, created


async def say(hub: Hub, tid: str, sender: Sender, content: str = "hello", **kw: Any) -> Envelope:
    return await hub.append(tid, type=EV_MESSAGE, data={"content": content}, sender=sender, **kw)


async def refused(hub: Hub, tid: str, error: type[AgentNetworkError], **append: Any) -> str:
    """Assert that the append is refused with ``error`` and that nothing reached the WAL."""
    before = await hub.read(tid)
    with pytest.raises(error) as info:
        await hub.append(tid, **append)
    assert await hub.read(tid) == before
    return info.value.message


async def refused_message(
    hub: Hub, tid: str, sender: Sender, error: type[AgentNetworkError], **kw: Any
) -> str:
    return await refused(
        hub, tid, error, type=EV_MESSAGE, data={"content": "x"}, sender=sender, **kw
    )


async def consistent(hub: Hub, tid: str) -> ThreadState:
    """The live state, checked against the fold of the stored WAL."""
    live = await hub.state(tid)
    assert live == fold(tid, await hub.read(tid))
    return live


async def types(hub: Hub, tid: str) -> list[str]:
    return [e.type for e in await hub.read(tid)]


# ------------------------------------------------------------------------------ open threads


@pytest.mark.anyio
async def test_open_thread_without_knobs_behaves_as_before(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = new_id("thr")
        await hub.append(
            tid,
            type=EV_THREAD_CREATED,
            data={"title": "t", "team_id": "team_x", "adapter": "open", "agent_budget": 4},
            sender=SYSTEM,
        )
        state = await consistent(hub, tid)
        assert (state.status, state.adapter, state.participants) == ("open", "open", ())
        # anyone, any order, any audience: membership of open threads is the services' business
        await say(hub, tid, BOB)
        await say(hub, tid, OUTSIDER, audience=["someone_else"])
        await say(hub, tid, DAVE)
        assert may_speak(await hub.state(tid), OUTSIDER)
        await hub.append(tid, type=EV_THREAD_CLOSED, data={}, sender=SYSTEM)
        state = await consistent(hub, tid)
        assert state.status == "closed" and state.messages == 3
        await refused_message(hub, tid, BOB, ThreadClosedError)
        assert await hub.sweep(time.time() + 10**6) == []


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"adapter": "no_such_adapter"}, "unknown adapter"),
        ({"adapter": "consulting", "participants": [["agent", "a"]]}, "exactly 2"),
        (
            {
                "adapter": "consulting",
                "participants": [["agent", "a"], ["agent", "b"], ["user", "c"]],
            },
            "exactly 2",
        ),
        ({"adapter": "discussion", "participants": [["agent", "a"]]}, "at least 2"),
        ({"adapter": "conversation", "participants": [["robot", "a"], ["agent", "b"]]}, "kind"),
        ({"adapter": "conversation", "participants": [["agent", "a"], ["agent", "a"]]}, "twice"),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "initiator": ["agent", "z"],
            },
            "initiator",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "invitees": [["agent", "a"]],
            },
            "initiator does not ack",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "invitees": [["agent", "q"]],
            },
            "not a participant",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "ttl": -1,
            },
            "ttl",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "ack_timeout": "soon",
            },
            "ack_timeout",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "expectations": [{"kind": "reply_later", "seconds": 5}],
            },
            "expectation kind",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "expectations": [{"kind": "reply_within", "seconds": 5, "handler": "shout"}],
            },
            "handler",
        ),
        (
            {
                "adapter": "conversation",
                "participants": [["agent", "a"], ["agent", "b"]],
                "expectations": [
                    {"kind": "reply_within", "seconds": 5},
                    {"kind": "reply_within", "seconds": 9},
                ],
            },
            "unique",
        ),
        (
            {
                "adapter": "discussion",
                "participants": [["agent", "a"], ["agent", "b"]],
                "order": ["a"],
            },
            "order",
        ),
        ({"adapter": "workflow", "participants": [["agent", "a"], ["agent", "b"]]}, "graph"),
        ({"adapter": "open", "agent_budget": -3}, "agent_budget"),
    ],
)
@pytest.mark.anyio
async def test_bad_thread_created_knobs_are_refused_and_nothing_is_written(
    db: Path, data: dict[str, Any], fragment: str
) -> None:
    async with running_hub(db) as hub:
        tid = new_id("thr")
        with pytest.raises(InvalidRequestError) as info:
            await hub.append(tid, type=EV_THREAD_CREATED, data=data, sender=SYSTEM)
        assert fragment in info.value.message
        assert await hub.read(tid) == []
        assert (await hub.state(tid)).last_seq == 0
        # the hub keeps serving
        ok, _ = await open_thread(hub, "conversation", ALICE, BOB)
        await say(hub, ok, ALICE)


# ------------------------------------------------------------------------------ consulting


@pytest.mark.anyio
async def test_consulting_one_question_one_reply_then_closes(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "consulting", ALICE, BOB)
        state = await consistent(hub, tid)
        assert (state.status, state.expected_speaker) == ("active", ALICE.id)
        assert may_speak(state, ALICE) and not may_speak(state, BOB)

        await refused_message(hub, tid, BOB, NotYourTurnError)  # respondent first
        await refused_message(hub, tid, OUTSIDER, ProtocolViolationError)
        q = await say(hub, tid, ALICE, "What matters most in distributed systems?")
        state = await consistent(hub, tid)
        assert state.expected_speaker == BOB.id
        assert may_speak(state, BOB) and not may_speak(state, ALICE)
        msg = await refused_message(hub, tid, ALICE, NotYourTurnError)  # a second question
        assert "one question" in msg

        r = await say(hub, tid, BOB, "Fault tolerance.", causation_id=q.id)
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "consulting_complete")
        assert state.closing is not None and state.closing.id == r.id
        assert not may_speak(state, ALICE) and not may_speak(state, BOB)
        for sender in (ALICE, BOB):  # anything after the reply is refused
            await refused_message(hub, tid, sender, ThreadClosedError)

        written = await hub.sweep(epoch(r.created_at))
        assert [(e.type, e.data["reason"], e.causation_id) for e in written] == [
            (EV_THREAD_CLOSED, "consulting_complete", r.id)
        ]
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closed", "consulting_complete")
        assert await types(hub, tid) == [
            EV_THREAD_CREATED,
            EV_MESSAGE,
            EV_MESSAGE,
            EV_THREAD_CLOSED,
        ]
        assert await hub.sweep(time.time() + 10**6) == []


# ------------------------------------------------------------------------------ conversation


@pytest.mark.anyio
async def test_conversation_free_turns_until_an_explicit_close(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "conversation", ALICE, DAVE)
        state = await consistent(hub, tid)
        assert state.expected_speaker is None
        for sender in (ALICE, ALICE, DAVE, ALICE, DAVE, DAVE):
            assert may_speak(await hub.state(tid), sender)
            await say(hub, tid, sender)
        await refused_message(hub, tid, BOB, ProtocolViolationError)  # not a participant
        assert not may_speak(await hub.state(tid), BOB)
        # participants close through thread.closing; thread.closed is the hub's (system) step
        await refused(hub, tid, ProtocolViolationError, type=EV_THREAD_CLOSED, data={}, sender=DAVE)
        closing = await hub.append(
            tid, type=EV_THREAD_CLOSING, data={"reason": "done talking"}, sender=DAVE
        )
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "done talking")
        await refused_message(hub, tid, ALICE, ThreadClosedError)
        written = await hub.sweep(epoch(closing.created_at), thread_ids=[tid])
        assert [(e.type, e.data) for e in written] == [
            (EV_THREAD_CLOSED, {"reason": "done talking"})
        ]
        state = await consistent(hub, tid)
        assert (state.status, state.messages) == ("closed", 6)


@pytest.mark.anyio
async def test_runaway_budget_still_applies_to_protocol_threads(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "conversation", ALICE, BOB, agent_budget=2)
        await say(hub, tid, ALICE)
        await say(hub, tid, BOB)
        assert not may_speak(await hub.state(tid), ALICE)
        await refused_message(hub, tid, ALICE, RunawayBudgetError)


# ------------------------------------------------------------------------------ discussion


@pytest.mark.anyio
async def test_discussion_round_robin_starts_with_the_creator_and_wraps(db: Path) -> None:
    async with running_hub(db) as hub:
        # the initiator is listed last: the order still starts with it
        tid, _ = await open_thread(
            hub, "discussion", BOB, CAROL, ALICE, initiator=who(ALICE), agent_budget=100
        )
        expected = [ALICE, BOB, CAROL, ALICE, BOB, CAROL, ALICE]
        for turn, speaker in enumerate(expected):
            state = await consistent(hub, tid)
            assert state.expected_speaker == speaker.id, turn
            allowed = {a.id for a in (ALICE, BOB, CAROL) if may_speak(state, a)}
            assert allowed == {speaker.id}
            for other in (ALICE, BOB, CAROL):
                if other != speaker:
                    msg = await refused_message(hub, tid, other, NotYourTurnError)
                    assert speaker.id in msg
            await say(hub, tid, speaker, f"turn {turn}")
        assert (await consistent(hub, tid)).messages == len(expected)


@pytest.mark.anyio
async def test_discussion_with_an_explicit_order(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub,
            "discussion",
            ALICE,
            BOB,
            CAROL,
            order=[CAROL.id, ALICE.id, BOB.id],
            names={"carol": CAROL.id},
        )
        msg = await refused_message(hub, tid, ALICE, NotYourTurnError)
        assert f"carol ({CAROL.id})'s turn" in msg  # named where the thread names it
        for speaker in (CAROL, ALICE, BOB, CAROL):
            await say(hub, tid, speaker)
        assert (await consistent(hub, tid)).expected_speaker == ALICE.id


# ------------------------------------------------------------------------------ lifecycle


@pytest.mark.anyio
async def test_invited_until_every_invitee_acks(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub, "discussion", ALICE, BOB, DAVE, invitees=[who(BOB), who(DAVE)]
        )
        state = await consistent(hub, tid)
        assert state.status == "invited"
        assert state.pending_acks == (who(BOB), who(DAVE))
        assert state.expected_speaker is None and not may_speak(state, ALICE)
        msg = await refused_message(hub, tid, ALICE, ProtocolViolationError)
        assert BOB.id in msg and DAVE.id in msg
        for stranger in (ALICE, OUTSIDER):  # the initiator and outsiders have nothing to ack
            await refused(
                hub, tid, ProtocolViolationError, type=EV_THREAD_ACK, data={}, sender=stranger
            )
        await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=BOB)
        await refused(hub, tid, ProtocolViolationError, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert (await consistent(hub, tid)).status == "invited"
        ack = await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=DAVE)
        state = await consistent(hub, tid)
        assert (state.status, state.pending_acks) == ("active", ())
        assert state.active_since is not None and state.active_since.id == ack.id
        assert state.expected_speaker == ALICE.id and may_speak(state, ALICE)
        await say(hub, tid, ALICE)
        await refused(hub, tid, ProtocolViolationError, type=EV_THREAD_REJECT, data={}, sender=BOB)


@pytest.mark.anyio
async def test_open_adapter_thread_with_invitees_becomes_open(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "open", ALICE, BOB, invitees=[who(BOB)])
        assert (await hub.state(tid)).status == "invited"
        await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert (await consistent(hub, tid)).status == "open"


@pytest.mark.anyio
async def test_a_rejection_closes_the_thread(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub, "consulting", ALICE, BOB, invitees=[who(BOB)], ack_timeout=60
        )
        reject = await hub.append(tid, type=EV_THREAD_REJECT, data={"reason": "busy"}, sender=BOB)
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closing", "invite_rejected")
        assert who(BOB) not in state.pending_acks  # Bob answered (no)
        written = await hub.sweep(epoch(reject.created_at) + 10**6)
        # closing is finished; the ack timeout no longer applies
        assert [(e.type, e.data["reason"]) for e in written] == [
            (EV_THREAD_CLOSED, "invite_rejected")
        ]
        assert (await consistent(hub, tid)).status == "closed"


@pytest.mark.anyio
async def test_ack_timeout_closes_an_invited_thread(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, created = await open_thread(
            hub, "conversation", ALICE, BOB, invitees=[who(BOB)], ack_timeout=30
        )
        t0 = epoch(created.created_at)
        assert await hub.sweep(t0 + 29.9, thread_ids=[tid]) == []
        assert (await hub.state(tid)).status == "invited"
        written = await hub.sweep(t0 + 30)
        assert [(e.type, e.data["reason"]) for e in written] == [
            (EV_THREAD_CLOSING, "invite_timeout"),
            (EV_THREAD_CLOSED, "invite_timeout"),
        ]
        assert written[0].data["missing"] == [list(who(BOB))]
        assert all(e.sender_kind == "system" and e.sender_org_id == ORG for e in written)
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closed", "invite_timeout")
        await refused(hub, tid, ThreadClosedError, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert await hub.sweep(t0 + 10**6) == []


@pytest.mark.anyio
async def test_acking_in_time_cancels_the_ack_timeout(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, created = await open_thread(
            hub, "conversation", ALICE, BOB, invitees=[who(BOB)], ack_timeout=30
        )
        await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert await hub.sweep(epoch(created.created_at) + 10**6, thread_ids=[tid]) == []
        assert (await consistent(hub, tid)).status == "active"


@pytest.mark.anyio
async def test_ttl_closes_the_thread(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, created = await open_thread(hub, "conversation", ALICE, BOB, ttl=3600)
        await say(hub, tid, ALICE)
        t0 = epoch(created.created_at)
        assert await hub.sweep(t0 + 3599) == []
        written = await hub.sweep(t0 + 3600)
        assert [(e.type, e.data["reason"], e.idempotency_key) for e in written] == [
            (EV_THREAD_CLOSING, "ttl_expired", "lifecycle:ttl_expired"),
            (EV_THREAD_CLOSED, "ttl_expired", "lifecycle:closed"),
        ]
        assert (await consistent(hub, tid)).close_reason == "ttl_expired"
        await refused_message(hub, tid, BOB, ThreadClosedError)
        assert await hub.sweep(t0 + 7200) == []


@pytest.mark.anyio
async def test_system_may_close_any_thread_directly(db: Path) -> None:
    """The path services use (network close): thread.closed from the system in any state."""
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "discussion", ALICE, BOB, invitees=[who(BOB)])
        await hub.append(
            tid, type=EV_THREAD_CLOSED, data={"reason": "network_closed"}, sender=SYSTEM
        )
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closed", "network_closed")


@pytest.mark.anyio
async def test_the_sweeper_finds_deadlines_after_a_restart(db: Path) -> None:
    """A thread created before a restart is in no cache: the first sweep scans the store."""
    async with running_hub(db) as hub:
        tid, created = await open_thread(hub, "conversation", ALICE, BOB, ttl=10)
        consult, _ = await open_thread(hub, "consulting", ALICE, BOB)
        await say(hub, consult, ALICE)
        await say(hub, consult, BOB)  # closing; never finished before the "crash"
    async with running_hub(db) as hub:
        written = await hub.sweep(epoch(created.created_at) + 11)
        closed = {(e.thread_id, e.data["reason"]) for e in written if e.type == EV_THREAD_CLOSED}
        assert {(tid, "ttl_expired"), (consult, "consulting_complete")} <= closed
        assert (await consistent(hub, tid)).status == "closed"
        assert (await consistent(hub, consult)).status == "closed"


@pytest.mark.anyio
async def test_the_background_sweeper_closes_threads_on_its_own(db: Path) -> None:
    async with running_hub(db, sweep_interval=0.05) as hub:
        tid, _ = await open_thread(hub, "consulting", ALICE, BOB, ttl=3600)
        await say(hub, tid, ALICE)
        await say(hub, tid, BOB)
        with anyio.fail_after(20):
            while (await hub.state(tid)).status != "closed":
                await hub.wait_for(tid, (await hub.state(tid)).last_seq, 1)
        assert (await consistent(hub, tid)).close_reason == "consulting_complete"
        short, _ = await open_thread(hub, "conversation", ALICE, BOB, ttl=0.01)
        with anyio.fail_after(20):
            while (await hub.state(short)).status != "closed":
                await hub.wait_for(short, (await hub.state(short)).last_seq, 1)
        assert (await consistent(hub, short)).close_reason == "ttl_expired"


# ------------------------------------------------------------------------------ expectations


@pytest.mark.anyio
async def test_reply_within_audit_fires_once_per_unanswered_message(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub, "conversation", ALICE, BOB, expectations=[reply_within(30, name="quick")]
        )
        q1 = await say(hub, tid, ALICE, "first")
        await say(hub, tid, ALICE, "still there?")  # same speaker: the deadline runs from q1
        t1 = epoch(q1.created_at)
        assert await hub.sweep(t1 + 29) == []
        written = await hub.sweep(t1 + 30)
        assert len(written) == 1
        v = written[0]
        assert v.type == EV_EXPECTATION_VIOLATED
        assert v.causation_id == q1.id and v.idempotency_key == f"expect:quick:{q1.id}"
        assert {k: v.data[k] for k in ("name", "kind", "handler", "about", "about_seq")} == {
            "name": "quick",
            "kind": "reply_within",
            "handler": "audit",
            "about": q1.id,
            "about_seq": q1.seq,
        }
        assert await hub.sweep(t1 + 10**6) == []  # exactly once
        assert (await consistent(hub, tid)).status == "active"  # audit does not close
        r = await say(hub, tid, BOB, "here")  # a reply; now BOB's message awaits an answer
        written = await hub.sweep(epoch(r.created_at) + 31)
        assert [(e.type, e.data["about"]) for e in written] == [(EV_EXPECTATION_VIOLATED, r.id)]


@pytest.mark.anyio
async def test_notify_handler_writes_a_notice_in_the_thread(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub, "consulting", ALICE, BOB, expectations=[reply_within(5, "notify")]
        )
        q = await say(hub, tid, ALICE, "?")
        written = await hub.sweep(epoch(q.created_at) + 5)
        assert [e.type for e in written] == [EV_EXPECTATION_VIOLATED, EV_NOTIFY]
        notice = written[1]
        assert notice.sender_kind == "system" and notice.audience is None
        assert ALICE.id in notice.data["text"] and notice.data["expectation"] == "reply_within"
        assert await hub.sweep(epoch(q.created_at) + 10**6) == []
        # the respondent may still answer: notify does not close
        await say(hub, tid, BOB, "!")
        assert (await consistent(hub, tid)).status == "closing"


@pytest.mark.anyio
async def test_a_notice_lost_in_a_crash_is_written_by_the_next_sweep(db: Path) -> None:
    """The violation committed but the process died before its notice: nothing fires twice,
    the notice still comes."""
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub, "conversation", ALICE, BOB, expectations=[max_silence(60, "notify", name="idle")]
        )
        m = await say(hub, tid, ALICE)
        due = await hub.sweep(epoch(m.created_at) - 1)  # nothing yet
        assert due == []
        # what the sweeper wrote before "crashing": the violation only
        violation = next_due(await hub.state(tid), epoch(m.created_at) + 60)
        assert violation is not None and violation.type == EV_EXPECTATION_VIOLATED
        await hub.append(
            tid,
            type=violation.type,
            data=violation.data,
            sender=Sender("system", "hub", ORG),
            idempotency_key=violation.key,
        )
    async with running_hub(db) as hub:
        written = await hub.sweep(epoch(m.created_at) + 60)
        assert [(e.type, e.idempotency_key) for e in written] == [
            (EV_NOTIFY, f"notify:idle:{m.id}")
        ]
        assert await hub.sweep(epoch(m.created_at) + 10**6) == []
        assert [t for t in await types(hub, tid) if t == EV_EXPECTATION_VIOLATED] == [
            EV_EXPECTATION_VIOLATED
        ]


@pytest.mark.anyio
async def test_auto_close_handler_closes_with_the_expectation_name(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub,
            "discussion",
            ALICE,
            BOB,
            CAROL,
            expectations=[turn_within(120, "auto_close", name="slow_turn")],
        )
        await say(hub, tid, ALICE)
        b = await say(hub, tid, BOB)
        state = await hub.state(tid)
        assert state.expected_speaker == CAROL.id
        assert await hub.sweep(epoch(b.created_at) + 119) == []
        written = await hub.sweep(epoch(b.created_at) + 120)
        assert [e.type for e in written] == [EV_EXPECTATION_VIOLATED, EV_THREAD_CLOSED]
        assert written[0].data["about"] == b.id
        state = await consistent(hub, tid)
        assert (state.status, state.close_reason) == ("closed", "expectation_violated:slow_turn")
        await refused_message(hub, tid, CAROL, ThreadClosedError)


@pytest.mark.anyio
async def test_max_silence_counts_from_activation_then_from_the_last_message(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub,
            "conversation",
            ALICE,
            BOB,
            invitees=[who(BOB)],
            expectations=[max_silence(100, name="quiet")],
        )
        ack = await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=BOB)
        written = await hub.sweep(epoch(ack.created_at) + 100)
        assert [(e.type, e.data["about"]) for e in written] == [(EV_EXPECTATION_VIOLATED, ack.id)]
        m = await say(hub, tid, BOB)
        assert await hub.sweep(epoch(m.created_at) + 99) == []
        written = await hub.sweep(epoch(m.created_at) + 100)
        assert [(e.type, e.data["about"]) for e in written] == [(EV_EXPECTATION_VIOLATED, m.id)]


@pytest.mark.anyio
async def test_acks_within_fires_while_invited_only(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, created = await open_thread(
            hub,
            "conversation",
            ALICE,
            BOB,
            invitees=[who(BOB)],
            expectations=[acks_within(10, "notify")],
        )
        written = await hub.sweep(epoch(created.created_at) + 10)
        assert [e.type for e in written] == [EV_EXPECTATION_VIOLATED, EV_NOTIFY]
        assert BOB.id in written[1].data["text"]
        await hub.append(tid, type=EV_THREAD_ACK, data={}, sender=BOB)
        late, _ = await open_thread(
            hub, "conversation", ALICE, BOB, invitees=[who(BOB)], expectations=[acks_within(10)]
        )
        await hub.append(late, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert await hub.sweep(time.time() + 10**6, thread_ids=[late]) == []


@pytest.mark.anyio
async def test_each_violation_fires_exactly_once_across_restarts(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(
            hub,
            "conversation",
            ALICE,
            BOB,
            expectations=[reply_within(10, "notify"), max_silence(20)],
        )
        m = await say(hub, tid, ALICE)
        t = epoch(m.created_at)
        first = await hub.sweep(t + 25)
        assert sorted(e.type for e in first) == sorted(
            [EV_EXPECTATION_VIOLATED, EV_NOTIFY, EV_EXPECTATION_VIOLATED]
        )
        live = await consistent(hub, tid)
    for _ in range(2):  # close and reopen the hub on the same file, twice
        async with running_hub(db) as hub:
            assert await hub.state(tid) == live
            assert await hub.sweep(t + 10**6) == []
            assert await hub.sweep(t + 10**6, thread_ids=[tid]) == []
            keys = [e.idempotency_key for e in await hub.read(tid) if e.idempotency_key]
            assert len(keys) == len(set(keys)) == 3


# ------------------------------------------------------------------------------ audience


@pytest.mark.anyio
async def test_audience_must_name_participants(db: Path) -> None:
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "discussion", ALICE, BOB, CAROL)
        msg = await refused_message(
            hub, tid, ALICE, InvalidAudienceError, audience=[BOB.id, OUTSIDER.id]
        )
        assert OUTSIDER.id in msg and BOB.id not in msg
        await refused_message(hub, tid, ALICE, InvalidAudienceError, audience=[])
        env = await say(hub, tid, ALICE, "just for bob", audience=[BOB.id])
        assert env.audience == [BOB.id]
        # system envelopes are checked too
        await refused(
            hub,
            tid,
            InvalidAudienceError,
            type="notify",
            data={"text": "x"},
            sender=SYSTEM,
            audience=["usr_nobody"],
        )
        await hub.append(tid, type="notify", data={"text": "x"}, sender=SYSTEM, audience=[CAROL.id])
        await consistent(hub, tid)


# ------------------------------------------------------------------------------ registry


class BroadcastAdapter(BaseAdapter):
    """Only the initiator speaks (the example of ``register_adapter``'s docstring)."""

    name = "broadcast_test"

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        super().validate(state, proposal)
        assert state.initiator is not None
        if proposal.type == EV_MESSAGE and proposal.sender.id != state.initiator[1]:
            raise NotYourTurnError("only the initiator speaks in a broadcast thread")

    def expected_speaker(self, state: ThreadState) -> str | None:
        assert state.initiator is not None
        return state.initiator[1]


@pytest.mark.anyio
async def test_a_registered_custom_adapter_governs_its_threads(db: Path) -> None:
    register_adapter(BroadcastAdapter())
    async with running_hub(db) as hub:
        tid, _ = await open_thread(hub, "broadcast_test", ALICE, BOB, CAROL)
        await say(hub, tid, ALICE)
        await say(hub, tid, ALICE)
        await refused_message(hub, tid, BOB, NotYourTurnError)
        # BaseAdapter refuses unknown envelope types from participants
        await refused(hub, tid, ProtocolViolationError, type="vote", data={}, sender=BOB)
        state = await consistent(hub, tid)
        assert state.expected_speaker == ALICE.id and not may_speak(state, BOB)


@pytest.mark.anyio
async def test_appends_to_a_missing_thread_are_refused(db: Path) -> None:
    async with running_hub(db) as hub:
        tid = new_id("thr")
        await refused(hub, tid, NotFoundError, type=EV_THREAD_ACK, data={}, sender=BOB)
        assert not may_speak(await hub.state(tid), BOB)


@pytest.mark.anyio
async def test_only_the_system_writes_hub_envelope_types(db: Path) -> None:
    async with running_hub(db) as hub:
        legacy = new_id("thr")
        await hub.append(
            legacy,
            type=EV_THREAD_CREATED,
            data={"title": "t", "team_id": "team_x", "adapter": "open"},
            sender=SYSTEM,
        )
        forged = {"key": "k", "name": "x", "kind": "reply_within", "handler": "auto_close"}
        for tid in (legacy, (await open_thread(hub, "conversation", ALICE, BOB))[0]):
            for kind, data in (
                (EV_EXPECTATION_VIOLATED, forged),
                (EV_NOTIFY, {"text": "fake"}),
                ("thread.budget_set", {"agent_budget": 99}),
            ):
                await refused(hub, tid, ProtocolViolationError, type=kind, data=data, sender=ALICE)
            await refused(
                hub,
                tid,
                InvalidRequestError,
                type="thread.budget_set",
                data={"agent_budget": "lots"},
                sender=SYSTEM,
            )
            await refused(
                hub, tid, InvalidRequestError, type=EV_EXPECTATION_VIOLATED, data={}, sender=SYSTEM
            )
            assert (await consistent(hub, tid)).status in ("open", "active")


@pytest.mark.anyio
async def test_a_running_sweeper_closes_a_closing_thread_at_once(db: Path) -> None:
    """The commit that begins closing pokes the sweeper: ``thread.closed`` follows without
    waiting for the sweep interval (an hour here; the bound below only detects a hang)."""
    async with running_hub(db, sweep_interval=3600) as hub:
        tid, _ = await open_thread(hub, "consulting", ALICE, BOB)
        q = await say(hub, tid, ALICE, "Ready?")
        r = await say(hub, tid, BOB, "Yes.", causation_id=q.id)
        with anyio.fail_after(30):
            while (await hub.state(tid)).status != "closed":
                await hub.wait_for(tid, r.seq, 1.0)
        envs = await hub.read(tid)
        assert (envs[-1].type, envs[-1].data["reason"], envs[-1].causation_id) == (
            EV_THREAD_CLOSED,
            "consulting_complete",
            r.id,
        )
        assert (await consistent(hub, tid)).status == "closed"
