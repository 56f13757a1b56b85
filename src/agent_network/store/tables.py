"""SQLAlchemy Core tables: the whole schema in one place.

Every org-owned row carries ``org_id``; the WAL is ``envelopes`` with primary key
``(thread_id, seq)``, which is what keeps per-thread order correct even with several writers.
Timestamps are ISO-8601 UTC strings with microseconds (portable between SQLite and PostgreSQL and
byte-stable for hashing).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

platform_keys = Table(
    "platform_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
)

orgs = Table(
    "orgs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", String(32), nullable=False),
)

credentials = Table(
    "credentials",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("kind", String(20), nullable=False),  # org_key | user_token | agent_token
    Column("subject_id", String(40), nullable=False),  # the org, user or agent it acts as
    Column("name", String(200), nullable=False, default=""),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scopes", JSON, nullable=False),  # ["read"] or ["read", "write"]
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
    # ISO time after which it no longer authenticates; None: never (migration 0007)
    Column("expires_at", String(32)),
)

agent_secrets = Table(
    "agent_secrets",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("agent_id", String(40), ForeignKey("agents.id"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("ciphertext", Text, nullable=False),  # Fernet token (AES-128-CBC + HMAC-SHA256)
    # keyed MACs of the value and its encodings for the egress default (services/fingerprints.py)
    Column("fingerprints", JSON),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    UniqueConstraint("agent_id", "name", name="uq_agent_secrets_agent_name"),
)

org_policies = Table(
    "org_policies",
    metadata,
    Column("org_id", String(40), ForeignKey("orgs.id"), primary_key=True),
    Column("egress", JSON, nullable=False),  # {"rules": [...]} see services/policy.py
    Column("updated_at", String(32), nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320)),
    # protocol threads: acknowledge invitations automatically (migration 0006)
    Column("auto_ack", Boolean, nullable=False, default=False, server_default=false()),
    Column("created_at", String(32), nullable=False),
    Column("deleted_at", String(32)),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("lookup_key", String(100), nullable=False),
    Column("identity", Text, nullable=False, default=""),
    Column("model", String(200)),
    Column("metadata", JSON, nullable=False, default=dict),
    Column("rule", JSON),  # agent_network.model.rule.Rule as JSON; NULL: no restrictions
    Column("resume", JSON),  # {"capabilities": [...], "domains": [...], "summary": "..."}
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("deleted_at", String(32)),
)
# lookup_key is unique among an org's live agents (a deleted agent frees its key).
Index(
    "uq_agents_org_lookup_live",
    agents.c.org_id,
    agents.c.lookup_key,
    unique=True,
    sqlite_where=agents.c.deleted_at.is_(None),
    postgresql_where=agents.c.deleted_at.is_(None),
)

routines = Table(
    "routines",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("agent_id", String(40), ForeignKey("agents.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("event_type", String(100), nullable=False),
    Column("handler_type", String(40), nullable=False),
    Column("preset_name", String(100)),
    Column("config", JSON, nullable=False, default=dict),
    Column("status", String(20), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("kind", String(10), nullable=False),  # "team" (one org) | "network" (cross-org)
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("status", String(10), nullable=False),  # "open" | "closed"
    Column("created_at", String(32), nullable=False),
    Column("closed_at", String(32)),
    Column("deleted_at", String(32)),
)

visas = Table(
    "visas",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("network_id", String(40), ForeignKey("teams.id"), nullable=False, index=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("invite_id", String(40)),
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
    Column("end_reason", String(20)),  # revoked (by the host) | left (by the member org)
)

members = Table(
    "members",
    metadata,
    Column("team_id", String(40), ForeignKey("teams.id"), nullable=False),
    Column("member_kind", String(10), nullable=False),  # "agent" | "user"
    Column("member_id", String(40), nullable=False),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("role", String(10), nullable=False),  # owner | admin | member
    Column("visa_id", String(40)),
    Column("created_at", String(32), nullable=False),
    PrimaryKeyConstraint("team_id", "member_kind", "member_id"),
)
Index("ix_members_member", members.c.member_kind, members.c.member_id)

invites = Table(
    "invites",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("network_id", String(40), ForeignKey("teams.id"), nullable=False, index=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False),
    Column("code_hash", String(64), nullable=False, unique=True),
    Column("expires_at", String(32), nullable=False),
    Column("max_uses", Integer),
    Column("uses", Integer, nullable=False, default=0),
    Column("created_at", String(32), nullable=False),
    Column("revoked_at", String(32)),
)

threads = Table(
    "threads",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("team_id", String(40), ForeignKey("teams.id"), nullable=False, index=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("title", String(300), nullable=False),
    Column("adapter", String(40), nullable=False),
    Column("visibility", String(12), nullable=False, default="members"),  # members | restricted
    Column("created_at", String(32), nullable=False),
    Column("deleted_at", String(32)),
)

thread_participants = Table(
    "thread_participants",
    metadata,
    Column("thread_id", String(40), ForeignKey("threads.id"), nullable=False),
    Column("member_kind", String(10), nullable=False),  # agent | user
    Column("member_id", String(40), nullable=False),
    Column("org_id", String(40), nullable=False),
    Column("created_at", String(32), nullable=False),
    PrimaryKeyConstraint("thread_id", "member_kind", "member_id"),
)
Index("ix_thread_participants_org", thread_participants.c.org_id)

envelopes = Table(
    "envelopes",
    metadata,
    Column("thread_id", String(40), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("id", String(40), nullable=False, unique=True),
    Column("type", String(60), nullable=False),
    Column("data", JSON, nullable=False),
    Column("sender_kind", String(10), nullable=False),  # agent | user | system
    Column("sender_id", String(40), nullable=False),
    Column("sender_org_id", String(40), nullable=False),
    Column("audience", JSON),
    Column("causation_id", String(40)),
    Column("idempotency_key", String(200)),
    Column("created_at", String(32), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    PrimaryKeyConstraint("thread_id", "seq"),
    UniqueConstraint("thread_id", "idempotency_key", name="uq_envelopes_thread_idem"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("org_id", String(40), nullable=False),
    Column("principal_kind", String(20), nullable=False),
    Column("principal_id", String(40), nullable=False),
    Column("action", String(60), nullable=False),
    Column("resource_kind", String(30), nullable=False),
    Column("resource_id", String(40), nullable=False),
    Column("outcome", String(10), nullable=False),  # accepted | refused
    Column("reason", Text),
    Column("data", JSON),
    Column("created_at", String(32), nullable=False),
    # 1, 2, 3... within the org, set by a database trigger (migration 0008); the API's record id
    Column("org_seq", Integer),
)

Index("ix_audit_log_org_created", audit_log.c.org_id, audit_log.c.created_at)
Index("ux_audit_log_org_seq", audit_log.c.org_id, audit_log.c.org_seq, unique=True)
Index("ix_envelopes_sender", envelopes.c.sender_id)

# Durable cursors: the last envelope seq a named consumer of a subscriber has handled in a
# thread. ``subscriber_id`` is the principal's subject (the user or agent of a token, the org of an
# org key); ``name`` tells a subscriber's consumers apart: realtime consumers (WebSocket and SDK)
# choose theirs, the runner's is ``runner`` for the agent it answers as (store/cursors.py).
cursors = Table(
    "cursors",
    metadata,
    Column("subscriber_id", String(40), nullable=False),
    Column("name", String(100), nullable=False),
    Column("thread_id", String(40), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("updated_at", String(32), nullable=False),
    PrimaryKeyConstraint("subscriber_id", "name", "thread_id"),
)

# Work claims of runners: who is answering which trigger for which agent, until when. A claim
# whose lease expired (``expires_at`` in epoch seconds) may be taken over; ``done`` marks a
# trigger answered (or deliberately skipped) so no runner takes it again.
runner_claims = Table(
    "runner_claims",
    metadata,
    Column("agent_id", String(40), nullable=False),
    Column("thread_id", String(40), nullable=False),
    Column("trigger_seq", Integer, nullable=False),
    Column("runner_id", String(100), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("done", Boolean, nullable=False, default=False),
    PrimaryKeyConstraint("agent_id", "thread_id", "trigger_seq"),
)

knowledge_documents = Table(
    "knowledge_documents",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("org_id", String(40), ForeignKey("orgs.id"), nullable=False, index=True),
    Column("agent_id", String(40)),  # NULL: org-wide knowledge
    Column("name", String(300), nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
)

knowledge_chunks = Table(
    "knowledge_chunks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "document_id", String(40), ForeignKey("knowledge_documents.id"), nullable=False, index=True
    ),
    Column("org_id", String(40), nullable=False, index=True),
    Column("agent_id", String(40)),
    Column("ordinal", Integer, nullable=False),
    Column("text", Text, nullable=False),
)
# The full-text index over knowledge_chunks is dialect-specific (SQLite FTS5 table
# ``knowledge_fts``; PostgreSQL column ``tsv`` and its GIN index, migration 0012) and created by
# the migrations, not declared here.

# Rate-limit windows shared by the server processes on PostgreSQL (services/ratelimit.py,
# SharedWindowLimiter): one row per admitted attempt, ``at`` in epoch seconds of the database's
# clock; rows older than their window are pruned. Unused on SQLite (one process, in memory).
rate_hits = Table(
    "rate_hits",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scope", String(100), nullable=False),
    Column("key", String(300), nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_rate_hits_scope_key_at", "scope", "key", "at"),
)
