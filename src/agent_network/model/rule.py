"""The rule: per-agent governance the hub enforces (seed: Rule / HubArbiter).

Patterns (``inbound_from``, ``outbound_to``) are shell-style globs (``fnmatch``, case-insensitive)
matched against a participant's display name and against ``org:<org name>``; ``"*"`` matches
everything. An empty list matches nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class RateLimit(BaseModel):
    """At most ``messages`` agent messages in any ``per_seconds`` seconds."""

    model_config = ConfigDict(extra="forbid")

    messages: int = Field(ge=1, le=100_000)
    per_seconds: float = Field(gt=0, le=86_400)


class Rule(BaseModel):
    """What an agent may do. Every field is enforced; ``None`` means no limit.

    - ``inbound_from``: whose messages the agent reacts to (others never trigger it).
    - ``outbound_to``: every other participant of a thread the agent posts into must match.
    - ``rate``: messages per window, across all threads.
    - ``inbox_cap``: at most this many triggers waiting for the agent; more are dropped.
    - ``max_concurrent_threads``: open threads the agent has posted in, at most.
    - ``allowed_adapters``: thread adapters the agent may post in (``None``: any).
    - ``delegation_depth``: at most this many agent replies in a causation chain ending in the
      agent's own reply (a reply to a person has depth 1, a reply to that reply depth 2, ...).
    """

    model_config = ConfigDict(extra="forbid")

    inbound_from: list[str] = Field(default_factory=lambda: ["*"], max_length=100)
    outbound_to: list[str] = Field(default_factory=lambda: ["*"], max_length=100)
    rate: RateLimit | None = None
    inbox_cap: int | None = Field(default=None, ge=0, le=1_000_000)
    max_concurrent_threads: int | None = Field(default=None, ge=0, le=1_000_000)
    allowed_adapters: list[str] | None = Field(default=None, max_length=20)
    delegation_depth: int | None = Field(default=None, ge=0, le=1000)


def matches(patterns: Iterable[str], name: str, org_name: str) -> bool:
    """True when any pattern matches ``name`` or ``org:<org_name>`` (case-insensitive globs)."""
    subjects = (name.lower(), f"org:{org_name}".lower())
    return any(fnmatch.fnmatchcase(s, p.lower()) for p in patterns for s in subjects)
