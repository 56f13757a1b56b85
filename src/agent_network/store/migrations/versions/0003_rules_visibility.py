"""rules and visibility: agent rules, restricted threads and their participants

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule", sa.JSON(), nullable=True))
    with op.batch_alter_table("threads", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("visibility", sa.String(length=12), nullable=False, server_default="members")
        )
    op.create_table(
        "thread_participants",
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("member_kind", sa.String(length=10), nullable=False),
        sa.Column("member_id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["thread_id"], ["threads.id"], name=op.f("fk_thread_participants_thread_id_threads")
        ),
        sa.PrimaryKeyConstraint(
            "thread_id", "member_kind", "member_id", name=op.f("pk_thread_participants")
        ),
    )
    op.create_index("ix_thread_participants_org", "thread_participants", ["org_id"])
    op.create_index("ix_envelopes_sender", "envelopes", ["sender_id"])


def downgrade() -> None:
    op.drop_index("ix_envelopes_sender", table_name="envelopes")
    op.drop_index("ix_thread_participants_org", table_name="thread_participants")
    op.drop_table("thread_participants")
    with op.batch_alter_table("threads", schema=None) as batch_op:
        batch_op.drop_column("visibility")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("rule")
