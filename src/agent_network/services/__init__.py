"""Business rules. Every call carries the acting principal; isolation lives in ``scope``."""

from __future__ import annotations

from dataclasses import dataclass

from agent_network.services.agents import AgentService
from agent_network.services.audit import AuditService
from agent_network.services.base import ServiceContext
from agent_network.services.credentials import CredentialService
from agent_network.services.delivery import DeliveryService
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.orgs import OrgService, create_admin_key, has_admin_key
from agent_network.services.policy import PolicyService
from agent_network.services.principal import Principal
from agent_network.services.rules import RuleService
from agent_network.services.scope import path_in_scope
from agent_network.services.secrets import SecretService
from agent_network.services.teams import TeamService
from agent_network.services.threads import ThreadService


@dataclass
class Services:
    """All services of one process, sharing one :class:`ServiceContext`."""

    ctx: ServiceContext
    orgs: OrgService
    agents: AgentService
    teams: TeamService
    threads: ThreadService
    knowledge: KnowledgeService
    audit: AuditService
    credentials: CredentialService
    secrets: SecretService
    rules: RuleService
    policy: PolicyService
    delivery: DeliveryService

    async def check_path_scope(self, principal: Principal, path: str) -> None:
        """NotFoundError if the URL ``path`` names an id outside ``principal``'s scope
        (:func:`~agent_network.services.scope.path_in_scope`); checked before a 403."""
        async with self.ctx.engine.connect() as conn:
            await path_in_scope(conn, principal, path)

    @classmethod
    def create(cls, ctx: ServiceContext) -> Services:
        """Build every service over ``ctx`` (one RuleService: its rate windows are shared)."""
        rules = RuleService(ctx)
        orgs = OrgService(ctx)
        threads = ThreadService(ctx, rules=rules)
        return cls(
            ctx,
            orgs,
            AgentService(ctx),
            TeamService(ctx),
            threads,
            KnowledgeService(ctx),
            AuditService(ctx),
            CredentialService(ctx),
            SecretService(ctx),
            rules,
            policy=PolicyService(ctx),
            delivery=DeliveryService(ctx),
        )


__all__ = ["Principal", "ServiceContext", "Services", "create_admin_key", "has_admin_key"]
