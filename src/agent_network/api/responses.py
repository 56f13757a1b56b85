"""Response bodies of the REST API, as Pydantic models (the OpenAPI schema's responses).

Routes set them as ``response_model`` over the services' dicts; every route answers with
``response_model_exclude_unset`` (see :class:`ApiRoute`), so an answer holds exactly the keys the
service returned: a model never adds a key (fields the service leaves out stay out) and, being
``extra="forbid"``, never drops one silently (an unmodelled key fails the response validation,
which the tests catch). Models of bodies whose keys vary by design (a job, a thread's protocol
state, an envelope's ``data``) name their fixed keys and allow more (:class:`OpenOut`).

:data:`ERROR_RESPONSES` documents the project's error body (:class:`ErrorBody`) for the error
statuses every route can answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_network.model.rule import Rule

__all__ = ["ERROR_RESPONSES", "ErrorBody", "ErrorDetail", "OpenOut", "Out"]


class Out(BaseModel):
    """A response body: exactly these keys (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")


class OpenOut(BaseModel):
    """A response body with these keys and possibly more (documented per model)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- errors


class ErrorDetail(Out):
    code: str = Field(description="stable machine-readable code, e.g. not_found, invalid_request")
    message: str = Field(description="what went wrong and what to do, for people")
    details: Any = Field(
        default=None,
        description="more about it (e.g. the invalid fields of a 422, retry_after of a 429)",
    )
    request_id: str | None = Field(
        default=None, description="the request's X-Request-ID, to quote in a support request"
    )


class ErrorBody(Out):
    """Every error answer: ``{"error": {"code", "message", "details"?, "request_id"}}``."""

    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("no credential, or one that is unknown, revoked or expired (unauthenticated)"),
    403: _error("the credential may not make this call (permission_denied)"),
    404: _error("missing, or outside the caller's scope: both answer the same (not_found)"),
    409: _error("clashes with the current state (conflict, thread_closed, claim_held, ...)"),
    422: _error("an invalid body, query or path parameter (invalid_request, ...)"),
    429: _error("rate limited (rate_limited, agent_budget_exhausted); see Retry-After"),
}


# ---------------------------------------------------------------------------- meta


class ModelWorker(OpenOut):
    state: str
    model: str | None = None
    restarts: int
    last_failure: str | None = None


class Health(Out):
    status: Literal["ok"]
    version: str
    model_worker: ModelWorker


# ---------------------------------------------------------------------------- orgs, users


class Org(Out):
    id: str
    name: str
    created_at: str


class Credential(Out):
    id: str
    org_id: str
    kind: Literal["org_key", "user_token", "agent_token"]
    subject_id: str | None
    name: str
    scopes: list[str]
    created_at: str
    revoked_at: str | None
    expires_at: str | None


class IssuedCredential(Out):
    """A credential just made; ``secret`` is shown in this answer only."""

    credential: Credential
    secret: str = Field(description="the bearer secret; shown this once, never again")


class OrgCreated(Out):
    """A new org and its first org key; ``secret`` is shown in this answer only."""

    org: Org
    secret: str = Field(description="the org key's bearer secret; shown this once, never again")


class User(Out):
    id: str
    org_id: str
    name: str
    email: str | None
    created_at: str
    auto_ack: bool


class AuditRecord(Out):
    id: int = Field(description="the record's number within its org: 1, 2, 3...")
    org_id: str
    principal_kind: str
    principal_id: str | None
    action: str
    resource_kind: str | None
    resource_id: str | None
    outcome: str
    reason: str | None
    data: Any
    created_at: str


# ---------------------------------------------------------------------------- agents


class Agent(Out):
    id: str
    org_id: str
    name: str
    lookup_key: str
    identity: str
    model: str | None
    metadata: dict[str, Any]
    resume: dict[str, Any] | None
    created_at: str
    updated_at: str | None


class Routine(Out):
    id: str
    agent_id: str
    name: str
    event_type: str
    handler_type: str
    preset_name: str | None
    config: dict[str, Any]
    status: str
    created_at: str
    updated_at: str | None


class PrincipalLabel(OpenOut):
    kind: str
    name: str
    org_id: str | None = None
    org_name: str | None = None


class RuleOut(Rule):
    """An agent's rule with ``principals`` naming the ids in it."""

    principals: dict[str, PrincipalLabel] = Field(
        default_factory=dict, description="id -> {kind, name, org_id, org_name}"
    )


class SecretSet(Out):
    agent_id: str
    name: str
    updated_at: str


class SecretName(Out):
    name: str
    created_at: str
    updated_at: str | None


class SecretValue(Out):
    agent_id: str
    name: str
    value: str


# ---------------------------------------------------------------------------- knowledge


class KnowledgeDocument(Out):
    id: str
    name: str
    agent_id: str | None
    created_at: str
    chunks: int
    sha256: str


class KnowledgeHit(OpenOut):
    document_id: str
    document: str
    text: str
    score: float


# ---------------------------------------------------------------------------- policy


class EgressRuleOut(Out):
    name: str
    kind: str
    pattern: str | None
    action: str


class EgressDefaultsOut(Out):
    org_secrets: str
    key_formats: str
    team_threads: bool


class EgressPolicyOut(Out):
    rules: list[EgressRuleOut]
    updated_at: str | None
    defaults: EgressDefaultsOut
    defaults_off: list[str]


# ---------------------------------------------------------------------------- teams, networks


class Team(Out):
    """A team (one org) or a network (across orgs)."""

    id: str
    org_id: str
    kind: Literal["team", "network"]
    name: str
    description: str
    status: str
    created_at: str
    closed_at: str | None


class Member(Out):
    kind: Literal["agent", "user"]
    id: str
    name: str
    role: str
    org_id: str
    org_name: str | None = None


class VisaMember(Out):
    kind: Literal["agent", "user"]
    id: str
    name: str
    role: str


class Visa(Out):
    id: str
    network_id: str
    org_id: str
    org_name: str
    created_at: str
    revoked_at: str | None
    end_reason: str | None
    members: list[VisaMember]


class InviteCreated(Out):
    id: str
    network_id: str
    join_code: str = Field(description="shown this once")
    expires_at: str
    max_uses: int | None


class Invite(Out):
    id: str
    created_at: str
    expires_at: str
    max_uses: int | None
    uses: int
    revoked: bool


class Joined(Out):
    network: Team
    visa_id: str
    members: list[Member]


# ---------------------------------------------------------------------------- threads


class Person(Out):
    kind: str
    id: str
    name: str


class Thread(OpenOut):
    """A thread with its folded protocol state; a workflow adds ``turns`` and ``context``."""

    id: str
    team_id: str
    org_id: str
    title: str
    adapter: str
    visibility: str
    status: str
    last_seq: int
    agent_budget: int | None
    consecutive_agent_messages: int
    created_at: str
    participants: list[Person]
    initiator: Person | None
    pending_acks: list[Person]
    expected_speaker: str | None
    close_reason: str | None
    turns: int | None = None
    context: dict[str, Any] | None = None


class Sender(Out):
    kind: str
    id: str
    name: str
    org_id: str | None
    org_name: str


class Envelope(Out):
    """An envelope (message or thread event); a stub (``"stub": true``) for an envelope whose
    audience leaves the reader out carries only ``thread_id``, ``seq``, ``hash``,
    ``prev_hash``."""

    id: str | None = None
    thread_id: str
    seq: int
    type: str | None = None
    content: str | None = None
    data: dict[str, Any] | None = None
    sender: Sender | None = None
    causation_id: str | None = None
    idempotency_key: str | None = None
    stored_idempotency_key: str | None = None
    audience: list[str] | None = None
    created_at: str | None = None
    hash: str
    prev_hash: str | None
    stub: bool | None = None


class EnvelopePage(Out):
    items: list[Envelope]
    next_after: int = Field(description="pass back as ``after`` for the next page")


class Verification(Out):
    thread_id: str
    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str | None


class WorkflowTool(OpenOut):
    name: str


# ---------------------------------------------------------------------------- runners


class Assignment(OpenOut):
    """An agent a runner runs: ``agent``, ``threads`` to follow, ``triage`` configs."""

    agent: dict[str, Any]
    threads: list[dict[str, Any]]
    triage: list[dict[str, Any]]


class Claim(OpenOut):
    """A granted claim; with ``job`` requested, the job the server built (or null)."""

    granted: bool
    agent_id: str
    thread_id: str
    trigger_seq: int
    trigger_id: str
    runner_id: str
    expires_at: Any
    lease_seconds: float
    job: dict[str, Any] | None = None


class ClaimDone(Out):
    done: bool
    agent_id: str
    thread_id: str
    trigger_seq: int


class Released(Out):
    runner_id: str
    released: int


class DoneSeqs(Out):
    agent_id: str
    thread_id: str
    done: list[int]


class TriageRouted(Out):
    agent_id: str
    thread_id: str
    trigger_seq: int
    routed: bool
    label: str | None
    forward_id: str | None
    forward_thread_id: str | None
    reply_id: str | None
