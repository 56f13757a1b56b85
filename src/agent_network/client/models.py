"""Response models of the SDK (pydantic v2).

Every model allows extra fields (``extra="allow"``) so a newer server adding a field never breaks
an older client; the added fields are reachable as attributes and in ``model_extra``. Times are
timezone-aware ``datetime``; ids are strings with a kind prefix (``agt_``, ``thr_``...).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    Tag,
    model_validator,
)


class Model(BaseModel):
    """Base of every response model: unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow")


class Health(Model):
    """``GET /health``: ``status`` is ``"ok"`` once the hub runs."""

    status: str
    version: str | None = None


class Org(Model):
    """A tenant."""

    id: str
    name: str
    created_at: datetime


class OrgCreated(Model):
    """``POST /orgs`` (admin key): the org and the secret of its first org key (shown only
    here)."""

    org: Org
    secret: str


class User(Model):
    """A person of an org."""

    id: str
    org_id: str
    name: str
    email: str | None = None
    auto_ack: bool = False
    created_at: datetime


class Resume(Model):
    """What an agent claims it can do: ``capabilities``, ``domains``, a free ``summary``. The
    SDK's one resume type: an agent's stored ``resume`` and what :meth:`HubClient.register
    <agent_network.client.HubClient.register>` takes."""

    capabilities: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)
    summary: str = ""


AgentResume = Resume  # the name this type had before (kept for existing callers)


class Agent(Model):
    """An agent of an org (its passport plus identity prompt, model, metadata and resume)."""

    id: str
    org_id: str
    name: str
    lookup_key: str
    identity: str = ""
    model: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    resume: Resume | None = None
    created_at: datetime
    updated_at: datetime | None = None


class Routine(Model):
    """An event-driven behaviour of an agent (``participate`` preset by default)."""

    id: str
    agent_id: str
    name: str
    event_type: str
    handler_type: str
    preset_name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    status: str
    created_at: datetime
    updated_at: datetime | None = None


class RateLimit(Model):
    """At most ``messages`` agent messages in any ``per_seconds`` seconds."""

    messages: int
    per_seconds: float


class RulePrincipal(Model):
    """Who an id of a rule is: ``kind`` (agent, user, org), ``name``, ``org_id``, ``org_name``
    (``None`` but ``kind`` when the org no longer sees that principal)."""

    kind: str
    name: str | None = None
    org_id: str | None = None
    org_name: str | None = None


class Rule(Model):
    """An agent's rule; ``None`` fields mean no limit (see ``agent_network.model.rule``).

    ``inbound_from`` / ``outbound_to`` hold ids (agent, user, org), ``org:self`` or ``*``; when
    writing, names (``<name>``, ``org:<name>``) are accepted and resolved to ids by the server.
    ``principals`` (read-only, filled by the server) says who each id is."""

    inbound_from: list[str] = Field(default_factory=lambda: ["*"])
    outbound_to: list[str] = Field(default_factory=lambda: ["*"])
    principals: dict[str, RulePrincipal] = Field(default_factory=dict)
    rate: RateLimit | None = None
    inbox_cap: int | None = None
    max_concurrent_threads: int | None = None
    allowed_adapters: list[str] | None = None
    delegation_depth: int | None = None


class Document(Model):
    """A knowledge document (org-wide when ``agent_id`` is ``None``); ``chunks`` indexed;
    ``sha256``: hex SHA-256 of its content as UTF-8 (None from an older server)."""

    id: str
    name: str
    agent_id: str | None = None
    chunks: int = 0
    created_at: datetime
    sha256: str | None = None


class SearchHit(Model):
    """One chunk found by ``GET /knowledge/search`` (``score``: lower is better, FTS5 bm25)."""

    document_id: str
    document: str
    text: str
    score: float


class Secret(Model):
    """An agent secret's metadata (the value is never returned)."""

    name: str
    agent_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Credential(Model):
    """An org key, user token or agent token (never its secret)."""

    id: str
    org_id: str
    kind: str
    subject_id: str | None = None
    name: str = ""
    scopes: list[str] = Field(default_factory=list)
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None


class IssuedCredential(Model):
    """A new credential and its ``secret`` (shown only in this answer)."""

    credential: Credential
    secret: str


class Team(Model):
    """A team (``kind == "team"``, one org) or a network (``kind == "network"``, across orgs)."""

    id: str
    org_id: str
    kind: str
    name: str
    description: str = ""
    status: str
    created_at: datetime
    closed_at: datetime | None = None


Network = Team


class Member(Model):
    """A member of a team or network (``kind`` ``agent`` or ``user``)."""

    kind: str
    id: str
    name: str
    role: str = "member"
    org_id: str | None = None
    org_name: str | None = None


class Invite(Model):
    """A network invite. ``join_code`` is only present in the answer that created it."""

    id: str
    network_id: str | None = None
    join_code: str | None = None
    created_at: datetime | None = None
    expires_at: datetime
    max_uses: int | None = None
    uses: int | None = None
    revoked: bool | None = None


class Visa(Model):
    """The grant admitting one org (and the members it named) into a network."""

    id: str
    network_id: str
    org_id: str
    org_name: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None
    end_reason: str | None = None
    members: list[Member] = Field(default_factory=list)


class JoinResult(Model):
    """``POST /networks/join``: the network, the new visa's id and the members attached."""

    network: Team
    visa_id: str
    members: list[Member] = Field(default_factory=list)


class Participant(Model):
    """A participant of a protocol thread (``kind``: ``agent`` or ``user``)."""

    kind: str
    id: str
    name: str = ""


class Thread(Model):
    """A thread with its folded state: ``status`` (open, invited, active, closing, closed),
    ``last_seq``, runaway budget, and the protocol state: ``adapter``, ``participants``,
    ``initiator``, ``pending_acks`` (invitees still to ack), ``expected_speaker`` (id of whose
    turn it is; ``None``: anyone or nobody), ``close_reason``; for a workflow ``turns`` and
    ``context``."""

    id: str
    team_id: str
    org_id: str
    title: str
    adapter: str = "open"
    visibility: str = "members"
    status: str
    last_seq: int
    agent_budget: int | None = None
    consecutive_agent_messages: int = 0
    created_at: datetime
    participants: list[Participant] = Field(default_factory=list)
    initiator: Participant | None = None
    pending_acks: list[Participant] = Field(default_factory=list)
    expected_speaker: str | None = None
    close_reason: str | None = None
    turns: int | None = None
    context: dict[str, Any] | None = None


class Tool(Model):
    """A workflow tool an agent gets in a thread (``GET /threads/{id}/tools``): calling it
    hands off to ``handoff`` or finishes with reason ``finish`` when set."""

    name: str
    description: str = ""
    speakers: list[str] | None = None
    handoff: str | None = None
    finish: str | None = None


class Sender(Model):
    """Who sent an envelope (``kind``: ``agent``, ``user`` or ``system``)."""

    kind: str
    id: str
    name: str
    org_id: str | None = None
    org_name: str | None = None


class Envelope(Model):
    """One record of a thread's log; ``content`` is set for ``message`` envelopes.

    ``idempotency_key`` is the key as its sender gave it; ``stored_idempotency_key`` the key
    as stored and hashed (``<sender_id>:<key>`` for a client key). ``wire_created_at`` is
    ``created_at`` exactly as the server sent it (the hashed text). ``hash``/``prev_hash`` link
    the thread's chain (:func:`agent_network.client.verify_chain`).
    """

    id: str
    thread_id: str
    seq: int
    type: str
    content: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    sender: Sender
    audience: list[str] | None = None
    causation_id: str | None = None
    idempotency_key: str | None = None
    stored_idempotency_key: str | None = None
    created_at: datetime
    hash: str | None = None
    prev_hash: str | None = None
    _wire_created_at: str | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_wire_time(cls, data: Any, handler: ModelWrapValidatorHandler[Envelope]) -> Envelope:
        env = handler(data)
        if isinstance(data, dict) and isinstance(data.get("created_at"), str):
            env._wire_created_at = data["created_at"]
        return env

    @property
    def wire_created_at(self) -> str:
        """``created_at`` as the server sent it (else as the server writes it: ISO 8601 with
        microseconds)."""
        if self._wire_created_at is not None:
            return self._wire_created_at
        return self.created_at.isoformat(timespec="microseconds")


class EnvelopeStub(Model):
    """An envelope whose audience excludes the reader, as the reader gets it: its place in the
    chain (``seq``, ``hash``, ``prev_hash``) and nothing else (``stub`` is always True)."""

    thread_id: str
    seq: int
    hash: str
    prev_hash: str
    stub: Literal[True] = True


def _envelope_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "stub" if value.get("stub") is True else "envelope"
    return "stub" if isinstance(value, EnvelopeStub) else "envelope"


AnyEnvelope = Annotated[
    Annotated[Envelope, Tag("envelope")] | Annotated[EnvelopeStub, Tag("stub")],
    Discriminator(_envelope_kind),
]
"""An item of ``GET /threads/{id}/envelopes``: an :class:`Envelope`, or an
:class:`EnvelopeStub` for an envelope hidden from the reader by its audience."""


class EnvelopePage(Model):
    """A page of envelopes with ``seq > after``; ask again with ``after=next_after``.

    Pages of ``GET /threads/{id}/envelopes`` hold an :class:`EnvelopeStub` for each envelope
    hidden from the reader by its audience (``GET .../messages`` leaves those out)."""

    items: list[AnyEnvelope]
    next_after: int

    @property
    def envelopes(self) -> list[Envelope]:
        """The whole envelopes of the page (stubs left out)."""
        return [e for e in self.items if isinstance(e, Envelope)]


class VerifyReport(Model):
    """The hash chain check of a thread; ``first_bad_seq`` names the first break."""

    thread_id: str
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


class EgressRule(Model):
    """One egress rule: ``kind`` (email, card_number, secret, regex), ``action`` (refuse,
    redact), ``pattern`` for ``regex``."""

    name: str
    kind: str
    pattern: str | None = None
    action: str


class EgressPolicy(Model):
    """The org's egress policy: its rules (``updated_at`` ``None`` until set), the built-in
    ``defaults`` (``org_secrets``, ``key_formats``: refuse/redact/off; ``team_threads``) and
    ``defaults_off`` (the detectors the org turned off)."""

    rules: list[EgressRule] = Field(default_factory=list)
    updated_at: datetime | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    defaults_off: list[str] = Field(default_factory=list)


class AuditRecord(Model):
    """One audit log record (``outcome``: ``accepted`` or ``refused``)."""

    id: int
    org_id: str | None = None
    principal_kind: str | None = None
    principal_id: str | None = None
    action: str
    resource_kind: str | None = None
    resource_id: str | None = None
    outcome: str
    reason: str | None = None
    data: Any = None
    created_at: datetime


class AssignedAgent(Model):
    """An agent a runner credential runs (``inbox_cap``: its rule's cap on triggers waiting in
    one runner; None: no cap)."""

    id: str
    name: str
    org_id: str | None = None
    org_name: str | None = None
    identity: str = ""
    model: str | None = None
    inbox_cap: int | None = None


class AssignedThread(Model):
    """A thread an assigned agent follows for one routine: ``preset`` ``participate`` (it takes
    part) or ``triage`` (an intake thread of its triage routine); ``since``: messages before it
    are not that routine's."""

    thread_id: str
    title: str = ""
    since: Any = None
    preset: str = "participate"


class AssignedTriage(Model):
    """An active triage routine of an assigned agent: its id and stored config (``intake``,
    ``routes``, ``fallback``, ``use_model``; see ``agent_network.runtime.triage``)."""

    routine_id: str
    config: dict[str, Any] = Field(default_factory=dict)


class Assignment(Model):
    """``GET /runners/assignments`` item: an agent, the threads it follows (one entry per
    thread and routine) and its triage routines (oldest first)."""

    agent: AssignedAgent
    threads: list[AssignedThread] = Field(default_factory=list)
    triage: list[AssignedTriage] = Field(default_factory=list)


class RunnerJob(Model):
    """What a runner needs to answer a trigger, built by the server (``POST /claims`` with
    ``job``): the ``agent`` (``id``, ``name``, ``org_id``, ``org_name``, ``identity``,
    ``model``), the thread ``title``, the ``history`` the agent may see up to the trigger
    (``[name, org name, content]``, oldest first), ``situation`` (protocol notes),
    ``knowledge`` chunks, a workflow speaker's ``tools`` (specs), ``handoff_targets``,
    ``participants`` and ``names`` (name -> id), the reply's ``audience`` (None: everyone) and
    ``pass_on_empty`` (an empty model reply passes the turn)."""

    agent: dict[str, Any]
    title: str = ""
    history: list[list[str]] = Field(default_factory=list)
    situation: list[str] = Field(default_factory=list)
    knowledge: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    handoff_targets: list[str] = Field(default_factory=list)
    participants: list[str] = Field(default_factory=list)
    names: dict[str, str] = Field(default_factory=dict)
    audience: list[str] | None = None
    pass_on_empty: bool = False


class Claim(Model):
    """A granted lease on a trigger (``expires_at``: the server's clock). ``job``: what
    answering needs, when asked for (None: the agent is not to answer now)."""

    granted: bool = True
    agent_id: str
    thread_id: str
    trigger_seq: int
    trigger_id: str | None = None
    runner_id: str
    expires_at: Any = None
    lease_seconds: float | None = None
    job: RunnerJob | None = None


class ClaimCompleted(Model):
    """A trigger marked done."""

    done: bool = True
    agent_id: str
    thread_id: str
    trigger_seq: int


class RevealedSecret(Model):
    """``POST /runners/secrets``: one secret of the runner's agent, for its tools. ``value`` is
    a ``SecretStr`` (``value.get_secret_value()``), so printing or logging the model never
    shows it."""

    agent_id: str
    name: str
    value: SecretStr


class TriageRouted(Model):
    """``POST /runners/triage``: what the server did with an intake request. ``routed`` False:
    it stopped before routing (routine paused, not the agent's turn, a check refused it);
    ``label`` None with ``routed``: nothing matched (the reply says so); ``forward_id`` None
    with a label: the forward was refused (the reply says the request stays in intake)."""

    agent_id: str
    thread_id: str
    trigger_seq: int
    routed: bool
    label: str | None = None
    forward_id: str | None = None
    forward_thread_id: str | None = None
    reply_id: str | None = None


class ReleasedClaims(Model):
    """``POST /claims/release``: how many live leases of ``runner_id`` were ended."""

    runner_id: str
    released: int = 0


class DoneTriggers(Model):
    """The trigger seqs of a thread that are done for an agent."""

    agent_id: str
    thread_id: str
    done: list[int] = Field(default_factory=list)


class Principal(Model):
    """Who a realtime connection is authenticated as."""

    kind: str
    org_id: str | None = None
    subject_id: str | None = None


class Typing(Model):
    """A typing indicator received in a room (ephemeral, never stored)."""

    thread_id: str
    sender: Sender


__all__ = [
    "Agent",
    "AgentResume",
    "AnyEnvelope",
    "AssignedAgent",
    "AssignedThread",
    "AssignedTriage",
    "Assignment",
    "AuditRecord",
    "Claim",
    "ClaimCompleted",
    "Credential",
    "Document",
    "DoneTriggers",
    "EgressPolicy",
    "EgressRule",
    "Envelope",
    "EnvelopePage",
    "EnvelopeStub",
    "Health",
    "Invite",
    "IssuedCredential",
    "JoinResult",
    "Member",
    "Model",
    "Network",
    "Org",
    "OrgCreated",
    "Participant",
    "Principal",
    "RateLimit",
    "ReleasedClaims",
    "Resume",
    "RevealedSecret",
    "Routine",
    "Rule",
    "RulePrincipal",
    "RunnerJob",
    "SearchHit",
    "Secret",
    "Sender",
    "Team",
    "Thread",
    "Tool",
    "TriageRouted",
    "Typing",
    "User",
    "VerifyReport",
    "Visa",
]
