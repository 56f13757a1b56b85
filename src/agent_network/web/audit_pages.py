"""The audit log under ``/app/audit``: the org's records with the API's filters (action, who,
resource, outcome, time range), paged, and an export of the matching records as JSON Lines —
the same services calls as ``GET /audit`` and ``GET /audit/export``. Design: docs/webapp.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from agent_network.api.deps import check_credential_may
from agent_network.errors import AgentNetworkError
from agent_network.web.agent_pages import _org_viewer
from agent_network.web.pages import PageRoute
from agent_network.web.rendering import SECURITY_HEADERS, page

router = APIRouter(route_class=PageRoute, include_in_schema=False)

FILTERS = ("action", "principal_id", "resource_id", "outcome", "since", "until")
PAGE_SIZE = 100


def _filters(request: Request) -> dict[str, str | None]:
    """The filter fields of the query string (empty ones as None, each at most 100 chars)."""
    q = request.query_params
    return {k: (q.get(k) or "").strip()[:100] or None for k in FILTERS}


def _field_of(message: str) -> str:
    for name in ("action", "since", "until", "outcome"):
        if name in message:
            return name
    return "form"


@router.get("/app/audit")
async def audit_page(request: Request) -> Response:
    """The org's audit records, oldest first, ``PAGE_SIZE`` a page (``after_id`` for the next),
    filtered as ``GET /audit``; a bad filter is shown next to its field."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    filters = _filters(request)
    try:
        after_id = max(0, int(request.query_params.get("after_id") or 0))
    except ValueError:
        after_id = 0
    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    status = 200
    try:
        check_credential_may(viewer.principal, "GET", "/api/v1/audit")
        records = await viewer.services.audit.list_records(
            viewer.principal, after_id=after_id, limit=PAGE_SIZE, **filters
        )
    except AgentNetworkError as exc:
        errors[_field_of(exc.message)] = exc.message
        status = exc.status
    query = {k: v for k, v in filters.items() if v}
    next_url = None
    if len(records) == PAGE_SIZE:
        next_url = "/app/audit?" + urlencode({**query, "after_id": records[-1]["id"]})
    return page(
        request,
        "audit.html",
        session=viewer.session,
        status=status,
        records=records,
        filters=filters,
        errors=errors,
        next_url=next_url,
        export_url="/app/audit/export" + ("?" + urlencode(query) if query else ""),
        dumps=lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True),
    )


@router.get("/app/audit/export")
async def audit_export(request: Request) -> Response:
    """Every matching record as a JSON Lines download (``audit.jsonl``), as
    ``GET /audit/export``; a bad filter shows the audit page with the error."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    try:
        check_credential_may(viewer.principal, "GET", "/api/v1/audit/export")
        f = _filters(request)
        records = viewer.services.audit.export_records(
            viewer.principal,
            action=f["action"],
            principal_id=f["principal_id"],
            resource_id=f["resource_id"],
            outcome=f["outcome"],
            since=f["since"],
            until=f["until"],
        )
    except AgentNetworkError:
        return await audit_page(request)

    async def lines() -> AsyncIterator[str]:
        async for row in records:
            yield json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={**SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="audit.jsonl"'},
    )
