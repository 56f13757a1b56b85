"""Identifiers and timestamps."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    """A random, unguessable id such as ``agt_3f9c…`` (prefix + 24 hex chars = 96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def new_sorted_id(prefix: str) -> str:
    """A random id whose first 12 hex chars are the milliseconds since the Unix epoch, such as
    ``env_019a3c5e7f21…`` (prefix + 12 time + 20 random hex chars = 80 random bits).

    Ids made later sort after earlier ones (within a millisecond, randomly), so a unique index
    on them grows at its end like a counter instead of taking each insert at a random leaf: a
    commit then dirties one index page already in cache, and a WAL checkpoint copies a few
    adjacent pages instead of one random page per commit (the layout of UUIDv7, RFC 9562
    section 5.7, in hex).
    """
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def now_iso() -> str:
    """Current UTC time as ISO-8601 with microseconds, e.g. ``2026-11-21T08:00:00.000001+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")
