"""What every service shares: the engine, the hub, settings, and audit helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.services.principal import Principal
from agent_network.store.audit import audit_row, insert_audit


@dataclass
class ServiceContext:
    """Shared by the services of one process.

    ``access_epoch`` counts the acts that removed someone's access (visa revoked, network left,
    member removed, team deleted, user or agent deleted, credential revoked or rotated); each
    such service method adds 1 after its transaction committed. Long-lived readers (WebSocket
    connections) re-check their scope only when it changed since their last check.
    ``config_epoch`` counts the changes that alter what a post is checked against without
    removing access (an agent's rule, an org's egress policy, an agent or user row, members
    added, a thread widened); both tag the positive decisions cached by services/cache.py.
    """

    engine: AsyncEngine
    hub: Hub
    settings: Settings
    access_epoch: int = 0
    config_epoch: int = 0


async def record(
    conn: AsyncConnection,
    principal: Principal,
    action: str,
    resource_kind: str,
    resource_id: str | None,
    *,
    org_id: str | None = None,
    outcome: str = "accepted",
    reason: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append an audit record for an administrative act, in the caller's transaction.

    With ``org_id`` of another org (a cross-org act such as a join, recorded in both logs) the
    record names the acting org, not its credential: credential ids stay private to their org.
    """
    foreign = org_id is not None and org_id != principal.audit_org
    await insert_audit(
        conn,
        [
            audit_row(
                org_id=org_id or principal.audit_org,
                principal_kind="org" if foreign and principal.kind != "admin" else principal.kind,
                principal_id=principal.audit_org if foreign else principal.key_id,
                action=action,
                resource_kind=resource_kind,
                resource_id=resource_id or "",
                outcome=outcome,
                reason=reason,
                data=data,
            )
        ],
    )
