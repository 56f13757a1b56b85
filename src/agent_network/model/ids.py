"""Identifiers and timestamps."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    """A random, unguessable id such as ``agt_3f9c…`` (prefix + 24 hex chars = 96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def now_iso() -> str:
    """Current UTC time as ISO-8601 with microseconds, e.g. ``2026-11-21T08:00:00.000001+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")
