"""Typed errors shared by every layer.

Each error carries a stable machine-readable ``code`` and an HTTP ``status``; the API layer turns
any :class:`AgentNetworkError` into the JSON body ``{"error": {"code": ..., "message": ...}}``.
Services and the hub raise these; nothing below the API layer knows about HTTP otherwise.
"""

from __future__ import annotations

from typing import Any


class AgentNetworkError(Exception):
    """Base class: ``code`` (stable string), ``status`` (HTTP status), ``message`` (for people)."""

    code: str = "error"
    status: int = 400

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequestError(AgentNetworkError):
    """The request is well-formed JSON but violates a rule (bad value, bad combination)."""

    code = "invalid_request"
    status = 422


class AuthenticationError(AgentNetworkError):
    """No credential, or a credential that matches nothing."""

    code = "unauthenticated"
    status = 401


class PermissionDeniedError(AgentNetworkError):
    """The caller can see the resource but may not do this to it."""

    code = "permission_denied"
    status = 403


class NotFoundError(AgentNetworkError):
    """Missing, or outside the caller's scope: both answer exactly the same."""

    code = "not_found"
    status = 404

    def __init__(self, kind: str, resource_id: str | None = None) -> None:
        what = f"{kind} {resource_id!r}" if resource_id else kind
        super().__init__(f"{what} not found")
        self.kind = kind


class ConflictError(AgentNetworkError):
    """The request clashes with existing state (duplicate lookup_key, closed thread...)."""

    code = "conflict"
    status = 409


class ThreadClosedError(ConflictError):
    """The thread (or the network it belongs to) is closed: its history is read-only."""

    code = "thread_closed"


class RunawayBudgetError(AgentNetworkError):
    """The thread's budget of consecutive agent envelopes without a human one is spent."""

    code = "agent_budget_exhausted"
    status = 429


class InviteInvalidError(AgentNetworkError):
    """A join code that is wrong, expired or revoked (deliberately indistinguishable)."""

    code = "invite_invalid"
    status = 404


class ModelUnavailableError(AgentNetworkError):
    """An agent's model cannot be used: unknown provider, missing package or missing API key."""

    code = "model_unavailable"
    status = 422


class ModelWorkerError(ModelUnavailableError):
    """The local model's worker process died (segfault, abort, out of memory) or hung during a
    generation; it is restarted for the next request. ``details`` hold ``returncode``, ``log``
    (its last output) and ``restart_in`` (seconds)."""

    code = "model_worker_failed"
    status = 503


class NotYourTurnError(AgentNetworkError):
    """The thread's adapter expects someone else to speak now (turn order of the protocol)."""

    code = "not_your_turn"
    status = 409


class ProtocolViolationError(AgentNetworkError):
    """The envelope breaks the thread's protocol: not a participant, not acked yet, a second
    question in a consulting thread, an envelope type the adapter does not accept..."""

    code = "protocol_violation"
    status = 409


class InvalidAudienceError(InvalidRequestError):
    """An envelope's ``audience`` names someone who is not a participant of the thread."""

    code = "invalid_audience"
