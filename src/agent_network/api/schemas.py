"""Request bodies of the REST API (response bodies: :mod:`agent_network.api.responses`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CURSOR = 2**62

Cursor = Annotated[int, Query(ge=0, le=MAX_CURSOR, description="return items after this one")]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items")]
Wait = Annotated[float, Query(ge=0, le=60, description="seconds to wait for a new item")]


class Body(BaseModel):
    """Base: unknown fields are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class PatchBody(Body):
    """A partial update: fields left out are unchanged; ``null`` is only accepted for the fields
    in ``nullable`` (it clears them) and is an error for every other field."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_null_for_required(self) -> PatchBody:
        bad = sorted(
            name
            for name in self.model_fields_set
            if getattr(self, name) is None and name not in self.nullable
        )
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be null (leave the field out to keep it)")
        return self


class OrgCreate(Body):
    name: str = Field(min_length=1, max_length=200)


AUTO_ACK = "acknowledge invitations to protocol threads automatically"


class UserCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    auto_ack: bool = Field(default=False, description=AUTO_ACK)


class UserUpdate(PatchBody):
    nullable = frozenset({"email"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    auto_ack: bool | None = Field(default=None, description=AUTO_ACK)


class Resume(Body):
    """What an agent claims it can do (the hub adds the observed track record later)."""

    capabilities: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=50
    )
    domains: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=50
    )
    summary: str = Field(default="", max_length=4000)


class AgentCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    lookup_key: str = Field(min_length=1, max_length=100)
    identity: str = Field(default="", max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    resume: Resume | None = None


class AgentUpdate(PatchBody):
    nullable = frozenset({"model", "resume"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    lookup_key: str | None = Field(default=None, min_length=1, max_length=100)
    identity: str | None = Field(default=None, max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    resume: Resume | None = None


class RoutineCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    event_type: str = "thread.message_added"
    handler_type: str = "preset"
    preset_name: str | None = "participate"
    config: dict[str, Any] = Field(default_factory=dict)


class RoutineUpdate(PatchBody):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    config: dict[str, Any] | None = None
    status: Literal["active", "paused"] | None = None


class TeamCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=5000)


class TeamUpdate(PatchBody):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)


class MemberAdd(Body):
    agent_id: str | None = None
    user_id: str | None = None
    role: Literal["owner", "admin", "member"] = "member"


class MemberUpdate(Body):
    role: Literal["owner", "admin", "member"]


class InviteCreate(Body):
    expires_in: float = Field(default=7 * 24 * 3600, gt=0, le=90 * 24 * 3600, description="seconds")
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)


class JoinRequest(Body):
    code: str = Field(min_length=1, max_length=64)
    agent_ids: list[str] = Field(default_factory=list, max_length=100)
    user_ids: list[str] = Field(default_factory=list, max_length=100)


class Participant(Body):
    kind: Literal["agent", "user"]
    id: str = Field(min_length=1, max_length=40)


class ExpectationBody(Body):
    """A deadline rule on a protocol thread (``agent_network.protocol.Expectation``)."""

    kind: Literal["reply_within", "acks_within", "max_silence", "turn_within"]
    seconds: float = Field(gt=0, description="seconds")
    handler: Literal["audit", "notify", "auto_close"] = "audit"
    name: str | None = Field(
        default=None, min_length=1, max_length=60, description="default: the kind"
    )


class ThreadCreate(Body):
    title: str = Field(min_length=1, max_length=300)
    agent_budget: int | None = Field(default=None, ge=0, le=1000)
    visibility: Literal["members", "restricted"] = "members"
    participants: list[Participant] = Field(default_factory=list, max_length=200)
    adapter: str = Field(
        default="open",
        min_length=1,
        max_length=60,
        description="the thread's protocol: open (default), conversation, consulting, "
        "discussion, workflow or a registered custom adapter",
    )
    initiator: Participant | None = Field(
        default=None, description="protocol threads: who opens it (default: first participant)"
    )
    invitees: list[Participant] | None = Field(
        default=None,
        max_length=200,
        description="protocol threads: who must ack first (default: every participant but the "
        "initiator; [] = nobody)",
    )
    ttl: float | None = Field(default=None, gt=0, description="seconds until it closes")
    ack_timeout: float | None = Field(
        default=None, gt=0, description="seconds the invitees have to ack"
    )
    expectations: list[ExpectationBody] = Field(default_factory=list, max_length=20)
    names: dict[str, str] | None = Field(
        default=None,
        description="participant name -> id for workflow targets (default: built from the "
        "participants' names and lookup keys)",
    )
    graph: dict[str, Any] | None = Field(
        default=None, description="workflow: TransitionGraph.to_dict()"
    )
    order: list[str] | None = Field(
        default=None, max_length=200, description="discussion: speaking order (participant ids)"
    )
    ordering: str | None = Field(default=None, max_length=60, description="discussion ordering")
    knobs: dict[str, Any] | None = Field(
        default=None, description="further knobs of a custom adapter (thread.created data)"
    )

    def participant_pairs(self) -> list[tuple[str, str]]:
        return [(str(p.kind), p.id) for p in self.participants]

    def protocol(self) -> dict[str, Any]:
        """The protocol knobs given, as ``ThreadService.create`` keyword arguments."""
        out: dict[str, Any] = {"adapter": self.adapter}
        if self.initiator is not None:
            out["initiator"] = (str(self.initiator.kind), self.initiator.id)
        if self.invitees is not None:
            out["invitees"] = [(str(p.kind), p.id) for p in self.invitees]
        out["ttl"] = self.ttl
        out["ack_timeout"] = self.ack_timeout
        out["expectations"] = [e.model_dump(exclude_none=True) for e in self.expectations]
        out["names"] = self.names
        out["graph"] = self.graph
        knobs = dict(self.knobs or {})
        if self.order is not None:
            knobs["order"] = self.order
        if self.ordering is not None:
            knobs["ordering"] = self.ordering
        out["knobs"] = knobs
        return out


class ThreadUpdate(PatchBody):
    agent_budget: int | None = Field(default=None, ge=0, le=1000)
    visibility: Literal["members", "restricted"] | None = None

    @model_validator(mode="after")
    def _something(self) -> ThreadUpdate:
        if not self.model_fields_set:
            raise ValueError("give agent_budget and/or visibility")
        return self


class ParticipantsAdd(Body):
    participants: list[Participant] = Field(min_length=1, max_length=200)


class ToolCallBody(Body):
    """One tool call of a message (stored in ``data["tool_calls"]``; the workflow adapter reads
    them: a ``result`` ``{"kind": "handoff", "target", "reason"}`` picks the next speaker,
    ``{"kind": "finish", "summary", "reason"}`` ends the workflow)."""

    name: str = Field(min_length=1, max_length=100)
    args: dict[str, Any] | None = None
    result: Any = None


class SenderChoice(Body):
    agent_id: str | None = None
    user_id: str | None = None


class AckBody(SenderChoice):
    """Ack an invitation as one of the caller's own agents or users (a token: itself)."""


class RejectBody(SenderChoice):
    reason: str | None = Field(default=None, min_length=1, max_length=200)


class CloseBody(Body):
    reason: str | None = Field(default=None, min_length=1, max_length=200)


class ContextSet(SenderChoice):
    values: dict[str, Any] = Field(min_length=1, max_length=100, description="key -> JSON value")


class MessageCreate(Body):
    content: str = Field(min_length=1, max_length=32_000)
    audience: list[Annotated[str, Field(min_length=1, max_length=40)]] | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="participant ids (agents, users) who receive it; omit for everyone",
    )
    tool_calls: list[ToolCallBody] | None = Field(default=None, max_length=50)
    agent_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=150,
        description="scoped to the sender: the same key from the same sender returns the original",
    )
    causation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="id of the envelope of this thread this message answers (a runner's trigger)",
    )


class Document(Body):
    name: str = Field(min_length=1, max_length=300)
    content: str


class KnowledgeAdd(Body):
    documents: list[Document] = Field(min_length=1, max_length=200)


class CredentialCreate(Body):
    kind: Literal["org_key", "user_token", "agent_token"]
    subject_id: str | None = Field(default=None, description="the user or agent a token acts as")
    name: str = Field(default="", max_length=200)
    scopes: list[Literal["read", "write"]] = Field(default=["read", "write"])
    expires_in: float | None = Field(
        default=None,
        ge=1,
        le=10 * 365 * 86400,
        description="seconds until it stops authenticating (null: never)",
    )


class CredentialRenew(Body):
    expires_in: float = Field(ge=1, le=10 * 365 * 86400, description="seconds from now")


class SecretPut(Body):
    value: str = Field(min_length=1, max_length=16_384)


class EgressRuleBody(Body):
    name: str = Field(min_length=1, max_length=64)
    kind: Literal["email", "card_number", "secret", "regex"]
    pattern: str | None = Field(default=None, description="a Python regex, for kind 'regex' only")
    action: Literal["refuse", "redact"]


class EgressDefaultsBody(Body):
    org_secrets: Literal["refuse", "redact", "off"] = Field(
        default="refuse", description="the org's own stored agent secrets and their encodings"
    )
    key_formats: Literal["refuse", "redact", "off"] = Field(
        default="redact", description="common key formats (cloud, VCS, chat, payment tokens...)"
    )
    team_threads: bool = Field(
        default=False, description="apply these defaults in the org's own team threads too"
    )


class EgressPolicyBody(Body):
    rules: list[EgressRuleBody] = Field(max_length=50)
    defaults: EgressDefaultsBody | None = Field(
        default=None, description="the built-in detectors (omitted: all on, as built in)"
    )
    acknowledge_loosening: bool = Field(
        default=False, description="required (true) to turn a default detector off"
    )
