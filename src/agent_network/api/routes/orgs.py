"""Orgs, users and the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from agent_network.api.deps import Call, get_call
from agent_network.api.schemas import Cursor, Limit, OrgCreate, UserCreate, UserUpdate

router = APIRouter(tags=["orgs"])


@router.post("/orgs", status_code=201)
async def create_org(body: OrgCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create an org (admin key). The org's secret ``key`` is in the answer once, never again."""
    return await call.services.orgs.create_org(call.principal, body.name)


@router.get("/orgs/me")
async def my_org(call: Call = Depends(get_call)) -> dict[str, Any]:
    """The org the key belongs to."""
    return await call.services.orgs.get_org(call.principal)


@router.post("/users", status_code=201)
async def create_user(body: UserCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create a person in the caller's org."""
    return await call.services.orgs.create_user(call.principal, body.name, body.email)


@router.get("/users")
async def list_users(call: Call = Depends(get_call)) -> list[dict[str, Any]]:
    """The caller org's users."""
    return await call.services.orgs.list_users(call.principal)


@router.get("/users/{user_id}")
async def get_user(user_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """One user of the caller's org."""
    return await call.services.orgs.get_user(call.principal, user_id)


@router.patch("/users/{user_id}")
async def update_user(
    user_id: str, body: UserUpdate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Change a user's name or email."""
    return await call.services.orgs.update_user(
        call.principal, user_id, body.model_dump(exclude_unset=True)
    )


@router.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: str, call: Call = Depends(get_call)) -> Response:
    """Delete a user (their past messages stay in the threads' history)."""
    await call.services.orgs.delete_user(call.principal, user_id)
    return Response(status_code=204)


@router.get("/audit")
async def audit(
    action: str | None = None,
    resource_id: str | None = None,
    outcome: str | None = None,
    after_id: Cursor = 0,
    limit: Limit = 100,
    call: Call = Depends(get_call),
) -> list[dict[str, Any]]:
    """The caller org's own audit records, oldest first (``after_id`` to page)."""
    return await call.services.audit.list_records(
        call.principal,
        action=action,
        resource_id=resource_id,
        outcome=outcome,
        after_id=after_id,
        limit=limit,
    )
