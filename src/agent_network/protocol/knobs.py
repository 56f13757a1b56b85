"""The vocabulary of thread protocols: statuses, close reasons and the small immutable records the
fold keeps (marks, expectations, knobs), and the parsing of ``thread.created`` data. The envelope
types are in :mod:`agent_network.protocol.events`.

Everything here is plain data. Nothing reads the clock or the store: deadlines are computed from
envelope ``created_at`` values (:mod:`agent_network.protocol.deadlines`).

Lifecycle (every transition is an envelope)::

    thread.created ──(invitees)──> invited ──thread.ack (all)──> active / open
                   └─(none)──────> active / open
    invited ──thread.reject / ack timeout──> closing
    active/open ──adapter close (consulting reply, workflow terminate),
                  thread.closing (explicit close, TTL), expectation.violated(auto_close)──> closing
    closing ──thread.closed (written by the hub's sweeper)──> closed
    any status but closed ──thread.closed (system)──> closed

``open`` is the status of an ``open``-adapter thread that is live (today's behaviour);
``active`` the status of a live protocol thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent_network.errors import InvalidRequestError

if TYPE_CHECKING:
    from agent_network.model.envelope import Envelope

# ------------------------------------------------------------------ statuses
STATUS_OPEN = "open"
STATUS_INVITED = "invited"
STATUS_ACTIVE = "active"
STATUS_CLOSING = "closing"
STATUS_CLOSED = "closed"
LIVE_STATUSES = frozenset({STATUS_OPEN, STATUS_ACTIVE})

# ------------------------------------------------------------------ close reasons
REASON_CLOSED = "closed"  # explicit close without a reason
REASON_CONSULTING_COMPLETE = "consulting_complete"
REASON_INVITE_REJECTED = "invite_rejected"
REASON_INVITE_TIMEOUT = "invite_timeout"
REASON_TTL_EXPIRED = "ttl_expired"
REASON_SEQUENCE_COMPLETE = "sequence_complete"
REASON_MAX_TURNS = "max_turns"
REASON_FINISHED = "finished"
REASON_NO_TRANSITION = "no_transition"
EXPECTATION_REASON_PREFIX = "expectation_violated:"

# ------------------------------------------------------------------ expectations
EXPECTATION_KINDS = ("reply_within", "acks_within", "max_silence", "turn_within")
HANDLERS = ("audit", "notify", "auto_close")
PARTICIPANT_KINDS = ("agent", "user")

Participant = tuple[str, str]
"""A thread participant as ``(kind, id)``: kind ``agent`` or ``user``."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,60}$")
_MAX_ID = 40
_MAX_REASON = 200


def epoch(iso: str) -> float:
    """Seconds since the Unix epoch of an ISO-8601 timestamp such as an envelope's created_at."""
    return datetime.fromisoformat(iso).timestamp()


@dataclass(frozen=True, slots=True)
class Mark:
    """A pointer to one envelope: ``id``, ``seq``, ``at`` (its created_at) and its ``sender`` id."""

    id: str
    seq: int
    at: str
    sender: str

    @classmethod
    def of(cls, env: Envelope) -> Mark:
        """The mark of ``env``."""
        return cls(env.id, env.seq, env.created_at, env.sender_id)

    @property
    def epoch(self) -> float:
        """``at`` as seconds since the Unix epoch."""
        return epoch(self.at)


@dataclass(frozen=True, slots=True)
class Expectation:
    """A deadline rule on a thread.

    ``kind``: ``reply_within`` (someone other than the sender answers a message within
    ``seconds``), ``acks_within`` (every invitee acks within ``seconds`` of creation),
    ``max_silence`` (no message for ``seconds``), ``turn_within`` (the expected speaker speaks
    within ``seconds`` of its turn starting). ``handler``: ``audit`` (an ``expectation.violated``
    envelope, hence an audit record), ``notify`` (that plus a ``notify`` envelope in the thread)
    or ``auto_close`` (that, and the thread closes with reason ``expectation_violated:<name>``).
    ``name`` identifies it (default: the kind); each violation fires exactly once.
    """

    name: str
    kind: str
    seconds: float
    handler: str = "audit"

    def to_data(self) -> dict[str, Any]:
        """The JSON form used in ``thread.created`` data."""
        return {
            "name": self.name,
            "kind": self.kind,
            "seconds": self.seconds,
            "handler": self.handler,
        }


def _expectation(kind: str, seconds: float, handler: str, name: str | None) -> Expectation:
    exp = Expectation(name or kind, kind, seconds, handler)
    parse_expectations([exp.to_data()])  # same checks as for JSON input
    return exp


def reply_within(seconds: float, handler: str = "audit", *, name: str | None = None) -> Expectation:
    """Expectation: a message gets an answer from someone else within ``seconds``."""
    return _expectation("reply_within", seconds, handler, name)


def acks_within(seconds: float, handler: str = "audit", *, name: str | None = None) -> Expectation:
    """Expectation: every invitee acks within ``seconds`` of the thread's creation."""
    return _expectation("acks_within", seconds, handler, name)


def max_silence(seconds: float, handler: str = "audit", *, name: str | None = None) -> Expectation:
    """Expectation: the thread is never silent (no message) for more than ``seconds``."""
    return _expectation("max_silence", seconds, handler, name)


def turn_within(seconds: float, handler: str = "audit", *, name: str | None = None) -> Expectation:
    """Expectation: the expected speaker speaks within ``seconds`` of its turn starting."""
    return _expectation("turn_within", seconds, handler, name)


@dataclass(frozen=True, slots=True)
class Knobs:
    """The generic knobs of ``thread.created``: ``ttl`` and ``ack_timeout`` in seconds (None =
    none), the ``expectations``, and ``names`` (participant name -> id pairs, used to resolve
    workflow targets and ``Handoff(target=<name>)``)."""

    ttl: float | None = None
    ack_timeout: float | None = None
    expectations: tuple[Expectation, ...] = ()
    names: tuple[tuple[str, str], ...] = ()

    @property
    def timed(self) -> bool:
        """True when the sweeper has deadlines to watch on this thread."""
        return self.ttl is not None or self.ack_timeout is not None or bool(self.expectations)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """A validated ``thread.created`` proposal, as an adapter's ``check_open`` sees it."""

    adapter: str
    data: Mapping[str, Any]
    participants: tuple[Participant, ...]
    initiator: Participant | None
    invitees: tuple[Participant, ...]
    knobs: Knobs

    @property
    def participant_ids(self) -> tuple[str, ...]:
        """The participants' ids, in order."""
        return tuple(pid for _, pid in self.participants)


# ------------------------------------------------------------------ parsing (shared by check/fold)


def _participant(value: Any, field: str) -> Participant:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or value[0] not in PARTICIPANT_KINDS
        or not isinstance(value[1], str)
        or not 0 < len(value[1]) <= _MAX_ID
    ):
        raise InvalidRequestError(
            f"{field}: each participant is [kind, id] with kind 'agent' or 'user' and an id of "
            f"1-{_MAX_ID} characters; got {value!r}"
        )
    return (str(value[0]), value[1])


def parse_participants(value: Any, field: str = "participants") -> tuple[Participant, ...]:
    """``[[kind, id], ...]`` as a tuple of pairs; InvalidRequestError for a bad shape or a
    duplicate."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequestError(f"{field} must be a list of [kind, id] pairs")
    out = tuple(_participant(v, field) for v in value)
    ids = [pid for _, pid in out]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"{field} lists the same participant twice")
    return out


def parse_seconds(value: Any, field: str) -> float | None:
    """A positive, finite number of seconds (None stays None); InvalidRequestError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{field} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{field} must be a positive number of seconds, got {value!r}")
    return float(value)


def parse_expectations(value: Any) -> tuple[Expectation, ...]:
    """``[{"name"?, "kind", "seconds", "handler"?}, ...]`` as Expectations; InvalidRequestError
    for an unknown kind or handler, bad seconds, a bad or duplicate name."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequestError("expectations must be a list of objects")
    out: list[Expectation] = []
    for item in value:
        if not isinstance(item, Mapping):
            raise InvalidRequestError(f"each expectation is an object, got {item!r}")
        unknown = set(item) - {"name", "kind", "seconds", "handler"}
        if unknown:
            raise InvalidRequestError(f"unknown expectation fields: {sorted(unknown)}")
        kind = item.get("kind")
        if kind not in EXPECTATION_KINDS:
            raise InvalidRequestError(
                f"expectation kind must be one of {', '.join(EXPECTATION_KINDS)}; got {kind!r}"
            )
        handler = item.get("handler", "audit")
        if handler not in HANDLERS:
            raise InvalidRequestError(
                f"expectation handler must be one of {', '.join(HANDLERS)}; got {handler!r}"
            )
        name = item.get("name", kind)
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"expectation name must be 1-60 letters, digits, '_', '.' or '-'; got {name!r}"
            )
        seconds = parse_seconds(item.get("seconds"), f"expectation {name!r} seconds")
        if seconds is None:
            raise InvalidRequestError(f"expectation {name!r} needs seconds")
        out.append(Expectation(name, str(kind), seconds, str(handler)))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError("expectation names must be unique in a thread")
    return tuple(out)


def parse_names(value: Any, participants: tuple[Participant, ...]) -> tuple[tuple[str, str], ...]:
    """``{name: participant id}`` as sorted pairs; every id must be a participant."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequestError("names must be an object {name: participant id}")
    ids = {pid for _, pid in participants}
    for name, pid in value.items():
        if not isinstance(name, str) or not name or not isinstance(pid, str):
            raise InvalidRequestError(f"names: bad entry {name!r}: {pid!r}")
        if pid not in ids:
            raise InvalidRequestError(f"names: {name!r} maps to {pid!r}, who is not a participant")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def parse_open(data: Mapping[str, Any]) -> OpenRequest:
    """The generic part of a ``thread.created`` proposal, validated.

    ``participants`` (list of [kind, id]; the initiator included), ``initiator`` ([kind, id];
    default the first participant), ``invitees`` (participants other than the initiator who must
    ``thread.ack`` before the thread is live), ``ttl``/``ack_timeout`` (seconds),
    ``expectations``, ``names``. Raises InvalidRequestError naming the bad field.
    """
    adapter = data.get("adapter", "open")
    if not isinstance(adapter, str):
        raise InvalidRequestError("adapter must be a string")
    participants = parse_participants(data.get("participants"))
    initiator: Participant | None = None
    if data.get("initiator") is not None:
        initiator = _participant(data["initiator"], "initiator")
        if initiator not in participants:
            raise InvalidRequestError("initiator must be one of the participants")
    elif participants:
        initiator = participants[0]
    invitees = parse_participants(data.get("invitees"), "invitees")
    for inv in invitees:
        if inv not in participants:
            raise InvalidRequestError(f"invitee {inv[1]!r} is not a participant")
        if inv == initiator:
            raise InvalidRequestError("the initiator does not ack its own thread")
    budget = data.get("agent_budget")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 0
    ):
        raise InvalidRequestError("agent_budget must be a non-negative integer")
    knobs = Knobs(
        ttl=parse_seconds(data.get("ttl"), "ttl"),
        ack_timeout=parse_seconds(data.get("ack_timeout"), "ack_timeout"),
        expectations=parse_expectations(data.get("expectations")),
        names=parse_names(data.get("names"), participants),
    )
    return OpenRequest(adapter, data, participants, initiator, invitees, knobs)


def parse_reason(data: Mapping[str, Any], default: str) -> str:
    """``data["reason"]`` (a string of at most 200 characters) or ``default``."""
    reason = data.get("reason")
    if reason is None:
        return default
    if not isinstance(reason, str) or not 0 < len(reason) <= _MAX_REASON:
        raise InvalidRequestError(f"reason must be a string of 1-{_MAX_REASON} characters")
    return reason
