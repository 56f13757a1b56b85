"""Org-wide knowledge and search over the caller's own knowledge."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, PageQuery
from agent_network.api.responses import KnowledgeDocument, KnowledgeHit
from agent_network.api.schemas import KnowledgeAdd

router = APIRouter(tags=["knowledge"], route_class=ApiRoute)


@router.post("/knowledge", status_code=201, response_model=list[KnowledgeDocument])
async def add_knowledge(body: KnowledgeAdd, call: Call = Depends(get_call)) -> list[dict[str, Any]]:
    """Attach org-wide text/markdown documents (all or nothing)."""
    docs = [d.model_dump() for d in body.documents]
    return await call.services.knowledge.add(call.principal, docs)


@router.get("/knowledge", response_model=list[KnowledgeDocument])
async def list_knowledge(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """The org's org-wide documents, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.knowledge.list_documents(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.get("/knowledge/search", response_model=list[KnowledgeHit])
async def search_knowledge(
    q: Annotated[str, Query(max_length=1000)],
    agent_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 5,
    call: Call = Depends(get_call),
) -> list[dict[str, Any]]:
    """Best chunks of the caller's own knowledge for free text ``q``."""
    return await call.services.knowledge.search(call.principal, q, agent_id=agent_id, limit=limit)


@router.delete("/knowledge/{document_id}", status_code=204)
async def delete_knowledge(document_id: str, call: Call = Depends(get_call)) -> Response:
    """Delete a document of the caller's org."""
    await call.services.knowledge.delete(call.principal, document_id)
    return Response(status_code=204)
