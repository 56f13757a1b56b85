"""Request dependencies: the services of this process and the authenticated principal."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent_network.errors import AuthenticationError, PermissionDeniedError
from agent_network.services import Services
from agent_network.services.principal import WRITE, Principal

_bearer = HTTPBearer(
    auto_error=False,
    description="an org key (an_org_…), user or agent token (an_usr_…, an_agt_…) or admin key",
)


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


# What a user or agent token may do besides reading: post into its threads as itself, and
# take part in a protocol thread's lifecycle as itself (ack, reject, close, workflow context).
TOKEN_WRITES = (
    ("POST", re.compile(r"^/api/v1/threads/[^/]+/(messages|ack|reject|close|context)$")),
    # an agent token runs its agent: claims, and routing its triage requests
    ("POST", re.compile(r"^/api/v1/(claims(/complete)?|runners/triage)$")),
)
# What it may not even read: its org's administration, secrets and knowledge.
TOKEN_HIDDEN = re.compile(
    r"^/api/v1/(audit|credentials|policy|knowledge)(/|$)"
    r"|^/api/v1/agents/[^/]+/(secrets|knowledge|rule)"
    r"|^/api/v1/networks/[^/]+/(invites|visas)"
)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_credential_may(principal: Principal, method: str, path: str) -> None:
    """The one place that says what a credential may do at all, by HTTP method and URL path.

    Read-only credentials (scope ``read`` only) may only read. User and agent tokens may read
    what their subject is a member of, post messages and ack/reject/close/set context in
    protocol threads as themselves, nothing else (no
    administration, no audit log, no credentials, no secrets, no knowledge). Raises
    PermissionDeniedError otherwise; finer checks (which ids are in scope) happen in services.
    """
    if method not in READ_METHODS and WRITE not in principal.scopes:
        raise PermissionDeniedError("this credential is read-only")
    if principal.is_member_scoped:
        if method in READ_METHODS:
            if TOKEN_HIDDEN.match(path):
                raise PermissionDeniedError(f"a {principal.kind} token cannot read this")
        elif not any(method == m and rx.match(path) for m, rx in TOKEN_WRITES):
            raise PermissionDeniedError(
                f"a {principal.kind} token can only post messages as its {principal.kind}; "
                "use an org key for this call"
            )


async def get_call(request: Request, principal: Principal = Depends(get_principal)) -> Call:
    """Services plus the authenticated principal, after :func:`check_credential_may`."""
    check_credential_may(principal, request.method, request.url.path)
    return Call(get_services(request), principal)
