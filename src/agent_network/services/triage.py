"""The ``triage`` routine preset (hub-and-spoke): its pure parts.

A triage routine makes its agent the coordinator of one or more *intake* threads: every message
posted there by somebody else is classified into one of the routine's *routes* and forwarded
into that route's specialist thread; the agent then answers in the intake thread where the
request went. This module holds the rules: the config model (:class:`TriageConfig`,
:func:`parse_config`), label parsing (:func:`label_in`), the keyword classifier
(:func:`keyword_label`), the texts posted and the idempotency key of a forward.
:mod:`agent_network.services.routing` routes a request (checks, forward, reply) for both
runners; the classification prompt is the runtime's (``runtime/triage.py``). Design:
docs/architecture.md, "Runners: one engine, two ports".

Config (the routine's ``config``)::

    {
      "intake": "thr_..." | ["thr_...", ...],          # the threads the routine watches
      "routes": {                                       # label -> specialist thread
        "billing": {"thread_id": "thr_...", "keywords": ["invoice", "refund"],
                    "description": "invoices, charges and refunds"},
        ...
      },
      "fallback": "billing",                            # optional: a label of ``routes``
      "use_model": true                                 # optional: false = keywords only
    }

Classification of one request, in order: the agent's model is asked for the label only and the
first label found in its answer (case-insensitive, whole word) wins; else the route whose
keywords (case-insensitive, whole words or phrases) occur most often in the request, the first
such route in config order on a tie; else ``fallback``; else the request is *unroutable*. With
``use_model`` false no model is asked (keywords, then the fallback). The bundled local model
(135M parameters) is weak at "answer with one label": it tends to echo the first category of
the list, which then wins over the keywords. Give every route keywords, and with that model
set ``use_model`` to false.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from agent_network.errors import InvalidRequestError
from agent_network.model.envelope import Envelope
from agent_network.protocol.events import EV_MESSAGE

__all__ = [
    "LABEL_PATTERN",
    "MARKER",
    "Route",
    "TriageConfig",
    "forward_content",
    "forward_key",
    "is_request",
    "is_triage_output",
    "keyword_label",
    "label_in",
    "parse_config",
    "reply_content",
    "undelivered_content",
    "unroutable_content",
]

LABEL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
"""A route label: a short identifier (a letter, then up to 31 letters, digits, ``_`` or ``-``)."""

MARKER = "triage"
"""The ``data`` key a triage agent's forwards and replies carry (so no triage routine takes
them as requests: no loops)."""

MAX_INTAKE = 20  # intake threads per routine
MAX_ROUTES = 50  # routes per routine
MAX_KEYWORDS = 100  # keywords per route
MAX_KEYWORD = 100  # characters of one keyword
MAX_DESCRIPTION = 500  # characters of one route description
_WORD = "A-Za-z0-9_-"  # characters that continue a label or a keyword (whole-word matching)

Classified = Literal["model", "keywords", "fallback"]


class Route(BaseModel):
    """One route: the specialist ``thread_id``, the ``keywords`` of the keyword classifier and a
    ``description`` shown to the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thread_id: str = Field(min_length=1, max_length=100)
    keywords: tuple[str, ...] = Field(default=(), max_length=MAX_KEYWORDS)
    description: str = Field(default="", max_length=MAX_DESCRIPTION)


class TriageConfig(BaseModel):
    """A triage routine's config (see the module docstring). ``intake`` is a tuple of thread ids;
    ``routes`` keeps the config's order (the keyword classifier's tie-break)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intake: tuple[str, ...] = Field(min_length=1, max_length=MAX_INTAKE)
    routes: dict[str, Route] = Field(min_length=1, max_length=MAX_ROUTES)
    fallback: str | None = None
    use_model: StrictBool = True

    @property
    def labels(self) -> list[str]:
        """The route labels in config order."""
        return list(self.routes)

    def route_for(self, label: str) -> Route:
        """The route of ``label`` (a label of :attr:`routes`); KeyError otherwise."""
        return self.routes[label]


def _key_path(loc: Iterable[int | str]) -> str:
    return "config" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def parse_config(raw: Any) -> TriageConfig:
    """Validate a triage routine's ``config`` (shape only: no thread is looked up here).

    ``raw`` is the JSON object given at routine create/update; ``intake`` may be one thread id
    or a list of them. Returns the :class:`TriageConfig`. Raises InvalidRequestError (422)
    naming the bad key (``config.routes.billing.thread_id``, ``config.fallback``...) for: a
    missing or unknown key, a wrong type, an empty ``intake`` or ``routes``, a label that is
    not a short identifier (:data:`LABEL_PATTERN`) or repeats another one ignoring case, an
    empty or overlong keyword, a duplicate intake thread, a ``fallback`` that is not a label of
    ``routes``, or a route thread that is also an intake thread of the routine (a loop).
    """
    if not isinstance(raw, Mapping):
        raise InvalidRequestError("config: a triage routine needs an object {intake, routes}")
    data = dict(raw)
    if isinstance(data.get("intake"), str):
        data["intake"] = [data["intake"]]
    try:
        config = TriageConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidRequestError(f"{_key_path(err['loc'])}: {err['msg']}") from None
    seen: set[str] = set()
    for label, route in config.routes.items():
        if not LABEL_PATTERN.match(label):
            raise InvalidRequestError(
                f"config.routes.{label}: a label is a short identifier: a letter, then up to 31 "
                "letters, digits, '_' or '-'"
            )
        if label.lower() in seen:
            raise InvalidRequestError(
                f"config.routes.{label}: labels are compared ignoring case; {label!r} repeats "
                "another label"
            )
        seen.add(label.lower())
        for i, keyword in enumerate(route.keywords):
            if not keyword.strip() or len(keyword) > MAX_KEYWORD:
                raise InvalidRequestError(
                    f"config.routes.{label}.keywords[{i}]: a keyword is 1-{MAX_KEYWORD} "
                    "characters, not blank"
                )
        if route.thread_id in config.intake:
            raise InvalidRequestError(
                f"config.routes.{label}.thread_id: {route.thread_id!r} is an intake thread of "
                "this routine; a route must lead elsewhere (it would triage its own forwards)"
            )
    if len(set(config.intake)) != len(config.intake):
        raise InvalidRequestError("config.intake: a thread is listed twice")
    if config.fallback is not None and config.fallback not in config.routes:
        raise InvalidRequestError(
            f"config.fallback: {config.fallback!r} is not a label of config.routes "
            f"({', '.join(config.labels)})"
        )
    return config


# ------------------------------------------------------------------ classification


def _word_re(term: str) -> re.Pattern[str]:
    """Case-insensitive whole-word (or whole-phrase, any whitespace) match of ``term``."""
    body = r"\s+".join(re.escape(w) for w in term.split())
    return re.compile(rf"(?<![{_WORD}]){body}(?![{_WORD}])", re.IGNORECASE)


def label_in(text: str, labels: Iterable[str]) -> str | None:
    """The label of ``labels`` that occurs first in ``text`` (case-insensitive, as a whole word:
    ``"Billing."`` names ``billing``, ``"rebilling"`` does not), or None when none does."""
    best: tuple[int, str] | None = None
    for label in labels:
        found = _word_re(label).search(text)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), label)
    return best[1] if best else None


def keyword_label(text: str, config: TriageConfig) -> str | None:
    """The route whose keywords occur most often in ``text`` (case-insensitive whole words or
    phrases; each occurrence counts), the first such route in config order on a tie; None when
    no keyword of any route occurs."""
    best: tuple[int, str] | None = None
    for label, route in config.routes.items():
        hits = sum(len(_word_re(k).findall(text)) for k in route.keywords if k.strip())
        if hits and (best is None or hits > best[0]):
            best = (hits, label)
    return best[1] if best else None


def decide(
    config: TriageConfig, model_answer: str | None, request: str
) -> tuple[str | None, Classified | None]:
    """``(label, how)`` for a request: the first label in ``model_answer`` (``"model"``), else
    the keyword classifier's (``"keywords"``), else the config's fallback (``"fallback"``), else
    ``(None, None)``: unroutable."""
    if model_answer:
        label = label_in(model_answer, config.labels)
        if label is not None:
            return label, "model"
    label = keyword_label(request, config)
    if label is not None:
        return label, "keywords"
    if config.fallback is not None:
        return config.fallback, "fallback"
    return None, None


# ------------------------------------------------------------------ what is posted


def forward_key(agent_id: str, request_id: str) -> str:
    """The idempotency key of ``agent_id``'s forward of the intake message ``request_id``
    (stored in the route thread): ``triage:<agent_id>:<request_id>``."""
    return f"triage:{agent_id}:{request_id}"


def forward_content(sender_name: str, intake_title: str, request: str) -> str:
    """The forwarded request: ``Forwarded from <sender> in <intake title>: <request>``."""
    return f"Forwarded from {sender_name} in {intake_title}: {request}"


def reply_content(label: str, route_title: str) -> str:
    """The triage agent's answer in intake: ``Routed to <label>: <route thread title>``."""
    return f"Routed to {label}: {route_title}"


def unroutable_content(labels: Iterable[str]) -> str:
    """The answer in intake to a request no route matches (and no fallback is set)."""
    return (
        "Could not route this request: it fits none of "
        + ", ".join(labels)
        + ". Please rephrase it, or name one of them."
    )


def undelivered_content(label: str) -> str:
    """The answer in intake when the forward to route ``label`` was refused (its thread is
    closed or out of budget, the agent's rule or the egress policy forbids it): the request stays
    in intake, and the person is told so instead of waiting for a route that never got it."""
    return (
        f"Could not pass this request on to {label} right now; it stays here in intake for "
        "someone to pick up."
    )


def marker(
    kind: Literal["forward", "reply"],
    *,
    label: str | None,
    how: Classified | None,
    intake_thread_id: str,
    request_id: str,
    delivered: bool = True,
) -> dict[str, Any]:
    """The ``data["triage"]`` of a forward or a reply: ``{"kind", "label" (None: unroutable),
    "by" (model | keywords | fallback | None), "intake_thread_id", "request_id"}``, plus
    ``"delivered": False`` on the reply to a request whose forward to ``label`` was refused."""
    out: dict[str, Any] = {
        "kind": kind,
        "label": label,
        "by": how,
        "intake_thread_id": intake_thread_id,
        "request_id": request_id,
    }
    if not delivered:
        out["delivered"] = False
    return out


class _WithData(Protocol):
    @property
    def data(self) -> Mapping[str, Any]: ...


def is_triage_output(env: Envelope | _WithData) -> bool:
    """True for a forward or reply of any triage agent (its ``data`` carries :data:`MARKER`):
    never a request for a triage routine. ``env``: a hub envelope or the SDK's."""
    return isinstance(env.data.get(MARKER), dict)


def is_request(env: Envelope, agent_id: str) -> bool:
    """Whether ``env`` can be a request for a triage routine of ``agent_id``: a message from
    somebody else that is not a forward or reply of any triage agent (no loops). Where it must
    be (one of the routine's intake threads) and whether the agent may see it (its audience)
    the callers check."""
    return env.type == EV_MESSAGE and env.sender_id != agent_id and not is_triage_output(env)
