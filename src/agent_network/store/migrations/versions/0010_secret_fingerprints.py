"""secret fingerprints: agent_secrets.fingerprints (keyed MACs for the egress default)

The egress default checks what an org's agents post into networks against the org's own stored
secrets without decrypting them on every post: each secret row carries keyed MACs of its value
and of simple encodings of it (services/fingerprints.py). The MAC key derives from the server's
secret key, which a migration does not have, so existing rows keep NULL here and are
fingerprinted by the server on first use (services/secrets.py::OrgSecrets.index).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agent_secrets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fingerprints", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_secrets", schema=None) as batch_op:
        batch_op.drop_column("fingerprints")
