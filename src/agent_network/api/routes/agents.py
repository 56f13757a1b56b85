"""Agents, their routines and their knowledge."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, PageQuery
from agent_network.api.responses import Agent, KnowledgeDocument, Routine, RuleOut
from agent_network.api.schemas import (
    AgentCreate,
    AgentUpdate,
    KnowledgeAdd,
    RoutineCreate,
    RoutineUpdate,
)
from agent_network.model.rule import Rule

router = APIRouter(tags=["agents"], route_class=ApiRoute)


@router.post("/agents", status_code=201, response_model=Agent)
async def create_agent(body: AgentCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Create an agent; ``lookup_key`` is unique in the org (409 otherwise); ``resume``: its
    claimed capabilities, domains and summary."""
    return await call.services.agents.create_agent(call.principal, **body.model_dump())


@router.get("/agents", response_model=list[Agent])
async def list_agents(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """The caller org's agents, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.agents.list_agents(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.get("/agents/{agent_id}", response_model=Agent)
async def get_agent(agent_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """One agent of the caller's org."""
    return await call.services.agents.get_agent(call.principal, agent_id)


@router.patch("/agents/{agent_id}", response_model=Agent)
async def update_agent(
    agent_id: str, body: AgentUpdate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Change an agent's name, lookup_key, identity, model, metadata or resume (``null``
    clears model and resume)."""
    return await call.services.agents.update_agent(
        call.principal, agent_id, body.model_dump(exclude_unset=True)
    )


@router.delete("/agents/{agent_id}", status_code=204)
async def delete_agent(agent_id: str, call: Call = Depends(get_call)) -> Response:
    """Delete an agent: it leaves every team and network and its routines stop."""
    await call.services.agents.delete_agent(call.principal, agent_id)
    return Response(status_code=204)


@router.post("/agents/{agent_id}/routines", status_code=201, response_model=Routine)
async def create_routine(
    agent_id: str, body: RoutineCreate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Attach a routine (``participate`` preset on ``thread.message_added``)."""
    return await call.services.agents.create_routine(call.principal, agent_id, **body.model_dump())


@router.get("/agents/{agent_id}/routines", response_model=list[Routine])
async def list_routines(
    agent_id: str, page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """An agent's routines, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.agents.list_routines(
        call.principal, agent_id, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.patch("/agents/{agent_id}/routines/{routine_id}", response_model=Routine)
async def update_routine(
    agent_id: str, routine_id: str, body: RoutineUpdate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Rename, reconfigure, pause or activate a routine."""
    return await call.services.agents.update_routine(
        call.principal, agent_id, routine_id, body.model_dump(exclude_unset=True)
    )


@router.post("/agents/{agent_id}/routines/{routine_id}/pause", response_model=Routine)
async def pause_routine(
    agent_id: str, routine_id: str, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Pause a routine (it stops reacting)."""
    return await call.services.agents.update_routine(
        call.principal, agent_id, routine_id, {"status": "paused"}
    )


@router.post("/agents/{agent_id}/routines/{routine_id}/activate", response_model=Routine)
async def activate_routine(
    agent_id: str, routine_id: str, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Activate a paused routine."""
    return await call.services.agents.update_routine(
        call.principal, agent_id, routine_id, {"status": "active"}
    )


@router.delete("/agents/{agent_id}/routines/{routine_id}", status_code=204)
async def delete_routine(
    agent_id: str, routine_id: str, call: Call = Depends(get_call)
) -> Response:
    """Remove a routine."""
    await call.services.agents.delete_routine(call.principal, agent_id, routine_id)
    return Response(status_code=204)


class RuleBody(Rule):
    """A rule as written: ``inbound_from`` / ``outbound_to`` entries may be ids, ``org:self``,
    ``*``, or names (``<name>``, ``org:<name>``) resolved to ids before storing. ``principals``
    (what GET shows) is read-only and ignored, so a rule read can be written back as it is."""

    principals: dict[str, Any] | None = None


@router.get("/agents/{agent_id}/rule", response_model=RuleOut)
async def get_rule(agent_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """The agent's rule (defaults when none was set): ids in ``inbound_from`` and
    ``outbound_to``, and ``principals`` ``{id: {kind, name, org_id, org_name}}`` naming them."""
    return await call.services.rules.get(call.principal, agent_id)


@router.put("/agents/{agent_id}/rule", response_model=RuleOut)
async def put_rule(agent_id: str, body: RuleBody, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Replace the agent's rule; enforced on every message the agent sends or receives. Names
    are resolved to ids among the principals the org sees; 422 ``unresolved_principal``
    naming the entry when one names nobody or several."""
    rule = Rule.model_validate(body.model_dump(exclude={"principals"}))
    return await call.services.rules.put(call.principal, agent_id, rule)


@router.post(
    "/agents/{agent_id}/knowledge", status_code=201, response_model=list[KnowledgeDocument]
)
async def add_agent_knowledge(
    agent_id: str, body: KnowledgeAdd, call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Attach text/markdown documents to one agent."""
    docs = [d.model_dump() for d in body.documents]
    return await call.services.knowledge.add(call.principal, docs, agent_id=agent_id)


@router.get("/agents/{agent_id}/knowledge", response_model=list[KnowledgeDocument])
async def list_agent_knowledge(
    agent_id: str, page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Documents attached to one agent, oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.knowledge.list_documents(
        call.principal, agent_id=agent_id, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)
