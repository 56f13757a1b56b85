"""Orgs, users and the audit log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, BY_ID, PageQuery
from agent_network.api.responses import (
    AuditRecord,
    IssuedCredential,
    Org,
    OrgCreated,
    User,
)
from agent_network.api.schemas import (
    MAX_CURSOR,
    Body,
    Cursor,
    OrgCreate,
    UserCreate,
    UserUpdate,
)
from agent_network.errors import InvalidRequestError

router = APIRouter(tags=["orgs"], route_class=ApiRoute)


@router.post("/orgs", status_code=201, response_model=OrgCreated)
async def create_org(body: OrgCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create an org (admin key): ``{"org", "secret"}``; ``secret``, its first org key, is in
    this answer once, never again."""
    return await call.services.orgs.create_org(call.principal, body.name)


@router.get("/orgs", response_model=list[Org])
async def list_orgs(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Every org, oldest first (admin key only; 403 for any other credential; paged:
    ``limit``, ``cursor``)."""
    items = await call.services.orgs.list_orgs(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


class OrgKeyCreate(Body):
    name: str = Field(default="issued by the platform admin", min_length=1, max_length=200)


@router.post("/orgs/{org_id}/keys", status_code=201, response_model=IssuedCredential)
async def issue_org_key(
    org_id: str, body: OrgKeyCreate | None = None, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Issue a new org key for an org that lost its key (admin key only; 403 for any other
    credential, 404 for an unknown org). Answers ``{"credential", "secret"}``; the secret is
    shown this once. Audited in the org's log as ``credential.issue``."""
    name = body.name if body is not None else OrgKeyCreate().name
    return await call.services.orgs.issue_org_key(call.principal, org_id, name)


@router.get("/orgs/me", response_model=Org)
async def my_org(call: Call = Depends(get_call)) -> dict[str, Any]:
    """The org the key belongs to."""
    return await call.services.orgs.get_org(call.principal)


@router.post("/users", status_code=201, response_model=User)
async def create_user(body: UserCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create a person in the caller's org (``auto_ack``: acknowledge invitations to protocol
    threads automatically)."""
    return await call.services.orgs.create_user(
        call.principal, body.name, body.email, auto_ack=body.auto_ack
    )


@router.get("/users", response_model=list[User])
async def list_users(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """The caller org's users, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.orgs.list_users(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.get("/users/{user_id}", response_model=User)
async def get_user(user_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """One user of the caller's org."""
    return await call.services.orgs.get_user(call.principal, user_id)


@router.patch("/users/{user_id}", response_model=User)
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


AfterId = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_CURSOR,
        description="records after this record id (an alias of cursor, kept for old clients; "
        "not together with cursor)",
    ),
]


@router.get("/audit", response_model=list[AuditRecord])
async def audit(
    q: AuditQuery = Depends(),
    after_id: AfterId = None,
    page: PageQuery = Depends(),
    call: Call = Depends(get_call),
) -> list[dict[str, Any]]:
    """The caller org's own audit records, oldest first (paged: ``limit``, ``cursor``; or
    ``after_id``, a record id, the older way to page).

    Filters: ``since``/``until`` (ISO-8601 timestamps), ``action`` (exact or ``prefix*``),
    ``principal_id``, ``resource_id``, ``outcome``.
    """
    if after_id is not None and page.cursor is not None:
        raise InvalidRequestError(
            "give cursor or after_id, not both (cursor: the X-Next-Cursor of the previous page)",
            details={"field": "after_id"},
        )
    after = page.after(BY_ID)
    start = int(after[0]) if after is not None else (after_id or 0)
    items = await call.services.audit.list_records(
        call.principal, **q.filters(), after_id=start, limit=page.limit + 1
    )
    return page.page(items, BY_ID, drop=("after_id",))


@router.get(
    "/audit/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "JSON Lines: one audit record (the /audit item) per line",
            "content": {
                "application/x-ndjson": {
                    "schema": {"type": "string", "contentMediaType": "application/x-ndjson"}
                }
            },
        }
    },
)
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
