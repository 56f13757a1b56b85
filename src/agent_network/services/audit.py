"""Reading an org's own audit log."""

from __future__ import annotations

from typing import Any

from agent_network.errors import InvalidRequestError
from agent_network.services.base import ServiceContext
from agent_network.services.principal import Principal
from agent_network.services.scope import require_org
from agent_network.store.audit import read_audit


class AuditService:
    """An org reads only its own audit records."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def list_records(
        self,
        principal: Principal,
        *,
        action: str | None = None,
        resource_id: str | None = None,
        outcome: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The caller org's audit records, oldest first, filtered; ``limit`` 1-1000."""
        org_id = require_org(principal)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000")
        async with self.ctx.engine.connect() as conn:
            return await read_audit(
                conn,
                org_id,
                action=action,
                resource_id=resource_id,
                outcome=outcome,
                after_id=after_id,
                limit=limit,
            )
