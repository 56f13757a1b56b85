"""Hypothesis state machine over the real hub and a real SQLite file: random sequences of thread
opens (every adapter, with invitees, TTL, ack timeout and a max_silence expectation), sends
(legal and illegal: out of turn, strangers, bad audiences, handoffs), acks, rejects, closes,
context sets, sweeps at chosen times and hub restarts.

After every step, for every thread: the hub's live state equals ``fold(stored WAL)``; the WAL
holds exactly the envelopes a small independent reference model accepted (so no illegal send
ever reached it); status, close reason and expected speaker match the model; and ``may_speak``
agrees with the model for every actor.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent_network.errors import (
    AgentNetworkError,
    InvalidAudienceError,
    NotYourTurnError,
    ProtocolViolationError,
    ThreadClosedError,
)
from agent_network.hub import Hub
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.ids import new_id
from agent_network.protocol import Handoff, TransitionGraph, may_speak, tool_call
from agent_network.protocol.events import (
    EV_CONTEXT_SET,
    EV_EXPECTATION_VIOLATED,
    EV_MESSAGE,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
)
from agent_network.protocol.fold import fold
from agent_network.protocol.knobs import epoch
from agent_network.store.engine import create_engine, database_url, upgrade_schema

ORG = "org_fold"
SYSTEM = Sender("system", "key_fold", ORG)
POOL = (
    Sender("agent", "agt_a", ORG),
    Sender("agent", "agt_b", ORG),
    Sender("agent", "agt_c", ORG),
    Sender("user", "usr_d", ORG),
)
OUTSIDER = Sender("agent", "agt_x", ORG)
EVERYONE = (*POOL, OUTSIDER)
ADAPTERS = ("legacy", "open", "conversation", "consulting", "discussion", "wf_rr", "wf_seq")
OFFSETS = (0.0, 4.0, 5.0, 19.0, 20.0, 60.0, 100.0, 1000.0)

_template: Path | None = None


def template() -> Path:
    """One migrated SQLite file, copied for every example."""
    global _template
    if _template is None:
        path = Path(tempfile.mkdtemp(prefix="protocol-fold-")) / "template.db"

        async def init() -> None:
            engine = create_engine(database_url(path))
            await upgrade_schema(engine)
            await engine.dispose()

        anyio.run(init)
        _template = path
    return _template


@contextlib.asynccontextmanager
async def running_hub(path: Path) -> AsyncIterator[Hub]:
    engine = create_engine(database_url(path))
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            yield hub
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------ reference model


@dataclass
class Ref:
    """What the model expects of one thread (independent of the adapters' code)."""

    tid: str
    adapter: str
    members: list[Sender]
    initiator: Sender | None
    pending: list[str]
    status: str
    created_at: float
    ttl: float | None
    ack_timeout: float | None
    silence: float | None
    order: list[str] = field(default_factory=list)  # discussion / workflow order
    max_turns: int | None = None
    asked: bool = False  # consulting
    turns: int = 0  # discussion / workflow
    expected: str | None = None  # workflow
    close_reason: str | None = None
    activation: tuple[str, float] | None = None  # (env id, epoch)
    last_message: tuple[str, float] | None = None
    fired: set[str] = field(default_factory=set)
    log: list[tuple[str, str]] = field(default_factory=list)  # (type, sender id) in the WAL

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.members]

    @property
    def live(self) -> bool:
        return self.status in ("open", "active")

    def participant(self, actor: Sender) -> bool:
        return not self.members or actor.id in self.ids

    def expected_speaker(self) -> str | None:
        if not self.live:
            return None
        if self.adapter == "consulting":
            assert self.initiator is not None
            respondent = next(i for i in self.ids if i != self.initiator.id)
            return respondent if self.asked else self.initiator.id
        if self.adapter == "discussion":
            return self.order[self.turns % len(self.order)]
        if self.adapter in ("wf_rr", "wf_seq"):
            return self.expected
        return None

    def begin_closing(self, reason: str) -> None:
        if self.status not in ("closing", "closed"):
            self.status, self.close_reason = "closing", reason

    # ----------------------------------------------------------- predictions

    def message_error(
        self, sender: Sender, audience: list[str] | None, handoff: str | None
    ) -> type[AgentNetworkError] | None:
        if self.status in ("closed", "closing"):
            return ThreadClosedError
        if not self.participant(sender):
            return ProtocolViolationError
        if (
            self.members
            and audience is not None
            and (not audience or any(a not in self.ids for a in audience))
        ):
            return InvalidAudienceError
        if self.status == "invited":
            return ProtocolViolationError
        expected = self.expected_speaker()
        if expected is not None and sender.id != expected:
            return NotYourTurnError
        if self.adapter.startswith("wf_") and handoff is not None and handoff not in self.ids:
            return ProtocolViolationError
        return None

    def apply_message(self, sender: Sender, handoff: str | None, env: Envelope) -> None:
        self.last_message = (env.id, epoch(env.created_at))
        if self.adapter == "consulting":
            if self.asked:
                self.begin_closing("consulting_complete")
            self.asked = True
        elif self.adapter == "discussion":
            self.turns += 1
        elif self.adapter.startswith("wf_"):
            self.turns += 1
            nxt: str | None
            if handoff is not None:
                nxt = handoff
            else:
                i = self.order.index(sender.id)
                if self.adapter == "wf_rr":
                    nxt = self.order[(i + 1) % len(self.order)]
                else:
                    nxt = self.order[i + 1] if i + 1 < len(self.order) else None
            if nxt is None:
                self.begin_closing("sequence_complete")
            elif self.max_turns is not None and self.turns >= self.max_turns:
                self.begin_closing("max_turns")
            if self.status == "closing":
                self.expected = None
            else:
                self.expected = nxt

    def lifecycle_error(self, sender: Sender, kind: str) -> type[AgentNetworkError] | None:
        if self.status in ("closed", "closing"):
            return ThreadClosedError
        if not self.participant(sender):
            return ProtocolViolationError
        if kind in (EV_THREAD_ACK, EV_THREAD_REJECT) and (
            self.status != "invited" or sender.id not in self.pending
        ):
            return ProtocolViolationError
        if kind == EV_CONTEXT_SET and self.adapter not in ("legacy", "open", "wf_rr", "wf_seq"):
            return ProtocolViolationError
        return None

    def due(self, now: float) -> tuple[str, str] | None:
        """The next sweeper action at ``now``: (envelope type, reason or violation key)."""
        if self.status == "closed":
            return None
        if self.status == "closing":
            return (EV_THREAD_CLOSED, self.close_reason or "closed")
        found: list[tuple[float, str, str]] = []
        if self.silence is not None and self.live:
            about = self.last_message or self.activation
            assert about is not None
            if about[0] not in self.fired:
                found.append((about[1] + self.silence, EV_EXPECTATION_VIOLATED, about[0]))
        if self.status == "invited" and self.ack_timeout is not None:
            found.append((self.created_at + self.ack_timeout, EV_THREAD_CLOSING, "invite_timeout"))
        if self.ttl is not None:
            found.append((self.created_at + self.ttl, EV_THREAD_CLOSING, "ttl_expired"))
        due = sorted((f for f in found if f[0] <= now), key=lambda f: f[0])
        return (due[0][1], due[0][2]) if due else None


# ------------------------------------------------------------------------------ the machine


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="protocol-fold-run-"))
        self.path = self.dir / "hub.db"
        shutil.copyfile(template(), self.path)
        self._stack = contextlib.ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self.hub = self._open_hub()
        self.refs: list[Ref] = []

    def _open_hub(self) -> Hub:
        self._hub_cm = self.portal.wrap_async_context_manager(running_hub(self.path))
        return self._hub_cm.__enter__()

    def teardown(self) -> None:
        self._hub_cm.__exit__(None, None, None)
        self._stack.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    def attempt(
        self, ref: Ref, error: type[AgentNetworkError] | None, **append: Any
    ) -> Envelope | None:
        """Append; assert the refusal the model predicts (exact class) or the acceptance."""
        try:
            env: Envelope = self.call(self.hub.append, ref.tid, **append)
        except AgentNetworkError as exc:
            assert error is not None, f"refused {append['type']}: {exc.code} {exc.message}"
            assert exc.code == error.code, (type(exc), error, exc.message)
            return None
        assert error is None, f"accepted {append['type']} from {append['sender'].id}; {error}"
        ref.log.append((env.type, env.sender_id))
        return env

    # ----------------------------------------------------------- rules

    @precondition(lambda self: len(self.refs) < 5)
    @rule(
        adapter=st.sampled_from(ADAPTERS),
        data=st.data(),
        ttl=st.sampled_from([None, 20.0, 100.0]),
        ack_timeout=st.sampled_from([None, 5.0, 60.0]),
        silence=st.sampled_from([None, 19.0]),
    )
    def open_thread(
        self,
        adapter: str,
        data: st.DataObject,
        ttl: float | None,
        ack_timeout: float | None,
        silence: float | None,
    ) -> None:
        people = list(data.draw(st.permutations(POOL)))
        if adapter == "legacy":
            members: list[Sender] = []
        elif adapter in ("conversation", "consulting"):
            members = people[:2]
        else:
            members = people[: data.draw(st.integers(2 if adapter != "open" else 1, 4))]
        initiator = members[0] if members else None
        invitees = [m for m in members[1:] if data.draw(st.booleans())]
        knobs: dict[str, Any] = {
            "title": "t",
            "team_id": "team_x",
            "agent_budget": 1000,
            "adapter": "open" if adapter == "legacy" else adapter,
        }
        ref = Ref(
            tid=new_id("thr"),
            adapter=adapter,
            members=members,
            initiator=initiator,
            pending=[m.id for m in invitees],
            status="",
            created_at=0.0,
            ttl=ttl,
            ack_timeout=ack_timeout,
            silence=silence,
        )
        if members:
            knobs["participants"] = [[m.kind, m.id] for m in members]
        if invitees:
            knobs["invitees"] = [[m.kind, m.id] for m in invitees]
        if ttl is not None:
            knobs["ttl"] = ttl
        if ack_timeout is not None:
            knobs["ack_timeout"] = ack_timeout
        if silence is not None:
            knobs["expectations"] = [{"name": "quiet", "kind": "max_silence", "seconds": silence}]
        if adapter == "discussion":
            ref.order = [m.id for m in members]
        if adapter.startswith("wf_"):
            ref.order = [m.id for m in data.draw(st.permutations(members))]
            ref.expected = ref.order[0]
            if adapter == "wf_rr":
                ref.max_turns = data.draw(st.integers(1, 6))
                graph = TransitionGraph.round_robin(ref.order, max_turns=ref.max_turns)
            else:
                graph = TransitionGraph.sequence(ref.order)
            knobs["adapter"] = "workflow"
            knobs["graph"] = graph.to_dict()
        env: Envelope = self.call(
            self.hub.append, ref.tid, type=EV_THREAD_CREATED, data=knobs, sender=SYSTEM
        )
        ref.log.append((env.type, env.sender_id))
        ref.created_at = epoch(env.created_at)
        if invitees:
            ref.status = "invited"
        else:
            ref.status = "open" if adapter in ("legacy", "open") else "active"
            ref.activation = (env.id, ref.created_at)
        self.refs.append(ref)

    @initialize(
        adapters=st.lists(st.sampled_from(ADAPTERS), min_size=2, max_size=3),
        data=st.data(),
    )
    def first_threads(self, adapters: list[str], data: st.DataObject) -> None:
        for adapter in adapters:
            self.open_thread(
                adapter,
                data,
                data.draw(st.sampled_from([None, 20.0, 100.0])),
                data.draw(st.sampled_from([None, 5.0, 60.0])),
                data.draw(st.sampled_from([None, 19.0])),
            )

    @rule(
        data=st.data(),
        sender=st.sampled_from(EVERYONE),
        audience=st.sampled_from(["none", "member", "stranger", "empty"]),
        handoff=st.sampled_from([None, *(a.id for a in EVERYONE)]),
    )
    def send(self, data: st.DataObject, sender: Sender, audience: str, handoff: str | None) -> None:
        ref = data.draw(st.sampled_from(self.refs))
        aud: list[str] | None = {
            "none": None,
            "member": [ref.members[-1].id] if ref.members else None,
            "stranger": [OUTSIDER.id],
            "empty": [],
        }[audience]
        body: dict[str, Any] = {"content": "hi"}
        if handoff is not None:
            body["tool_calls"] = [tool_call("handoff", Handoff(handoff, "because"))]
        error = ref.message_error(sender, aud, handoff)
        env = self.attempt(ref, error, type=EV_MESSAGE, data=body, sender=sender, audience=aud)
        if env is not None:
            ref.apply_message(sender, handoff, env)

    @rule(data=st.data(), sender=st.sampled_from(EVERYONE), reject=st.booleans())
    def answer_invite(self, data: st.DataObject, sender: Sender, reject: bool) -> None:
        ref = data.draw(st.sampled_from(self.refs))
        kind = EV_THREAD_REJECT if reject else EV_THREAD_ACK
        env = self.attempt(
            ref, ref.lifecycle_error(sender, kind), type=kind, data={}, sender=sender
        )
        if env is None:
            return
        if reject:
            ref.begin_closing("invite_rejected")
            return
        ref.pending.remove(sender.id)
        if not ref.pending:
            ref.status = "open" if ref.adapter in ("legacy", "open") else "active"
            ref.activation = (env.id, epoch(env.created_at))

    @rule(data=st.data(), sender=st.sampled_from([*EVERYONE, SYSTEM]))
    def close(self, data: st.DataObject, sender: Sender) -> None:
        ref = data.draw(st.sampled_from(self.refs))
        if sender.kind == "system":  # the services' direct close (e.g. network closed)
            error = ThreadClosedError if ref.status == "closed" else None
            env = self.attempt(
                ref, error, type=EV_THREAD_CLOSED, data={"reason": "network_closed"}, sender=sender
            )
            if env is not None:
                ref.status, ref.close_reason = "closed", "network_closed"
            return
        error = ref.lifecycle_error(sender, EV_THREAD_CLOSING)
        env = self.attempt(ref, error, type=EV_THREAD_CLOSING, data={}, sender=sender)
        if env is not None:
            ref.begin_closing("closed")

    @rule(data=st.data(), sender=st.sampled_from(EVERYONE))
    def set_context(self, data: st.DataObject, sender: Sender) -> None:
        ref = data.draw(st.sampled_from(self.refs))
        error = ref.lifecycle_error(sender, EV_CONTEXT_SET)
        self.attempt(ref, error, type=EV_CONTEXT_SET, data={"values": {"k": 1}}, sender=sender)

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), everything=st.booleans())
    def sweep(self, data: st.DataObject, offset: float, everything: bool) -> None:
        ref = data.draw(st.sampled_from(self.refs))
        now = ref.created_at + offset
        ids = None if everything else [ref.tid]
        written: list[Envelope] = self.call(self.hub.sweep, now, thread_ids=ids)
        expected: list[tuple[str, str, str]] = []
        for r in self.refs if everything else [ref]:
            while (action := r.due(now)) is not None:
                kind, what = action
                r.log.append((kind, "hub"))
                expected.append((r.tid, kind, what))
                if kind == EV_THREAD_CLOSED:
                    r.status = "closed"
                elif kind == EV_THREAD_CLOSING:
                    r.begin_closing(what)
                else:
                    r.fired.add(what)
        got = [(e.thread_id, e.type, e.data.get("about") or e.data.get("reason")) for e in written]
        assert sorted(got) == sorted(expected)  # across threads the hub goes by thread id
        for tid in {t for t, _, _ in expected}:  # within a thread, in the model's order
            assert [g for g in got if g[0] == tid] == [x for x in expected if x[0] == tid]

    @rule()
    def restart(self) -> None:
        self._hub_cm.__exit__(None, None, None)
        self.hub = self._open_hub()

    # ----------------------------------------------------------- invariants

    @invariant()
    def live_state_is_the_fold_of_the_wal_and_matches_the_model(self) -> None:
        for ref in self.refs:
            live = self.call(self.hub.state, ref.tid)
            envs: list[Envelope] = self.call(self.hub.read, ref.tid)
            again = fold(ref.tid, envs)
            assert live == again and hash(live) == hash(again)
            assert [(e.type, e.sender_id) for e in envs] == ref.log
            assert (live.status, live.expected_speaker) == (ref.status, ref.expected_speaker())
            if ref.status in ("closing", "closed"):
                assert live.close_reason == ref.close_reason
            for actor in EVERYONE:
                assert may_speak(live, actor) == (ref.message_error(actor, None, None) is None)


ProtocolMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProtocolFold = ProtocolMachine.TestCase
