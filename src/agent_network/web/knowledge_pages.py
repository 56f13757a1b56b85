"""Knowledge under ``/app/knowledge``: the org-wide documents or one agent's, a search box,
deleting a document, and uploading files or a whole folder with progress (the page's script
sends one file per request and moves a progress bar; without JavaScript a pasted document is
sent as a form). The same services calls as ``/knowledge`` and ``/agents/{id}/knowledge``.
Design: docs/webapp.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from agent_network.api.deps import check_credential_may
from agent_network.errors import AgentNetworkError, InvalidRequestError
from agent_network.web.agent_pages import _org_viewer
from agent_network.web.pages import PageRoute, Viewer, _checked_form, _section
from agent_network.web.rendering import SECURITY_HEADERS, page, redirect

router = APIRouter(route_class=PageRoute, include_in_schema=False)

UPLOAD_HEADER = "x-upload"  # set by the page's script: answer JSON, not a page


def _api(agent_id: str | None) -> str:
    return f"/api/v1/agents/{agent_id}/knowledge" if agent_id else "/api/v1/knowledge"


async def _knowledge(
    request: Request,
    viewer: Viewer,
    agent_id: str | None,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    draft: dict[str, str] | None = None,
) -> Response:
    p, s = viewer.principal, viewer.services
    agent = await s.agents.get_agent(p, agent_id) if agent_id else None  # not found: 404
    agents, _ = await _section(viewer, "/api/v1/agents", lambda: s.agents.list_agents(p))
    docs, docs_error = await _section(
        viewer, _api(agent_id), lambda: s.knowledge.list_documents(p, agent_id=agent_id)
    )
    query = (request.query_params.get("q") or "").strip()[:500]
    hits: list[dict[str, Any]] = []
    errors = dict(errors or {})
    if query:
        try:
            check_credential_may(p, "GET", "/api/v1/knowledge/search")
            hits = await s.knowledge.search(p, query, agent_id=agent_id, limit=10)
        except AgentNetworkError as exc:
            errors["q"] = exc.message
            status = exc.status
    return page(
        request,
        "knowledge.html",
        session=viewer.session,
        status=status,
        agent=agent,
        agents=agents,
        docs=docs,
        docs_error=docs_error,
        query=query,
        hits=hits,
        errors=errors,
        draft=draft or {},
    )


@router.get("/app/knowledge")
async def knowledge_page(request: Request) -> Response:
    """The org-wide documents (or agent ``agent``'s), a search (``q``), upload and delete."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _knowledge(request, viewer, request.query_params.get("agent") or None)


@router.post("/app/knowledge")
async def upload(request: Request) -> Response:
    """Add one document (fields ``name``, ``content``, optional ``agent_id``). For the page's
    script (header ``X-Upload: 1``) the answer is JSON: 201 ``{"documents"}`` or the error
    ``{"error": {"code", "message"}}`` with its status; otherwise a page."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    agent_id = form.get("agent_id") or None
    name, content = form.get("name", "").strip(), form.get("content", "")
    p, s = viewer.principal, viewer.services
    scripted = request.headers.get(UPLOAD_HEADER) == "1"
    try:
        check_credential_may(p, "POST", _api(agent_id))
        if not content.strip():
            raise InvalidRequestError(f"{name or 'the document'} is empty")
        added = await s.knowledge.add(p, [{"name": name, "content": content}], agent_id=agent_id)
    except AgentNetworkError as exc:
        if scripted:
            body = {"error": {"code": exc.code, "message": exc.message}}
            return JSONResponse(body, status_code=exc.status, headers=SECURITY_HEADERS)
        return await _knowledge(
            request,
            viewer,
            agent_id,
            status=exc.status,
            errors={"upload": exc.message},
            draft={"name": name, "content": content},
        )
    if scripted:
        return JSONResponse({"documents": added}, status_code=201, headers=SECURITY_HEADERS)
    return redirect(request, "/app/knowledge" + (f"?agent={agent_id}" if agent_id else ""))


@router.post("/app/knowledge/{document_id}/delete")
async def delete(request: Request, document_id: str) -> Response:
    """Delete one of the org's documents (``agent_id``: the list to go back to)."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    agent_id = form.get("agent_id") or None
    try:
        check_credential_may(viewer.principal, "DELETE", f"/api/v1/knowledge/{document_id}")
        await viewer.services.knowledge.delete(viewer.principal, document_id)
    except AgentNetworkError as exc:
        return await _knowledge(
            request,
            viewer,
            agent_id,
            status=exc.status,
            errors={f"delete:{document_id}": exc.message},
        )
    return redirect(request, "/app/knowledge" + (f"?agent={agent_id}" if agent_id else ""))
