"""Principals (who calls) and credential hashing.

Four kinds of principal, each from one kind of bearer credential:

| credential                 | principal | acts as                                            |
|----------------------------|-----------|----------------------------------------------------|
| platform admin key         | admin     | the platform: creates orgs, sees no org data        |
| org key (``an_org_…``)     | org       | the org: manages it, posts as any of its agents/users |
| user token (``an_usr_…``)  | user      | that person only, in the teams/networks they belong to |
| agent token (``an_agt_…``) | agent     | that agent only (remote runners), likewise           |

``scopes`` is ``{"read"}`` for a read-only credential, ``{"read", "write"}`` otherwise.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Literal

PrincipalKind = Literal["admin", "org", "user", "agent"]
READ, WRITE = "read", "write"
ALL_SCOPES = frozenset({READ, WRITE})


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller.

    ``org_id`` is None only for the admin; ``subject_id`` is the org, user or agent the
    credential acts as; ``key_id`` identifies the credential (for the audit log).
    """

    kind: PrincipalKind
    org_id: str | None
    key_id: str
    subject_id: str | None = None
    scopes: frozenset[str] = field(default=ALL_SCOPES)

    @property
    def audit_org(self) -> str:
        """The org whose audit log records this principal's acts (``platform`` for the admin)."""
        return self.org_id or "platform"

    @property
    def is_member_scoped(self) -> bool:
        """True for user and agent tokens: they see only the teams/networks their subject is in."""
        return self.kind in ("user", "agent")


def new_secret(prefix: str) -> str:
    """A bearer secret such as ``an_org_<43 url-safe chars>`` (256 random bits)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (safe for lookup; secrets are never stored raw)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
