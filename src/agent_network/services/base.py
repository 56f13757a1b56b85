"""What every service shares: the engine, the hub, settings, and audit helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.services.principal import Principal
from agent_network.store.audit import audit_row, insert_audit

if TYPE_CHECKING:
    from agent_network.services.secrets import OrgSecrets


@dataclass
class ServiceContext:
    """Shared by the services of one process.

    ``access_epoch`` (the hub's, :attr:`Hub.access_epoch <agent_network.hub.Hub.access_epoch>`)
    counts the acts that removed someone's access (visa revoked, network left, member removed,
    team deleted, user or agent deleted, credential revoked or rotated); each such service
    method calls :meth:`access_removed` after its transaction committed and before it answers.
    Long-lived readers (WebSocket connections, long-polls) re-check their scope when it changed
    since their last check, and an append checked before the change is refused by the hub
    (``AccessChangedError``) and checked again.
    ``config_epoch`` counts the changes that alter what a post is checked against without
    removing access (an agent's rule, an org's egress policy, an agent or user row, members
    added, a thread widened); both tag the positive decisions cached by services/cache.py.
    """

    engine: AsyncEngine
    hub: Hub
    settings: Settings
    config_epoch: int = 0
    # the server key and each org's secret fingerprints (services/secrets.py::org_secrets)
    org_secrets: OrgSecrets | None = field(default=None, repr=False, compare=False)

    @property
    def access_epoch(self) -> int:
        """The hub's access epoch (see the class docstring)."""
        return self.hub.access_epoch

    async def access_removed(self) -> None:
        """Record that an act removed access (its transaction committed): bumps the access
        epoch and waits until no append checked before it can still commit
        (:meth:`Hub.revoke_access <agent_network.hub.Hub.revoke_access>`)."""
        await self.hub.revoke_access()


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
