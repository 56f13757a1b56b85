"""audit record numbers per org: audit_log.org_seq (1, 2, 3... within each org)

The API showed the table's global autoincrement id, so an org reading its own audit log saw
gaps made by other orgs' activity (a side channel on another tenant's volume). Records are now
numbered per org by the database itself (a trigger, so every insert path is covered), and the
API shows and pages by that number. Existing records are numbered in their id order.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_NUMBER_EXISTING = """
UPDATE audit_log SET org_seq = r.rn
FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY org_id ORDER BY id) AS rn FROM audit_log) AS r
WHERE r.id = audit_log.id
"""

_SQLITE_TRIGGER = """
CREATE TRIGGER audit_log_org_seq AFTER INSERT ON audit_log
WHEN NEW.org_seq IS NULL
BEGIN
    UPDATE audit_log
    SET org_seq = (SELECT COALESCE(MAX(org_seq), 0) + 1 FROM audit_log WHERE org_id = NEW.org_id)
    WHERE id = NEW.id;
END
"""

_PG_FUNCTION = """
CREATE FUNCTION audit_log_org_seq() RETURNS trigger AS $$
BEGIN
    IF NEW.org_seq IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('audit_log_org_seq:' || NEW.org_id));
        SELECT COALESCE(MAX(org_seq), 0) + 1 INTO NEW.org_seq
        FROM audit_log WHERE org_id = NEW.org_id;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""
_PG_TRIGGER = (
    "CREATE TRIGGER audit_log_org_seq BEFORE INSERT ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_org_seq()"
)


def upgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("org_seq", sa.Integer(), nullable=True))
    op.execute(_NUMBER_EXISTING)
    op.create_index("ux_audit_log_org_seq", "audit_log", ["org_id", "org_seq"], unique=True)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
    else:
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_org_seq ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_org_seq()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_org_seq")
    op.drop_index("ux_audit_log_org_seq", table_name="audit_log")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_column("org_seq")
