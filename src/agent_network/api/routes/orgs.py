"""Orgs, users and the audit log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from agent_network.api.deps import Call, get_call
from agent_network.api.schemas import (
    Body,
    Cursor,
    Limit,
    OrgCreate,
    UserCreate,
    UserUpdate,
)

router = APIRouter(tags=["orgs"])


@router.post("/orgs", status_code=201)
async def create_org(body: OrgCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create an org (admin key). The org's secret ``key`` is in the answer once, never again."""
    return await call.services.orgs.create_org(call.principal, body.name)


@router.get("/orgs")
async def list_orgs(call: Call = Depends(get_call)) -> list[dict[str, Any]]:
    """Every org, oldest first (admin key only; 403 for any other credential)."""
    return await call.services.orgs.list_orgs(call.principal)


class OrgKeyCreate(Body):
    name: str = Field(default="issued by the platform admin", min_length=1, max_length=200)


@router.post("/orgs/{org_id}/keys", status_code=201)
async def issue_org_key(
    org_id: str, body: OrgKeyCreate | None = None, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Issue a new org key for an org that lost its key (admin key only; 403 for any other
    credential, 404 for an unknown org). Answers ``{"credential", "secret"}``; the secret is
    shown this once. Audited in the org's log as ``credential.issue``."""
    name = body.name if body is not None else OrgKeyCreate().name
    return await call.services.orgs.issue_org_key(call.principal, org_id, name)


@router.get("/orgs/me")
async def my_org(call: Call = Depends(get_call)) -> dict[str, Any]:
    """The org the key belongs to."""
    return await call.services.orgs.get_org(call.principal)


@router.post("/users", status_code=201)
async def create_user(body: UserCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create a person in the caller's org (``auto_ack``: acknowledge invitations to protocol
    threads automatically)."""
    return await call.services.orgs.create_user(
        call.principal, body.name, body.email, auto_ack=body.auto_ack
    )


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
    """Change a user's name, email or ``auto_ack`` setting."""
    return await call.services.orgs.update_user(
        call.principal, user_id, body.model_dump(exclude_unset=True)
    )


@router.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: str, call: Call = Depends(get_call)) -> Response:
    """Delete a user (their past messages stay in the threads' history)."""
    await call.services.orgs.delete_user(call.principal, user_id)
    return Response(status_code=204)


@dataclass
class AuditQuery:
    """The filters shared by ``/audit`` and ``/audit/export`` (validated by the service)."""

    since: str | None = Query(None, max_length=64, description="ISO-8601, inclusive")
    until: str | None = Query(None, max_length=64, description="ISO-8601, exclusive")
    action: str | None = Query(
        None, max_length=100, description="exact, or a prefix ending in '*' (network.*)"
    )
    principal_id: str | None = Query(None, max_length=100)
    resource_id: str | None = Query(None, max_length=100)
    outcome: str | None = Query(None, max_length=20, description="accepted or refused")

    def filters(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "action": self.action,
            "principal_id": self.principal_id,
            "resource_id": self.resource_id,
            "outcome": self.outcome,
        }


@router.get("/audit")
async def audit(
    q: AuditQuery = Depends(),
    after_id: Cursor = 0,
    limit: Limit = 100,
    call: Call = Depends(get_call),
) -> list[dict[str, Any]]:
    """The caller org's own audit records, oldest first (``after_id`` to page).

    Filters: ``since``/``until`` (ISO-8601 timestamps), ``action`` (exact or ``prefix*``),
    ``principal_id``, ``resource_id``, ``outcome``.
    """
    return await call.services.audit.list_records(
        call.principal, **q.filters(), after_id=after_id, limit=limit
    )


@router.get("/audit/export", response_class=StreamingResponse)
async def export_audit(
    q: AuditQuery = Depends(),
    after_id: Cursor = 0,
    call: Call = Depends(get_call),
) -> StreamingResponse:
    """Every matching audit record of the caller's org as JSON Lines (``application/x-ndjson``,
    one record per line, oldest first), streamed; same filters as ``/audit``."""
    records = call.services.audit.export_records(call.principal, **q.filters(), after_id=after_id)

    async def lines() -> AsyncIterator[str]:
        async for row in records:
            yield json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
    )
