"""Errors raised by the SDK: one hierarchy for REST and realtime.

Every error answer of the server has the body ``{"error": {"code", "message", "details"?}}``
(REST) or the frame ``{"type": "error", "ref"?, "error": {...}}`` (WebSocket). The SDK raises
:class:`ApiError` (or the subclass registered for its ``code``) with ``status``, ``code``,
``message``, ``details`` and ``retry_after`` (seconds, from ``Retry-After`` or
``details.retry_after``; ``None`` when the server gave none).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class ClientError(Exception):
    """Base class of every error this SDK raises."""


class TransportError(ClientError):
    """The server could not be reached or the connection broke before an answer arrived."""


class ApiError(ClientError):
    """The server answered with an error body.

    Attributes: ``status`` (HTTP status, ``0`` for a realtime error frame), ``code`` (stable
    machine-readable string such as ``not_found``), ``message`` (for people), ``details`` (dict,
    possibly empty), ``retry_after`` (float seconds or ``None``).
    """

    code_name: ClassVar[str | None] = None
    by_code: ClassVar[dict[str, type[ApiError]]] = {}

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code} ({status}): {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.retry_after = retry_after

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code_name is not None:
            ApiError.by_code[cls.code_name] = cls


class InvalidRequest(ApiError):
    """422 ``invalid_request``: a field is missing or has a bad value (``details`` lists them)."""

    code_name = "invalid_request"


class UnresolvedPrincipal(InvalidRequest):
    """422 ``unresolved_principal``: a rule entry names no principal the org sees, or several
    (``details``: field, entry, reason, candidates)."""

    code_name = "unresolved_principal"


class Unauthenticated(ApiError):
    """401 ``unauthenticated``: no key, or a key that matches nothing."""

    code_name = "unauthenticated"


class PermissionDenied(ApiError):
    """403 ``permission_denied``: the credential may see the resource but not do this."""

    code_name = "permission_denied"


class RuleViolation(PermissionDenied):
    """403 ``rule_violation``: the agent's rule forbids this."""

    code_name = "rule_violation"


class NotFound(ApiError):
    """404 ``not_found``: missing, or outside the caller's scope (indistinguishable)."""

    code_name = "not_found"


class InviteInvalid(NotFound):
    """404 ``invite_invalid``: a join code that is wrong, expired, revoked or used up."""

    code_name = "invite_invalid"


class Conflict(ApiError):
    """409 ``conflict``: the request clashes with existing state (e.g. a duplicate key)."""

    code_name = "conflict"


class ThreadClosed(Conflict):
    """409 ``thread_closed``: the thread (or its network) is closed and read-only."""

    code_name = "thread_closed"


class NotYourTurn(Conflict):
    """409 ``not_your_turn``: the thread's adapter expects someone else to speak now."""

    code_name = "not_your_turn"


class ProtocolViolation(Conflict):
    """409 ``protocol_violation``: the envelope breaks the thread's protocol."""

    code_name = "protocol_violation"


class InvalidAudience(InvalidRequest):
    """422 ``invalid_audience``: the audience names someone who is no participant."""

    code_name = "invalid_audience"


class ClaimHeld(Conflict):
    """409 ``claim_held``: another runner's lease on the trigger is live (``retry_after``)."""

    code_name = "claim_held"


class ClaimDone(Conflict):
    """409 ``claim_done``: the trigger is done already."""

    code_name = "claim_done"


class ClaimRequired(Conflict):
    """409 ``claim_required``: the runner holds no live claim on the trigger; claim it first."""

    code_name = "claim_required"


class RateLimited(ApiError):
    """429 ``rate_limited``: too many attempts; wait ``retry_after`` seconds."""

    code_name = "rate_limited"


class BudgetExhausted(RateLimited):
    """429 ``agent_budget_exhausted``: the thread's runaway budget is spent."""

    code_name = "agent_budget_exhausted"


class EgressRefused(ApiError):
    """422 ``egress_refused``: the org's egress policy refused the text; nothing was posted."""

    code_name = "egress_refused"


class ModelUnavailable(ApiError):
    """422 ``model_unavailable``: the agent's model cannot be used."""

    code_name = "model_unavailable"


class ServerUnavailable(ApiError):
    """503 ``hub_busy`` / ``hub_unavailable``: retry later; nothing was written."""

    code_name = "hub_unavailable"


class HubBusy(ServerUnavailable):
    """503 ``hub_busy``: too many appends are waiting; nothing was written."""

    code_name = "hub_busy"


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def error_from_body(
    status: int, body: Any, *, retry_after_header: str | None = None, fallback: str = ""
) -> ApiError:
    """The :class:`ApiError` subclass for an error body (or a bare status when it has none).

    ``body`` is the decoded JSON (anything: a body that is not ``{"error": {...}}`` yields code
    ``http_error`` and ``fallback`` as message). ``retry_after`` prefers the precise
    ``details.retry_after`` over the rounded ``Retry-After`` header.
    """
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code: str = err["code"]
        message = str(err.get("message") or code)
        raw_details = err.get("details")
    else:
        code = {401: "unauthenticated", 403: "permission_denied", 404: "not_found"}.get(
            status, "http_error"
        )
        message = fallback or f"HTTP {status}"
        raw_details = None
    if isinstance(raw_details, dict):
        details: dict[str, Any] = raw_details
    elif raw_details is not None:
        details = {"problems": raw_details}
    else:
        details = {}
    retry_after = _float_or_none(details.get("retry_after"))
    if retry_after is None and retry_after_header is not None:
        retry_after = _float_or_none(retry_after_header)
    cls = ApiError.by_code.get(code)
    if cls is None:
        cls = {
            401: Unauthenticated,
            403: PermissionDenied,
            404: NotFound,
            409: Conflict,
            422: InvalidRequest,
            429: RateLimited,
            503: ServerUnavailable,
        }.get(status, ApiError)
    return cls(status, code, message, details=details, retry_after=retry_after)


class RealtimeError(ClientError):
    """A realtime connection problem that is not an error answer (protocol, closed)."""


class ConnectionClosed(RealtimeError):
    """The realtime connection (or room) is closed and will not reconnect."""
