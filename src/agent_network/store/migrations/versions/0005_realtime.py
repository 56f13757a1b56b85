"""realtime and remote runners: delivery cursors, runner claims, agent resumes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resume", sa.JSON(), nullable=True))
    op.create_table(
        "delivery_cursors",
        sa.Column("subscriber_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint(
            "subscriber_id", "name", "thread_id", name=op.f("pk_delivery_cursors")
        ),
    )
    op.create_table(
        "runner_claims",
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("trigger_seq", sa.Integer(), nullable=False),
        sa.Column("runner_id", sa.String(length=100), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint(
            "agent_id", "thread_id", "trigger_seq", name=op.f("pk_runner_claims")
        ),
    )


def downgrade() -> None:
    op.drop_table("runner_claims")
    op.drop_table("delivery_cursors")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("resume")
