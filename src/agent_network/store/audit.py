"""Storage of the audit log: append-only rows, filtered reads scoped to one org."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
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
    created_at: str | None = None,
) -> dict[str, Any]:
    """One audit record as a row dict, time-stamped ``created_at`` (default now, UTC)."""
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
        "created_at": created_at or now_iso(),
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
    action_prefix: str | None = None,
    principal_id: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: str | None = None,
    until: str | None = None,
    after_id: int = 0,
    upto_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Audit records of ``org_id`` (only), oldest first, optionally filtered.

    ``action`` is exact, ``action_prefix`` a prefix (``"network."``); ``since`` (inclusive) and
    ``until`` (exclusive) are timestamps in the stored format (:func:`now_iso`, UTC, so they
    compare as text); ``after_id < id <= upto_id`` pages. A record's ``id`` is its number within
    its org (``org_seq``: 1, 2, 3...), never the table's global row id, so that no org can count
    another org's records from the gaps.
    """
    columns = [c for c in audit_log.c if c.name not in ("id", "org_seq")]
    q = select(audit_log.c.org_seq.label("id"), *columns).where(
        audit_log.c.org_id == org_id, audit_log.c.org_seq > after_id
    )
    if upto_id is not None:
        q = q.where(audit_log.c.org_seq <= upto_id)
    if action:
        q = q.where(audit_log.c.action == action)
    if action_prefix:
        q = q.where(audit_log.c.action.startswith(action_prefix, autoescape=True))
    if principal_id:
        q = q.where(audit_log.c.principal_id == principal_id)
    if resource_id:
        q = q.where(audit_log.c.resource_id == resource_id)
    if outcome:
        q = q.where(audit_log.c.outcome == outcome)
    if since:
        q = q.where(audit_log.c.created_at >= since)
    if until:
        q = q.where(audit_log.c.created_at < until)
    q = q.order_by(audit_log.c.org_seq).limit(limit)
    return [dict(r._mapping) for r in (await conn.execute(q)).all()]


async def last_audit_id(conn: AsyncConnection, org_id: str) -> int:
    """The id (``org_seq``) of ``org_id``'s newest audit record (0 if none)."""
    q = select(func.max(audit_log.c.org_seq)).where(audit_log.c.org_id == org_id)
    return int((await conn.execute(q)).scalar_one_or_none() or 0)
