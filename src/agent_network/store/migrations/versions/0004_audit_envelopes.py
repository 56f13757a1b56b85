"""audit of accepted envelopes: drop the audit index the (org_id, created_at) index covers

Every accepted envelope now writes an audit record in the same transaction, so each index on
``audit_log`` costs every append; ``ix_audit_log_org_id`` is a prefix of
``ix_audit_log_org_created`` and answers no query the latter cannot.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_org_id")


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_org_id", ["org_id"], unique=False)
