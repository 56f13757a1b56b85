"""Request dependencies: the services of this process and the authenticated principal."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent_network.errors import AuthenticationError
from agent_network.services import Services
from agent_network.services.principal import Principal

_bearer = HTTPBearer(auto_error=False, description="an org key (an_org_…) or the admin key")


def get_services(request: Request) -> Services:
    """The :class:`Services` created by the app's lifespan."""
    services: Services = request.app.state.services
    return services


async def get_principal(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """Authenticate ``Authorization: Bearer <key>``; AuthenticationError (401) otherwise."""
    if creds is None or not creds.credentials:
        raise AuthenticationError("send 'Authorization: Bearer <key>' with an org or admin key")
    return await get_services(request).orgs.authenticate(creds.credentials)


@dataclass
class Call:
    """Both dependencies at once: ``call.services`` and ``call.principal``."""

    services: Services
    principal: Principal


async def get_call(request: Request, principal: Principal = Depends(get_principal)) -> Call:
    """Services plus the authenticated principal."""
    return Call(get_services(request), principal)
