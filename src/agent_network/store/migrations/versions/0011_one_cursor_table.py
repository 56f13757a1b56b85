"""one cursor table: runner_cursors and delivery_cursors become ``cursors``

Both tables held the same thing, how far a consumer has handled a thread, keyed differently.
``cursors(subscriber_id, name, thread_id, seq, updated_at)`` holds both: delivery cursors as they
were, runner cursors as subscriber = the agent's id, name = ``runner`` (store/cursors.py). Should
a realtime consumer of an agent already be called ``runner``, the two rows merge at the higher seq.
The downgrade puts the ``runner`` rows of agents back into runner_cursors and every other row into
delivery_cursors.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cursors",
        sa.Column("subscriber_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("subscriber_id", "name", "thread_id", name=op.f("pk_cursors")),
    )
    now = datetime.now(UTC).isoformat(timespec="microseconds")  # runner rows had no time
    op.get_bind().execute(
        sa.text(
            "INSERT INTO cursors (subscriber_id, name, thread_id, seq, updated_at) "
            "SELECT subscriber_id, name, thread_id, MAX(seq), MAX(updated_at) FROM ("
            " SELECT subscriber_id, name, thread_id, seq, updated_at FROM delivery_cursors"
            " UNION ALL"
            " SELECT agent_id, 'runner', thread_id, seq, :now FROM runner_cursors"
            ") AS merged GROUP BY subscriber_id, name, thread_id"
        ),
        {"now": now},
    )
    op.drop_table("delivery_cursors")
    op.drop_table("runner_cursors")


def downgrade() -> None:
    op.create_table(
        "runner_cursors",
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("thread_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "thread_id", name=op.f("pk_runner_cursors")),
    )
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
    runner = "name = 'runner' AND subscriber_id IN (SELECT id FROM agents)"
    op.execute(
        "INSERT INTO runner_cursors (agent_id, thread_id, seq) "
        f"SELECT subscriber_id, thread_id, seq FROM cursors WHERE {runner}"
    )
    op.execute(
        "INSERT INTO delivery_cursors (subscriber_id, name, thread_id, seq, updated_at) "
        f"SELECT subscriber_id, name, thread_id, seq, updated_at FROM cursors WHERE NOT ({runner})"
    )
    op.drop_table("cursors")
