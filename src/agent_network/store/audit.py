"""Storage of the audit log: append-only rows, filtered reads scoped to one org."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.model.ids import now_iso
from agent_network.store.tables import audit_log


def audit_row(
    *,
    org_id: str,
    principal_kind: str,
    principal_id: str,
    action: str,
    resource_kind: str,
    resource_id: str,
    outcome: str = "accepted",
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One audit record as a row dict, time-stamped now (UTC)."""
    return {
        "org_id": org_id,
        "principal_kind": principal_kind,
        "principal_id": principal_id,
        "action": action,
        "resource_kind": resource_kind,
        "resource_id": resource_id,
        "outcome": outcome,
        "reason": reason,
        "data": data,
        "created_at": now_iso(),
    }


async def insert_audit(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` (from :func:`audit_row`) inside the caller's transaction."""
    if rows:
        await conn.execute(audit_log.insert(), list(rows))


async def read_audit(
    conn: AsyncConnection,
    org_id: str,
    *,
    action: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Audit records of ``org_id`` (only), oldest first, optionally filtered."""
    q = select(audit_log).where(audit_log.c.org_id == org_id, audit_log.c.id > after_id)
    if action:
        q = q.where(audit_log.c.action == action)
    if resource_id:
        q = q.where(audit_log.c.resource_id == resource_id)
    if outcome:
        q = q.where(audit_log.c.outcome == outcome)
    q = q.order_by(audit_log.c.id).limit(limit)
    return [dict(r._mapping) for r in (await conn.execute(q)).all()]
