"""The workflow transition graph: who speaks first, who speaks next, when the workflow ends.

A :class:`TransitionGraph` holds an initial speaker (default: the thread's initiator), ordered
:class:`Transition` rules (``when`` a :class:`Condition` matches the turn just taken, ``then`` a
:class:`Target` names the next speaker or terminates), a ``priority`` per rule (higher first; equal
priorities keep their order), a ``default_target`` (when no rule matches; default
``terminate("no_transition")``) and ``max_turns`` (the workflow closes with ``max_turns`` after
that many messages). The graph may declare ``tools`` for the participants' models (e.g.
``request_revision`` returning a Handoff, ``approve`` matched by a ``tool_called`` rule).

Routing of one message, in order: a :class:`Finish` returned by a tool terminates (its reason);
a :class:`Handoff` picks the next speaker (overriding static rules); else the first matching rule;
else the default target. Participants are named by id or by a name of the thread's ``names``
knob (``Handoff(target="writer")``).

Built-in conditions (JSON ``kind``): ``always``, ``from_speaker`` (``agent``), ``tool_called``
(``tool``), ``context_equals`` (``key``, ``value``). Built-in targets: ``agent`` (``agent``),
``round_robin`` (next after the speaker in the graph's ``order``, default the participant order),
``stay``, ``revert_to_initiator``, ``terminate`` (``reason``). Add your own with
:func:`register_condition` / :func:`register_target`::

    @register_condition
    @dataclass(frozen=True)
    class ContentContains(Condition):
        kind: ClassVar[str] = "content_contains"
        text: str

        def matches(self, turn: Turn) -> bool:
            return self.text in turn.content

Everything round-trips through JSON: ``TransitionGraph.from_json(g.to_json()) == g``.
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from pydantic import TypeAdapter, ValidationError

from agent_network.errors import InvalidRequestError, ProtocolViolationError
from agent_network.protocol.knobs import REASON_FINISHED, REASON_NO_TRANSITION


class GraphError(ProtocolViolationError):
    """A graph routed to someone who is not a participant (or a custom rule failed)."""


@dataclass(frozen=True)
class Turn:
    """The turn just taken, as conditions and targets see it.

    ``speaker`` (id) sent a message with ``content`` after calling ``tools`` (names, in order);
    ``context`` is the workflow context at that moment; ``number`` counts messages (1-based,
    this one included); ``participants`` are the thread's participant ids; ``order`` is the
    round-robin order (ids); ``names`` maps participant names to ids.
    """

    speaker: str
    content: str
    tools: tuple[str, ...]
    context: Mapping[str, Any]
    initiator: str
    participants: tuple[str, ...]
    order: tuple[str, ...]
    number: int
    names: Mapping[str, str]

    def resolve(self, who: str) -> str:
        """The participant id for ``who`` (an id or a name); GraphError when it is neither."""
        if who in self.participants:
            return who
        pid = self.names.get(who)
        if pid is not None and pid in self.participants:
            return pid
        raise GraphError(f"workflow target {who!r} is not a participant of this thread")


@dataclass(frozen=True)
class Terminated:
    """Routing result: the workflow ends with ``reason`` (and an optional ``summary``)."""

    reason: str
    summary: str | None = None


Route = str | Terminated
"""Next speaker id, or the end of the workflow."""


# ------------------------------------------------------------------ tool results


@dataclass(frozen=True)
class Handoff:
    """A tool result that picks the next speaker (``target``: participant id or name)."""

    target: str
    reason: str = ""

    def to_data(self) -> dict[str, Any]:
        """JSON form, as stored in a message's ``tool_calls[i].result``."""
        return {"kind": "handoff", "target": self.target, "reason": self.reason}


@dataclass(frozen=True)
class Finish:
    """A tool result that terminates the workflow with ``reason`` (default ``finished``)."""

    summary: str = ""
    reason: str = REASON_FINISHED

    def to_data(self) -> dict[str, Any]:
        """JSON form, as stored in a message's ``tool_calls[i].result``."""
        return {"kind": "finish", "summary": self.summary, "reason": self.reason}


def tool_call(
    name: str, result: Any = None, *, args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One entry of a workflow message's ``data["tool_calls"]``: the tool ``name``, its ``args``
    and its ``result`` (a Handoff/Finish is stored as its JSON form)."""
    if isinstance(result, Handoff | Finish):
        result = result.to_data()
    return {"name": name, "args": dict(args or {}), "result": result}


@dataclass(frozen=True)
class ToolCalls:
    """A message's tool calls parsed: ``names`` in order and the control result, if any."""

    names: tuple[str, ...] = ()
    control: Handoff | Finish | None = None


def parse_tool_calls(data: Mapping[str, Any]) -> ToolCalls:
    """Parse ``data["tool_calls"]`` (list of ``{"name", "args"?, "result"?}``).

    A result ``{"kind": "handoff", "target", "reason"?}`` is a Handoff, ``{"kind": "finish",
    "summary"?, "reason"?}`` a Finish; at most one of them per message. Raises
    InvalidRequestError for a bad shape.
    """
    raw = data.get("tool_calls")
    if raw is None:
        return ToolCalls()
    if not isinstance(raw, list):
        raise InvalidRequestError("tool_calls must be a list of {name, args, result}")
    names: list[str] = []
    controls: list[Handoff | Finish] = []
    for call in raw:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            raise InvalidRequestError(f"each tool call needs a string name; got {call!r}")
        names.append(call["name"])
        result = call.get("result")
        if isinstance(result, Mapping) and result.get("kind") in ("handoff", "finish"):
            controls.append(_control(result))
    if len(controls) > 1:
        raise InvalidRequestError("at most one Handoff or Finish per message")
    return ToolCalls(tuple(names), controls[0] if controls else None)


def _control(result: Mapping[str, Any]) -> Handoff | Finish:
    try:
        if result["kind"] == "handoff":
            target, reason = result["target"], result.get("reason", "")
            if not isinstance(target, str) or not target or not isinstance(reason, str):
                raise TypeError
            return Handoff(target, reason)
        summary, reason = result.get("summary", ""), result.get("reason", REASON_FINISHED)
        if not isinstance(summary, str) or not isinstance(reason, str) or not reason:
            raise TypeError
        return Finish(summary, reason)
    except (KeyError, TypeError):
        raise InvalidRequestError(
            "a Handoff is {kind: 'handoff', target: <participant>, reason}; a Finish is "
            f"{{kind: 'finish', summary, reason}}; got {dict(result)!r}"
        ) from None


# ------------------------------------------------------------------ conditions and targets


class Condition(ABC):
    """When a transition applies. Subclasses are frozen dataclasses with a ``kind``."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def matches(self, turn: Turn) -> bool:
        """True when the rule applies to the turn just taken."""

    def references(self) -> tuple[str, ...]:
        """Participant ids/names this condition names (checked when the thread opens)."""
        return ()


class Target(ABC):
    """Where a transition leads. Subclasses are frozen dataclasses with a ``kind``."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def route(self, turn: Turn) -> Route:
        """The next speaker's id, or Terminated."""

    def references(self) -> tuple[str, ...]:
        """Participant ids/names this target names (checked when the thread opens)."""
        return ()


_CONDITIONS: dict[str, type[Condition]] = {}
_TARGETS: dict[str, type[Target]] = {}
C = TypeVar("C", bound=type[Condition])
T = TypeVar("T", bound=type[Target])


def register_condition(cls: C) -> C:
    """Class decorator: make a Condition dataclass available under its ``kind`` in graph JSON."""
    if not cls.kind:
        raise InvalidRequestError(f"{cls.__name__} needs a non-empty kind")
    _CONDITIONS[cls.kind] = cls
    return cls


def register_target(cls: T) -> T:
    """Class decorator: make a Target dataclass available under its ``kind`` in graph JSON."""
    if not cls.kind:
        raise InvalidRequestError(f"{cls.__name__} needs a non-empty kind")
    _TARGETS[cls.kind] = cls
    return cls


@register_condition
@dataclass(frozen=True)
class Always(Condition):
    """Matches every turn."""

    kind: ClassVar[str] = "always"

    def matches(self, turn: Turn) -> bool:
        """Always True."""
        return True


@register_condition
@dataclass(frozen=True)
class FromSpeaker(Condition):
    """Matches a turn taken by ``agent`` (participant id or name)."""

    kind: ClassVar[str] = "from_speaker"
    agent: str

    def matches(self, turn: Turn) -> bool:
        """True when the speaker is ``agent``."""
        return turn.resolve(self.agent) == turn.speaker

    def references(self) -> tuple[str, ...]:
        """The speaker it names."""
        return (self.agent,)


@register_condition
@dataclass(frozen=True)
class ToolCalled(Condition):
    """Matches a turn whose message called the tool ``tool``."""

    kind: ClassVar[str] = "tool_called"
    tool: str

    def matches(self, turn: Turn) -> bool:
        """True when ``tool`` is among the turn's tool calls."""
        return self.tool in turn.tools


@register_condition
@dataclass(frozen=True)
class ContextEquals(Condition):
    """Matches when the workflow context holds ``value`` (JSON equality) under ``key``."""

    kind: ClassVar[str] = "context_equals"
    key: str
    value: Any

    def matches(self, turn: Turn) -> bool:
        """True when ``context[key] == value``."""
        return self.key in turn.context and turn.context[self.key] == self.value


@register_target
@dataclass(frozen=True)
class AgentTarget(Target):
    """Next speaker: ``agent`` (participant id or name)."""

    kind: ClassVar[str] = "agent"
    agent: str

    def route(self, turn: Turn) -> Route:
        """The participant's id."""
        return turn.resolve(self.agent)

    def references(self) -> tuple[str, ...]:
        """The speaker it names."""
        return (self.agent,)


@register_target
@dataclass(frozen=True)
class RoundRobinTarget(Target):
    """Next speaker: the one after the speaker in the round-robin order (wrapping)."""

    kind: ClassVar[str] = "round_robin"

    def route(self, turn: Turn) -> Route:
        """The next id in ``turn.order`` (the first one if the speaker is not in it)."""
        if turn.speaker not in turn.order:
            return turn.order[0]
        return turn.order[(turn.order.index(turn.speaker) + 1) % len(turn.order)]


@register_target
@dataclass(frozen=True)
class StayTarget(Target):
    """Next speaker: the same speaker again."""

    kind: ClassVar[str] = "stay"

    def route(self, turn: Turn) -> Route:
        """The speaker's id."""
        return turn.speaker


@register_target
@dataclass(frozen=True)
class RevertToInitiatorTarget(Target):
    """Next speaker: the thread's initiator."""

    kind: ClassVar[str] = "revert_to_initiator"

    def route(self, turn: Turn) -> Route:
        """The initiator's id."""
        return turn.initiator


@register_target
@dataclass(frozen=True)
class TerminateTarget(Target):
    """End the workflow with ``reason``."""

    kind: ClassVar[str] = "terminate"
    reason: str = "terminated"

    def route(self, turn: Turn) -> Route:
        """Terminated(reason)."""
        return Terminated(self.reason)


def _to_data(obj: Condition | Target) -> dict[str, Any]:
    return {"kind": obj.kind, **{f.name: getattr(obj, f.name) for f in fields(obj)}}  # type: ignore[arg-type]


def _from_data(registry: Mapping[str, type[Any]], what: str, data: Any) -> Any:
    if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str):
        raise InvalidRequestError(f"a {what} is an object with a 'kind'; got {data!r}")
    cls = registry.get(data["kind"])
    if cls is None:
        known = ", ".join(sorted(registry))
        raise InvalidRequestError(f"unknown {what} kind {data['kind']!r}; known: {known}")
    rest = {k: v for k, v in data.items() if k != "kind"}
    allowed = {f.name for f in fields(cls)}
    if set(rest) - allowed:
        raise InvalidRequestError(
            f"{what} {data['kind']!r} takes {sorted(allowed) or 'no fields'}; got {sorted(rest)}"
        )
    try:
        return TypeAdapter(cls).validate_python(rest)
    except ValidationError as exc:
        raise InvalidRequestError(
            f"bad {what} {data['kind']!r}: {exc.errors()[0]['msg']}"
        ) from None


def condition_from_data(data: Any) -> Condition:
    """A Condition from its JSON form (InvalidRequestError for an unknown kind or bad fields)."""
    cond: Condition = _from_data(_CONDITIONS, "condition", data)
    return cond


def target_from_data(data: Any) -> Target:
    """A Target from its JSON form (InvalidRequestError for an unknown kind or bad fields)."""
    target: Target = _from_data(_TARGETS, "target", data)
    return target


# ------------------------------------------------------------------ the graph


@dataclass(frozen=True)
class Transition:
    """``when`` the condition matches the turn just taken, ``then`` route to the target;
    rules with a higher ``priority`` are tried first."""

    when: Condition
    then: Target
    priority: int = 0

    def to_data(self) -> dict[str, Any]:
        """JSON form."""
        return {"when": _to_data(self.when), "then": _to_data(self.then), "priority": self.priority}

    @classmethod
    def from_data(cls, data: Any) -> Transition:
        """From JSON form (InvalidRequestError on a bad shape)."""
        if not isinstance(data, Mapping) or set(data) - {"when", "then", "priority"}:
            raise InvalidRequestError(f"a transition is {{when, then, priority}}; got {data!r}")
        priority = data.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError("transition priority must be an integer")
        return cls(
            condition_from_data(data.get("when")), target_from_data(data.get("then")), priority
        )


@dataclass(frozen=True)
class ToolSpec:
    """A tool the graph gives to participants' models.

    ``speakers`` (ids or names; None = every participant) get it. Calling it returns
    ``Handoff(target=handoff, reason=<argument>)`` when ``handoff`` is set, ``Finish(summary=
    <argument>, reason=finish)`` when ``finish`` is set, else a plain acknowledgement (route it
    with a ``tool_called`` rule).
    """

    name: str
    description: str = ""
    speakers: tuple[str, ...] | None = None
    handoff: str | None = None
    finish: str | None = None

    def to_data(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "description": self.description,
            "speakers": list(self.speakers) if self.speakers is not None else None,
            "handoff": self.handoff,
            "finish": self.finish,
        }

    def references(self) -> tuple[str, ...]:
        """Participant ids/names it names."""
        return (*(self.speakers or ()), *((self.handoff,) if self.handoff else ()))


_TOOL_SPEC = TypeAdapter(ToolSpec)


def _tuple(value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


@dataclass(frozen=True)
class TransitionGraph:
    """A declarative workflow (see the module docstring). Lists given to the constructor are
    stored as tuples, so graphs compare and round-trip through JSON."""

    initial_speaker: str | None = None
    transitions: Sequence[Transition] = ()
    default_target: Target | None = None
    max_turns: int | None = None
    order: Sequence[str] | None = None
    tools: Sequence[ToolSpec] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "transitions", tuple(self.transitions))
        object.__setattr__(self, "order", _tuple(self.order))
        object.__setattr__(self, "tools", tuple(self.tools))
        if self.max_turns is not None and (
            isinstance(self.max_turns, bool)
            or not isinstance(self.max_turns, int)
            or self.max_turns < 1
        ):
            raise InvalidRequestError("max_turns must be a positive integer")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError("graph tool names must be unique")

    # -------------------------------------------------------------- factories

    @classmethod
    def sequence(
        cls, speakers: Sequence[str], *, tools: Sequence[ToolSpec] = ()
    ) -> TransitionGraph:
        """Each speaker once, in order; then the workflow closes with ``sequence_complete``."""
        if not speakers or len(set(speakers)) != len(speakers):
            raise InvalidRequestError("a sequence needs distinct speakers")
        rules = [
            Transition(FromSpeaker(a), AgentTarget(b)) for a, b in itertools.pairwise(speakers)
        ]
        rules.append(Transition(FromSpeaker(speakers[-1]), TerminateTarget("sequence_complete")))
        return cls(initial_speaker=speakers[0], transitions=rules, tools=tools)

    @classmethod
    def round_robin(
        cls, speakers: Sequence[str], *, max_turns: int, tools: Sequence[ToolSpec] = ()
    ) -> TransitionGraph:
        """Speakers in turn, wrapping; the workflow closes with ``max_turns`` after that many."""
        if not speakers or len(set(speakers)) != len(speakers):
            raise InvalidRequestError("a round robin needs distinct speakers")
        return cls(
            initial_speaker=speakers[0],
            transitions=[Transition(Always(), RoundRobinTarget())],
            max_turns=max_turns,
            order=speakers,
            tools=tools,
        )

    # -------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``graph`` knob of a workflow thread)."""
        return {
            "initial_speaker": self.initial_speaker,
            "transitions": [t.to_data() for t in self.transitions],
            "default_target": _to_data(self.default_target) if self.default_target else None,
            "max_turns": self.max_turns,
            "order": list(self.order) if self.order is not None else None,
            "tools": [t.to_data() for t in self.tools],
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> TransitionGraph:
        """A graph from its dict form; InvalidRequestError naming what is wrong."""
        allowed = {
            "initial_speaker",
            "transitions",
            "default_target",
            "max_turns",
            "order",
            "tools",
        }
        if not isinstance(data, Mapping):
            raise InvalidRequestError("graph must be an object")
        if set(data) - allowed:
            raise InvalidRequestError(f"unknown graph fields {sorted(set(data) - allowed)}")
        initial = data.get("initial_speaker")
        if initial is not None and not isinstance(initial, str):
            raise InvalidRequestError("initial_speaker must be a participant id or name")
        transitions = data.get("transitions") or []
        if not isinstance(transitions, list):
            raise InvalidRequestError("transitions must be a list")
        order = data.get("order")
        if order is not None and (
            not isinstance(order, list) or not all(isinstance(o, str) for o in order)
        ):
            raise InvalidRequestError("order must be a list of participant ids or names")
        tools_raw = data.get("tools") or []
        if not isinstance(tools_raw, list):
            raise InvalidRequestError("tools must be a list")
        try:
            tools = [_TOOL_SPEC.validate_python(t) for t in tools_raw]
        except ValidationError as exc:
            raise InvalidRequestError(f"bad graph tool: {exc.errors()[0]['msg']}") from None
        default = data.get("default_target")
        return cls(
            initial_speaker=initial,
            transitions=[Transition.from_data(t) for t in transitions],
            default_target=target_from_data(default) if default is not None else None,
            max_turns=data.get("max_turns"),
            order=order,
            tools=tools,
        )

    @classmethod
    def from_json(cls, text: str) -> TransitionGraph:
        """A graph from JSON text (InvalidRequestError for bad JSON or a bad graph)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"graph is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # -------------------------------------------------------------- semantics

    def references(self) -> tuple[str, ...]:
        """Every participant id/name the graph names (all must be participants)."""
        refs: list[str] = []
        if self.initial_speaker:
            refs.append(self.initial_speaker)
        refs.extend(self.order or ())
        for t in self.transitions:
            refs.extend(t.when.references())
            refs.extend(t.then.references())
        if self.default_target is not None:
            refs.extend(self.default_target.references())
        for tool in self.tools:
            refs.extend(tool.references())
        return tuple(refs)

    def route(self, turn: Turn, control: Handoff | Finish | None = None) -> Route:
        """Where the workflow goes after ``turn``: Finish, Handoff, first matching rule by
        priority, default target; then ``max_turns``. Raises GraphError for a target that is
        not a participant (or a custom condition/target that fails)."""
        try:
            route = self._route(turn, control)
        except GraphError:
            raise
        except Exception as exc:  # a custom condition or target failed: refuse, do not crash
            raise GraphError(f"workflow routing failed: {type(exc).__name__}: {exc}") from None
        if (
            not isinstance(route, Terminated)
            and self.max_turns is not None
            and turn.number >= self.max_turns
        ):
            return Terminated("max_turns")
        return route

    def _route(self, turn: Turn, control: Handoff | Finish | None) -> Route:
        if isinstance(control, Finish):
            return Terminated(control.reason, control.summary or None)
        if isinstance(control, Handoff):
            return turn.resolve(control.target)
        ranked = sorted(self.transitions, key=lambda t: -t.priority)
        for rule in ranked:
            if rule.when.matches(turn):
                return self._checked(rule.then.route(turn), turn)
        fallback = self.default_target or TerminateTarget(REASON_NO_TRANSITION)
        return self._checked(fallback.route(turn), turn)

    @staticmethod
    def _checked(route: Route, turn: Turn) -> Route:
        if isinstance(route, Terminated):
            return route
        return turn.resolve(route)
