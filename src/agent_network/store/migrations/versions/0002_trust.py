"""trust: credentials (org keys, user and agent tokens), agent secrets, egress policies, visa end

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("subject_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.Column("revoked_at", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_credentials_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credentials")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_credentials_key_hash")),
    )
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_credentials_org_id"), ["org_id"], unique=False)
    # existing org keys become credentials of kind org_key with full scopes
    op.execute(
        "INSERT INTO credentials (id, org_id, kind, subject_id, name, key_hash, scopes, "
        "created_at, revoked_at) SELECT id, org_id, 'org_key', org_id, 'initial key', key_hash, "
        '\'["read", "write"]\', created_at, revoked_at FROM org_keys'
    )
    with op.batch_alter_table("org_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_org_keys_org_id"))
    op.drop_table("org_keys")

    op.create_table(
        "agent_secrets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_agent_secrets_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_agent_secrets_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_secrets")),
        sa.UniqueConstraint("agent_id", "name", name="uq_agent_secrets_agent_name"),
    )
    with op.batch_alter_table("agent_secrets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_secrets_org_id"), ["org_id"], unique=False)

    op.create_table(
        "org_policies",
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("egress", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_org_policies_org_id_orgs")),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_policies")),
    )
    with op.batch_alter_table("visas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("end_reason", sa.String(length=20), nullable=True))
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_org_created", ["org_id", "created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_org_created")
    with op.batch_alter_table("visas", schema=None) as batch_op:
        batch_op.drop_column("end_reason")
    op.drop_table("org_policies")
    op.drop_table("agent_secrets")
    op.create_table(
        "org_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.Column("revoked_at", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_org_keys_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_org_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_org_keys_key_hash")),
    )
    op.execute(
        "INSERT INTO org_keys (id, org_id, key_hash, created_at, revoked_at) SELECT id, org_id, "
        "key_hash, created_at, revoked_at FROM credentials WHERE kind = 'org_key'"
    )
    op.drop_table("credentials")
