"""The runner's view of a thread, over :mod:`agent_network.protocol`: who takes a turn after an
envelope, who a reply goes to, whether an agent may speak (also from the REST view of a thread),
and the workflow tools offered to the model (as pydantic-ai tools and as a text convention).

Everything here is pure (no I/O); the in-process runner (``runtime/runner.py``) and the remote
runner (``runtime/remote.py``) share it. The behaviour is described in the runner's module
docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic_ai import Tool

from agent_network.errors import InvalidRequestError
from agent_network.model.envelope import Sender
from agent_network.protocol.adapters.graph import (
    Finish,
    GraphError,
    Handoff,
    ToolSpec,
    Turn,
    tool_call,
)
from agent_network.protocol.adapters.workflow import WorkflowState, tools_for
from agent_network.protocol.knobs import LIVE_STATUSES, STATUS_ACTIVE
from agent_network.protocol.turns import turn_takers, visible_to
from agent_network.services.jobs import PASS_REPLY, handoff_targets, passes_turn, reply_audience

if TYPE_CHECKING:
    from agent_network.protocol.state import ThreadState

__all__ = [
    "HANDOFF_TOOL",
    "PASS_REPLY",
    "ToolBox",
    "graph_tools",
    "passes_turn",
    "reply_audience",
    "thread_may_speak",
    "toolbox_for",
    "toolbox_from",
    "turn_takers",
    "visible_to",
]

HANDOFF_TOOL = "handoff"
"""Name of the generic tool every workflow speaker gets: ``handoff(target, reason)``."""

MAX_TOOL_ARG = 500  # characters kept of a tool argument


def thread_may_speak(
    thread: Mapping[str, Any], agent_id: str, *, answers_person: bool = False
) -> bool:
    """:func:`may_speak` from the REST view of a thread (``GET /threads/{id}``), for the remote
    runner: ``status`` is ``open`` or ``active``; if ``participants`` is a non-empty list (of
    ``[kind, id]`` pairs or ``{"kind", "id"}`` objects) the agent is one; ``expected_speaker``
    is None or the agent; no ``pending_acks``; and the runaway budget
    (``consecutive_agent_messages`` < ``agent_budget``) is not spent — unless the agent
    ``answers_person`` (its reply answers a person's message) and the budget is not 0, as the
    hub decides (:func:`~agent_network.protocol.lifecycle.budget_spent`). A field the server
    does not send is not checked (older servers)."""
    if thread.get("status") not in LIVE_STATUSES:
        return False
    participants = thread.get("participants") or []
    if participants and agent_id not in {participant_id(p) for p in participants}:
        return False
    expected = thread.get("expected_speaker")
    if expected is not None and expected != agent_id:
        return False
    if thread.get("pending_acks"):
        return False
    budget = thread.get("agent_budget")
    spent = thread.get("consecutive_agent_messages") or 0
    if answers_person and isinstance(budget, int) and budget > 0:
        return True
    return not (isinstance(budget, int) and spent >= budget)


def participant_id(p: Any) -> str:
    """The id of a participant given as ``[kind, id]``, ``{"kind", "id"}`` or an id."""
    if isinstance(p, Mapping):
        return str(p.get("id", ""))
    if isinstance(p, list | tuple) and len(p) == 2:
        return str(p[1])
    return str(p)


def handoff_names(knob: Any, people: Sequence[tuple[str, str]]) -> dict[str, str]:
    """``name -> participant id`` for resolving a handoff target named by a model (pure).

    ``knob``: the thread's ``names`` knob, bound to ids when the thread was created (it wins);
    ``people``: ``(participant id, current display name)`` pairs. A display name joins only
    when exactly one participant has it and the knob does not already use it: a display name
    is chosen by its owner, so a participant renaming itself can neither take over a name the
    thread bound to someone else nor make two participants answer to one name."""
    names: dict[str, str] = {}
    holders: dict[str, set[str]] = {}
    for pid, name in people:
        if name:
            holders.setdefault(name, set()).add(pid)
    names.update({name: next(iter(ids)) for name, ids in holders.items() if len(ids) == 1})
    if isinstance(knob, Mapping):
        names.update({str(k): str(v) for k, v in knob.items()})
    return names


# ------------------------------------------------------------------ workflow tools

_TAG_BODY = r"\[\s*(?P<name>[A-Za-z_][\w.\-]*)\s*(?::\s*(?P<arg>[^\[\]\n]*?))?\s*\]"
_TAG = re.compile(_TAG_BODY + r"\W*$")
# a tag ending a line (a small model goes on with noise or another turn after it)
_LINE_TAG = re.compile(_TAG_BODY + r"[^\w\n]*?(?=\n|<\||$)")


@dataclass
class ToolBox:
    """The tools one speaker gets in one workflow turn, and the calls it made.

    ``specs`` are the graph's tools for the speaker; ``handoff_targets`` the participant names
    (or ids) a generic ``handoff`` may name (empty: no generic handoff); ``resolve`` maps a
    name or id to a participant id (None when it is neither). Calls are recorded in ``calls``
    as :func:`~agent_network.protocol.tool_call` entries: a spec with ``handoff`` gives
    ``Handoff(target=spec.handoff, reason=<argument>)``, with ``finish`` gives
    ``Finish(summary=<argument>, reason=spec.finish)``, else the plain acknowledgement
    ``"ok"``; ``handoff(target, reason)`` gives ``Handoff(target, reason)``. At most one
    Handoff/Finish is recorded per turn (later ones are answered "already decided"); a plain
    tool is recorded once.
    """

    specs: tuple[ToolSpec, ...]
    handoff_targets: tuple[str, ...]
    resolve: Callable[[str], str | None]
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of every tool offered (the graph's, then ``handoff`` if offered)."""
        extra = (HANDOFF_TOOL,) if self.handoff_targets else ()
        return (*(s.name for s in self.specs), *extra)

    def __bool__(self) -> bool:
        return bool(self.names)

    def reset(self) -> None:
        """Forget the calls (a new attempt at the same turn)."""
        self.calls.clear()

    @property
    def decided(self) -> bool:
        """True once a Handoff or Finish was recorded."""
        return any(
            isinstance(c["result"], Mapping) and c["result"].get("kind") in ("handoff", "finish")
            for c in self.calls
        )

    def call(self, name: str, argument: str = "", target: str | None = None) -> str:
        """Run the tool ``name`` with its free-text ``argument`` (and ``target`` for
        ``handoff``); record it; return what the model is told."""
        argument = " ".join(argument.split())[:MAX_TOOL_ARG]
        if name == HANDOFF_TOOL and self.handoff_targets:
            who = (target or "").strip()
            if self.resolve(who) is None:
                return (
                    f"error: {who!r} is not a participant; hand off to one of "
                    f"{', '.join(self.handoff_targets)}"
                )
            if self.decided:
                return "already decided this turn; write your message now"
            args = {"target": who, "reason": argument}
            self.calls.append(tool_call(name, Handoff(who, argument), args=args))
            return f"ok: {who} speaks after your message; write your message now"
        spec = next((s for s in self.specs if s.name == name), None)
        if spec is None:
            return f"error: unknown tool {name!r}; tools: {', '.join(self.names)}"
        if spec.handoff is not None or spec.finish is not None:
            if self.decided:
                return "already decided this turn; write your message now"
            if spec.handoff is not None:
                result: Handoff | Finish = Handoff(spec.handoff, argument)
                self.calls.append(tool_call(name, result, args={"reason": argument}))
                return f"ok: {spec.handoff} speaks after your message; write your message now"
            assert spec.finish is not None
            self.calls.append(
                tool_call(name, Finish(argument, spec.finish), args={"summary": argument})
            )
            return "ok: the workflow ends with your message; write your message now"
        if all(c["name"] != name for c in self.calls):
            self.calls.append(tool_call(name, "ok", args={"note": argument} if argument else {}))
        return "ok; write your message now"

    def take_tags(self, text: str) -> str:
        """The text convention: strip trailing ``[tool]`` / ``[tool: argument]`` tags naming
        offered tools from ``text`` and call those tools (in the order written); returns the
        text without them. A small model often goes on after the tag (another turn, noise): when
        the text does not end with a tag, the first offered tag that ends a line ends the
        reply (what follows is dropped). For ``handoff`` the argument is ``target`` or
        ``target, reason``. Tags naming no offered tool are left in place."""
        found: list[tuple[str, str]] = []
        rest = text.rstrip()
        if _TAG.search(rest) is None:
            # no tag at the very end: the first offered tag that ends a line ends the reply
            first = next(
                (m for m in _LINE_TAG.finditer(rest) if m.group("name") in self.names), None
            )
            if first is not None:
                rest = rest[: first.end()].rstrip()
        while True:
            m = _TAG.search(rest)
            if m is None or m.group("name") not in self.names:
                break
            found.append((m.group("name"), (m.group("arg") or "").strip()))
            rest = rest[: m.start()].rstrip()
        for name, arg in reversed(found):
            if name == HANDOFF_TOOL:
                who, _, reason = arg.partition(",")
                self.call(name, reason.strip(), target=who.strip())
            else:
                self.call(name, arg)
        return rest

    def prompt_lines(self) -> list[str]:
        """How the tools are shown in the prompt (the text convention, one line per tool)."""
        if not self:
            return []
        lines = ["To use a tool, end your reply with its tag:"]
        for spec in self.specs:
            what = spec.description or spec.name.replace("_", " ")
            if spec.handoff is not None:
                tag = f"[{spec.name}: reason]"
            elif spec.finish is not None:
                tag = f"[{spec.name}: summary]"
            else:
                tag = f"[{spec.name}]"
            lines.append(f"- {what}: {tag}")
        if self.handoff_targets:
            lines.append(f"- pass the turn to {' or '.join(self.handoff_targets)}: [handoff: name]")
        return lines

    def pydantic_tools(self) -> list[Tool[None]]:
        """The same tools as pydantic-ai tools (for models that call tools)."""
        tools: list[Tool[None]] = []
        for spec in self.specs:
            tools.append(self._spec_tool(spec))
        if self.handoff_targets:

            def handoff(target: str, reason: str = "") -> str:
                return self.call(HANDOFF_TOOL, reason, target=target)

            tools.append(
                Tool(
                    handoff,
                    name=HANDOFF_TOOL,
                    description=(
                        "Pass the turn to another participant after your message. target: "
                        f"one of {', '.join(self.handoff_targets)}; reason: why."
                    ),
                    takes_ctx=False,
                )
            )
        return tools

    def _spec_tool(self, spec: ToolSpec) -> Tool[None]:
        name = spec.name
        if spec.handoff is not None:

            def with_reason(reason: str = "") -> str:
                return self.call(name, reason)

            hint = f" Hands the turn to {spec.handoff}. reason: what should change."
            return Tool(
                with_reason, name=name, description=spec.description + hint, takes_ctx=False
            )
        if spec.finish is not None:

            def with_summary(summary: str = "") -> str:
                return self.call(name, summary)

            hint = " Ends the workflow. summary: the outcome."
            return Tool(
                with_summary, name=name, description=spec.description + hint, takes_ctx=False
            )

        def plain(note: str = "") -> str:
            return self.call(name, note)

        return Tool(plain, name=name, description=spec.description or name, takes_ctx=False)


def _resolver(participants: Sequence[str], names: Mapping[str, str]) -> Callable[[str], str | None]:
    turn = Turn("", "", (), {}, "", tuple(participants), tuple(participants), 0, dict(names))

    def resolve(who: str) -> str | None:
        try:
            return turn.resolve(who)
        except GraphError:
            return None

    return resolve


def toolbox_for(state: ThreadState, agent_id: str) -> ToolBox:
    """The tools of ``agent_id`` in ``state``'s thread: the graph's (:func:`tools_for`) plus the
    generic ``handoff`` in an active workflow thread; an empty box elsewhere (the graph admits a
    Handoff in any workflow message, see ``protocol/adapters/graph.py``)."""
    if not isinstance(state.protocol, WorkflowState) or state.status != STATUS_ACTIVE:
        return ToolBox((), (), lambda _: None)
    names = dict(state.knobs.names)
    ids = state.participant_ids
    return ToolBox(
        tools_for(state, Sender("agent", agent_id, "")),
        handoff_targets(ids, names, agent_id),
        _resolver(ids, names),
    )


def graph_tools(created: Mapping[str, Any], agent_id: str) -> ToolBox:
    """:func:`toolbox_for` from the data of a workflow thread's ``thread.created`` envelope (for
    the remote runner, which has no folded state). An empty box for other adapters or a graph
    it cannot read."""
    from agent_network.protocol.adapters.graph import TransitionGraph
    from agent_network.protocol.knobs import parse_open

    if created.get("adapter") != "workflow":
        return ToolBox((), (), lambda _: None)
    try:
        request = parse_open(created)
        graph = TransitionGraph.from_dict(created.get("graph"))
    except InvalidRequestError:
        return ToolBox((), (), lambda _: None)
    names = dict(request.knobs.names)
    ids = request.participant_ids
    resolve = _resolver(ids, names)
    specs = tuple(
        s for s in graph.tools if s.speakers is None or agent_id in {resolve(x) for x in s.speakers}
    )
    return ToolBox(specs, handoff_targets(ids, names, agent_id), resolve)


def toolbox_from(
    specs: Sequence[Mapping[str, Any]],
    targets: Sequence[str],
    participants: Sequence[str],
    names: Mapping[str, str],
) -> ToolBox:
    """The :class:`ToolBox` of a job built by the server (``JobSpec``: the graph's tool specs
    as data, the handoff targets, the participant ids and ``name -> id``)."""
    return ToolBox(
        tuple(
            ToolSpec(
                str(s["name"]),
                str(s.get("description") or ""),
                tuple(s["speakers"]) if s.get("speakers") is not None else None,
                s.get("handoff"),
                s.get("finish"),
            )
            for s in specs
        ),
        tuple(targets),
        _resolver(list(participants), dict(names)),
    )
