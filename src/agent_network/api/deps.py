"""Request dependencies: the services of this process and the authenticated principal."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent_network.errors import AuthenticationError, PermissionDeniedError
from agent_network.services import Services
from agent_network.services.principal import WRITE, Principal
from agent_network.services.scope import looks_like_id

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
# take part in a protocol thread's lifecycle as itself (ack, reject, close, workflow context);
# and the team-scoped calls, which the services allow by the role its subject has in that team
# or network (services/roles.py: creating threads for every member, the rest for admins and
# owners; an agent token acts as a member).
TOKEN_WRITES = (
    ("POST", re.compile(r"^/api/v1/threads/[^/]+/(messages|ack|reject|close|context)$")),
    ("POST", re.compile(r"^/api/v1/threads/[^/]+/participants$")),
    ("PATCH", re.compile(r"^/api/v1/threads/[^/]+$")),
    ("POST", re.compile(r"^/api/v1/(teams|networks)/[^/]+/(members|threads)$")),
    ("PATCH", re.compile(r"^/api/v1/(teams|networks)/[^/]+(/members/[^/]+/[^/]+)?$")),
    ("DELETE", re.compile(r"^/api/v1/(teams|networks)/[^/]+/members/[^/]+/[^/]+$")),
    ("DELETE", re.compile(r"^/api/v1/teams/[^/]+$")),
    ("POST", re.compile(r"^/api/v1/networks/[^/]+/(invites|close)$")),
    ("DELETE", re.compile(r"^/api/v1/networks/[^/]+/(invites|visas)/[^/]+$")),
    # an agent token runs its agent: claims (taking, completing, releasing its runner's),
    # routing its triage requests, and its own secrets for its tools under a live claim
    # (services/secrets.py: refused for every other caller)
    ("POST", re.compile(r"^/api/v1/(claims(/complete|/release)?|runners/(triage|secrets))$")),
)
# What it may not even read: its org's administration, secrets and knowledge. (A network's
# invites and visas: by role, in services/teams.py.)
TOKEN_HIDDEN = re.compile(
    r"^/api/v1/(audit|credentials|policy|knowledge)(/|$)"
    r"|^/api/v1/agents/[^/]+/(secrets|knowledge|rule)"
)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_credential_may(principal: Principal, method: str, path: str) -> None:
    """The one place that says what a credential may do at all, by HTTP method and URL path.

    Read-only credentials (scope ``read`` only) may only read. User and agent tokens may read
    what their subject is a member of, post messages and ack/reject/close/set context in
    protocol threads as themselves, and make the team-scoped calls of ``TOKEN_WRITES``, which
    the services allow by role (docs/security.md#team-roles); nothing else (no org
    administration, no audit log, no credentials, no secrets, no knowledge). Raises
    PermissionDeniedError naming the call otherwise; finer checks (which ids are in scope,
    which role) happen in services, and :func:`get_call` answers 404 instead when the path
    names an id outside the caller's scope.
    """
    if method not in READ_METHODS and WRITE not in principal.scopes:
        raise PermissionDeniedError(
            f"this credential is read-only: it cannot {describe_call(method, path)}"
        )
    if principal.is_member_scoped:
        if method in READ_METHODS:
            if TOKEN_HIDDEN.match(path):
                raise PermissionDeniedError(
                    f"{principal.credential_name} cannot {describe_call(method, path)}; "
                    "use an org key"
                )
        elif not any(method == m and rx.match(path) for m, rx in TOKEN_WRITES):
            raise PermissionDeniedError(
                f"{principal.credential_name} cannot {describe_call(method, path)}: it posts "
                f"and acts in its teams and networks as its own {principal.kind} only; use an "
                "org key"
            )


_VERBS = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "PUT": "replace", "PATCH": "update"}


def describe_call(method: str, path: str) -> str:
    """A call in words, for error messages: ``PATCH /api/v1/agents/agt_1`` -> ``"update
    agents/{id}"``, ``POST /api/v1/networks/net_1/leave`` -> ``"call networks/{id}/leave"``;
    ids (``prefix_…`` segments) are shown as ``{id}``."""
    parts = [p for p in path.removeprefix("/api/v1").split("/") if p]
    shown = "/".join("{id}" if looks_like_id(p) else p for p in parts)
    if method == "DELETE":
        verb = "delete"
    elif method == "POST":
        last = parts[-1] if parts else ""
        collection = not looks_like_id(last) and (last.endswith("s") or last == "knowledge")
        verb = "create" if collection else "call"
    else:
        verb = _VERBS.get(method, method.lower())
    return f"{verb} {shown or '/'}"


async def get_call(request: Request, principal: Principal = Depends(get_principal)) -> Call:
    """Services plus the authenticated principal, after :func:`check_credential_may`. Scope
    first: a call the credential may not make answers 404 (NotFoundError) when its path names
    an id outside the caller's scope — the same as the call of a credential that may make it —
    and only then 403 naming the call."""
    services = get_services(request)
    try:
        check_credential_may(principal, request.method, request.url.path)
    except PermissionDeniedError:
        await services.check_path_scope(principal, request.url.path)
        raise
    return Call(services, principal)
