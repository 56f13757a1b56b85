"""Principals (who calls) and credential hashing."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: the platform admin, or an org (through one of its keys)."""

    kind: Literal["admin", "org"]
    org_id: str | None
    key_id: str

    @property
    def audit_org(self) -> str:
        """The org whose audit log records this principal's acts (``platform`` for the admin)."""
        return self.org_id or "platform"


def new_secret(prefix: str) -> str:
    """A bearer secret such as ``an_org_<43 url-safe chars>`` (256 random bits)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (safe for lookup; secrets are never stored raw)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
