"""Request bodies of the REST API (responses are the services' documented dicts)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    """Base: unknown fields are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class OrgCreate(Body):
    name: str = Field(min_length=1, max_length=200)


class UserCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)


class UserUpdate(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)


class AgentCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    lookup_key: str = Field(min_length=1, max_length=100)
    identity: str = Field(default="", max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AgentUpdate(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    lookup_key: str | None = Field(default=None, min_length=1, max_length=100)
    identity: str | None = Field(default=None, max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None


class RoutineCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    event_type: str = "thread.message_added"
    handler_type: str = "preset"
    preset_name: str | None = "participate"
    config: dict[str, Any] = Field(default_factory=dict)


class RoutineUpdate(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    config: dict[str, Any] | None = None
    status: Literal["active", "paused"] | None = None


class TeamCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=5000)


class TeamUpdate(Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)


class MemberAdd(Body):
    agent_id: str | None = None
    user_id: str | None = None
    role: Literal["owner", "admin", "member"] = "member"


class InviteCreate(Body):
    expires_in: float = Field(default=7 * 24 * 3600, gt=0, description="seconds")
    max_uses: int | None = Field(default=None, ge=1)


class JoinRequest(Body):
    code: str = Field(min_length=1, max_length=64)
    agent_ids: list[str] = Field(default_factory=list, max_length=100)
    user_ids: list[str] = Field(default_factory=list, max_length=100)


class ThreadCreate(Body):
    title: str = Field(min_length=1, max_length=300)
    agent_budget: int | None = Field(default=None, ge=0, le=1000)


class ThreadUpdate(Body):
    agent_budget: int = Field(ge=0, le=1000)


class MessageCreate(Body):
    content: str = Field(min_length=1, max_length=32_000)
    agent_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class Document(Body):
    name: str = Field(min_length=1, max_length=300)
    content: str


class KnowledgeAdd(Body):
    documents: list[Document] = Field(min_length=1, max_length=200)
