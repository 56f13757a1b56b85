"""Credentials (org keys, user and agent tokens) and agent secrets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, BY_NAME, PageQuery
from agent_network.api.responses import Credential, IssuedCredential, SecretName, SecretSet
from agent_network.api.schemas import CredentialCreate, CredentialRenew, SecretPut

router = APIRouter(tags=["credentials"], route_class=ApiRoute)


@router.post("/credentials", status_code=201, response_model=IssuedCredential)
async def issue(body: CredentialCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Issue an org key, user token or agent token; ``secret`` is in this answer only."""
    return await call.services.credentials.issue(call.principal, **body.model_dump())


@router.get("/credentials", response_model=list[Credential])
async def list_credentials(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """The org's credentials, without secrets, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.credentials.list_credentials(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.delete("/credentials/{credential_id}", response_model=Credential)
async def revoke(credential_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Revoke a credential at once."""
    return await call.services.credentials.revoke(call.principal, credential_id)


@router.post(
    "/credentials/{credential_id}/rotate", status_code=201, response_model=IssuedCredential
)
async def rotate(credential_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Replace a credential by a new secret and revoke the old one, atomically."""
    return await call.services.credentials.rotate(call.principal, credential_id)


@router.post("/credentials/{credential_id}/renew", response_model=Credential)
async def renew(
    credential_id: str, body: CredentialRenew, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Move a live credential's expiry to ``expires_in`` seconds from now."""
    return await call.services.credentials.renew(call.principal, credential_id, body.expires_in)


@router.put("/agents/{agent_id}/secrets/{name}", response_model=SecretSet)
async def put_secret(
    agent_id: str, name: str, body: SecretPut, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Set an agent secret (encrypted at rest; the value is never returned)."""
    return await call.services.secrets.put(call.principal, agent_id, name, body.value)


@router.get("/agents/{agent_id}/secrets", response_model=list[SecretName])
async def list_secrets(
    agent_id: str, page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Names of an agent's secrets, by name (paged: ``limit``, ``cursor``)."""
    items = await call.services.secrets.list_names(
        call.principal, agent_id, after=page.after(BY_NAME), limit=page.limit
    )
    return page.page(items, BY_NAME)


@router.delete("/agents/{agent_id}/secrets/{name}", status_code=204)
async def delete_secret(agent_id: str, name: str, call: Call = Depends(get_call)) -> Response:
    """Delete an agent secret."""
    await call.services.secrets.delete(call.principal, agent_id, name)
    return Response(status_code=204)
