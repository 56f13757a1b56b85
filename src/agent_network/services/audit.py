"""Reading an org's own audit log: filtered pages and a full export."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent_network.errors import InvalidRequestError
from agent_network.services.base import ServiceContext
from agent_network.services.principal import Principal
from agent_network.services.scope import require_org
from agent_network.store.audit import last_audit_id, read_audit

EXPORT_BATCH = 1000
OUTCOMES = ("accepted", "refused")


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Validated filters, in the stored form (see :func:`agent_network.store.audit.read_audit`)."""

    action: str | None = None
    action_prefix: str | None = None
    principal_id: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None

    def query(self) -> dict[str, Any]:
        """Keyword arguments for ``read_audit``."""
        return {
            "action": self.action,
            "action_prefix": self.action_prefix,
            "principal_id": self.principal_id,
            "resource_id": self.resource_id,
            "outcome": self.outcome,
            "since": self.since,
            "until": self.until,
        }


def parse_timestamp(name: str, value: str) -> str:
    """An ISO-8601 timestamp (``2026-01-31T12:00:00Z``, with an offset, or a bare date; no
    offset means UTC) in the stored form: UTC with microseconds. InvalidRequestError otherwise."""
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequestError(
            f"{name} must be an ISO-8601 timestamp such as 2026-01-31T12:00:00Z "
            "(in a URL, write a '+' offset as %2B)"
        ) from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def audit_filter(
    *,
    action: str | None = None,
    principal_id: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> AuditFilter:
    """Validate the filters of an audit query.

    ``action`` is exact (``thread.create``) or a prefix ending in ``*`` (``network.*``; ``*``
    alone matches every action); ``since`` (inclusive) and ``until`` (exclusive) are ISO-8601
    timestamps (:func:`parse_timestamp`); ``outcome`` is ``accepted`` or ``refused``.
    InvalidRequestError (422) otherwise.
    """
    exact = prefix = None
    if action:
        if "*" in action[:-1]:
            raise InvalidRequestError("action takes '*' only at its end, as in 'network.*'")
        if action.endswith("*"):
            prefix = action[:-1] or None
        else:
            exact = action
    if outcome and outcome not in OUTCOMES:
        raise InvalidRequestError(f"outcome must be one of {', '.join(OUTCOMES)}")
    start = parse_timestamp("since", since) if since else None
    end = parse_timestamp("until", until) if until else None
    if start and end and start > end:
        raise InvalidRequestError("since must not be later than until")
    return AuditFilter(
        action=exact,
        action_prefix=prefix,
        principal_id=principal_id or None,
        resource_id=resource_id or None,
        outcome=outcome or None,
        since=start,
        until=end,
    )


class AuditService:
    """An org reads only its own audit records."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list_records(
        self,
        principal: Principal,
        *,
        after_id: int = 0,
        limit: int = 100,
        **filters: str | None,
    ) -> list[dict[str, Any]]:
        """The caller org's audit records, oldest first, filtered by ``filters`` (the keyword
        arguments of :func:`audit_filter`); ``after_id`` pages, ``limit`` 1-1001 (the API asks
        one more than the page's 1-1000 to learn whether a next page exists)."""
        org_id = require_org(principal)
        if not 1 <= limit <= 1001:
            raise InvalidRequestError("limit must be between 1 and 1000")
        if after_id < 0:
            raise InvalidRequestError("after_id must be >= 0")
        where = audit_filter(**filters)
        async with self.ctx.engine.connect() as conn:
            return await read_audit(conn, org_id, **where.query(), after_id=after_id, limit=limit)

    def export_records(
        self,
        principal: Principal,
        *,
        after_id: int = 0,
        **filters: str | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every record of the caller's org matching the filters, oldest first, as it stood when
        the export began (records added meanwhile are left out). Arguments are validated now
        (InvalidRequestError), the records read lazily in batches of :data:`EXPORT_BATCH`, each
        on a fresh connection, so no transaction stays open while a slow client reads."""
        org_id = require_org(principal)
        if after_id < 0:
            raise InvalidRequestError("after_id must be >= 0")
        where = audit_filter(**filters)
        return self._export(org_id, where, after_id)

    async def _export(
        self, org_id: str, where: AuditFilter, after_id: int
    ) -> AsyncIterator[dict[str, Any]]:
        async with self.ctx.engine.connect() as conn:
            upto = await last_audit_id(conn, org_id)
        while True:
            async with self.ctx.engine.connect() as conn:
                batch = await read_audit(
                    conn,
                    org_id,
                    **where.query(),
                    after_id=after_id,
                    upto_id=upto,
                    limit=EXPORT_BATCH,
                )
            for row in batch:
                yield row
            if len(batch) < EXPORT_BATCH:
                return
            after_id = batch[-1]["id"]
