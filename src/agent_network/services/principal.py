"""Principals (who calls) and credential hashing.

Four kinds of principal, each from one kind of bearer credential:

| credential                 | principal | acts as                                            |
|----------------------------|-----------|----------------------------------------------------|
| platform admin key         | admin     | the platform: creates orgs, sees no org data        |
| org key (``an_org_…``)     | org       | the org: manages it, posts as any of its agents/users |
| user token (``an_usr_…``)  | user      | that person only, in the teams/networks they belong to |
| agent token (``an_agt_…``) | agent     | that agent only (remote runners), likewise           |

``scopes`` is ``{"read"}`` for a read-only credential, ``{"read", "write"}`` otherwise. A
credential may have an expiry (``expires_at``, ISO time): after it, it no longer authenticates
(:func:`not_expired` is the query condition).

A fifth, internal principal has no credential: :func:`agent_principal`, a runner acting for one
of its agents under a claim (the in-process runner's replies and triage forwards). It is scoped
like that agent's token and carries the job (:class:`RunnerJob`) its audit records name.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, or_

from agent_network.model.ids import now_iso
from agent_network.store.tables import credentials

PrincipalKind = Literal["admin", "org", "user", "agent"]
READ, WRITE = "read", "write"
ALL_SCOPES = frozenset({READ, WRITE})


@dataclass(frozen=True, slots=True)
class RunnerJob:
    """The job an internal agent principal posts for: the trigger envelope ``trigger_id`` in
    thread ``thread_id``, answered by routine ``routine_id``; ``answers_person``: the trigger
    is a person's message (an answer to it is not refused by a spent runaway budget there)."""

    trigger_id: str
    thread_id: str
    routine_id: str
    answers_person: bool = False

    def audit_data(self) -> dict[str, str]:
        """``{trigger_id, routine_id}``: what every audit record of the job carries."""
        return {"trigger_id": self.trigger_id, "routine_id": self.routine_id}


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller.

    ``org_id`` is None only for the admin; ``subject_id`` is the org, user or agent the
    credential acts as; ``key_id`` identifies the credential (for the audit log);
    ``expires_at``: when the credential stops authenticating (epoch seconds; None: never), as
    it was when the caller authenticated (a long-lived connection re-checks it then).
    ``internal``: no credential stands behind it (:func:`agent_principal`; ``key_id`` is then
    the agent's id); ``job``: what such a principal posts for, left out of equality so that its
    cached post decisions serve every job of the agent.
    """

    kind: PrincipalKind
    org_id: str | None
    key_id: str
    subject_id: str | None = None
    scopes: frozenset[str] = field(default=ALL_SCOPES)
    expires_at: float | None = None
    internal: bool = False
    job: RunnerJob | None = field(default=None, compare=False)

    def expired(self, now: float) -> bool:
        """Whether ``now`` (epoch seconds) is past the expiry known to this principal."""
        return self.expires_at is not None and now >= self.expires_at

    @property
    def audit_org(self) -> str:
        """The org whose audit log records this principal's acts (``platform`` for the admin)."""
        return self.org_id or "platform"

    @property
    def credential_name(self) -> str:
        """The credential in words, for messages: ``an org key``, ``a user token``, ``an agent
        token``, ``the platform admin key``."""
        return {
            "admin": "the platform admin key",
            "org": "an org key",
            "user": "a user token",
            "agent": "an agent token",
        }[self.kind]

    @property
    def is_member_scoped(self) -> bool:
        """True for user and agent tokens: they see only the teams/networks their subject is in."""
        return self.kind in ("user", "agent")


def agent_principal(agent_id: str, org_id: str, job: RunnerJob) -> Principal:
    """The internal principal of a runner acting for agent ``agent_id`` of org ``org_id`` on
    ``job``: scoped like the agent's own token (the teams and networks it is a member of, their
    threads, restricted ones as a participant), posting only as that agent, with no credential
    to revoke (services/scope.py skips the credential check for it). Its audit records name the
    agent (``principal_kind`` ``agent``, ``principal_id`` the agent id) and the job."""
    return Principal("agent", org_id, agent_id, subject_id=agent_id, internal=True, job=job)


def new_secret(prefix: str) -> str:
    """A bearer secret such as ``an_org_<43 url-safe chars>`` (256 random bits)."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (safe for lookup; secrets are never stored raw)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def not_expired(now: str | None = None) -> ColumnElement[bool]:
    """The condition "the credential has no expiry or it is later than ``now``" on
    ``credentials`` (``now``: ISO time, default the current time; the stored times share
    :func:`~agent_network.model.ids.now_iso`'s format, so they compare as strings)."""
    return or_(credentials.c.expires_at.is_(None), credentials.c.expires_at > (now or now_iso()))


def epoch_of(iso: Any) -> float | None:
    """Epoch seconds of a stored ISO time (None stays None)."""
    return None if iso is None else datetime.fromisoformat(str(iso)).timestamp()
