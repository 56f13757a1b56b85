"""Threads: read, post, page through history, verify the hash chain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, PageQuery
from agent_network.api.responses import (
    Envelope,
    EnvelopePage,
    Thread,
    Verification,
    WorkflowTool,
)
from agent_network.api.schemas import (
    AckBody,
    CloseBody,
    ContextSet,
    Cursor,
    Limit,
    MessageCreate,
    ParticipantsAdd,
    RejectBody,
    ThreadUpdate,
    Wait,
)

router = APIRouter(prefix="/threads", tags=["threads"], route_class=ApiRoute)


@router.get("", response_model=list[Thread])
async def list_threads(
    page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Every thread the caller can see (its teams' and its networks'), oldest first (paged:
    ``limit``, ``cursor``)."""
    items = await call.services.threads.list_threads(
        call.principal, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@router.get("/{thread_id}", response_model=Thread)
async def get_thread(thread_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """A thread with its state: status, last_seq, agent budget, and the protocol state
    (adapter, participants, initiator, pending_acks, expected_speaker, close_reason; workflow
    turns and context)."""
    return await call.services.threads.get(call.principal, thread_id)


@router.patch("/{thread_id}", response_model=Thread)
async def update_thread(
    thread_id: str, body: ThreadUpdate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Set the budget of consecutive agent messages and/or widen visibility to ``members``."""
    if body.visibility is not None:
        await call.services.threads.widen(call.principal, thread_id, visibility=body.visibility)
    if body.agent_budget is not None:
        await call.services.threads.set_budget(call.principal, thread_id, body.agent_budget)
    return await call.services.threads.get(call.principal, thread_id)


@router.post("/{thread_id}/participants", response_model=Thread)
async def add_participants(
    thread_id: str, body: ParticipantsAdd, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Add participants to a restricted thread (members of its team or network)."""
    pairs: list[tuple[str, str]] = [(p.kind, p.id) for p in body.participants]
    return await call.services.threads.widen(call.principal, thread_id, participants=pairs)


@router.post("/{thread_id}/messages", status_code=201, response_model=Envelope)
async def post_message(
    thread_id: str, body: MessageCreate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Post as one of the caller's own agents or users (``agent_id`` or ``user_id``);
    ``audience`` limits who receives it, ``tool_calls`` carry workflow tool results."""
    return await call.services.threads.post(
        call.principal,
        thread_id,
        body.content,
        agent_id=body.agent_id,
        user_id=body.user_id,
        idempotency_key=body.idempotency_key,
        causation_id=body.causation_id,
        audience=body.audience,
        tool_calls=[c.model_dump() for c in body.tool_calls] if body.tool_calls else None,
    )


@router.post("/{thread_id}/ack", response_model=Thread)
async def ack(thread_id: str, body: AckBody, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Accept an invitation to a protocol thread as one of the caller's own agents or users
    (a token: itself). 409 ``protocol_violation`` without a pending invitation."""
    return await call.services.threads.ack(
        call.principal, thread_id, agent_id=body.agent_id, user_id=body.user_id
    )


@router.post("/{thread_id}/reject", response_model=Thread)
async def reject(
    thread_id: str, body: RejectBody, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Decline an invitation: the thread closes with ``invite_rejected``."""
    return await call.services.threads.reject(
        call.principal,
        thread_id,
        agent_id=body.agent_id,
        user_id=body.user_id,
        reason=body.reason,
    )


@router.post("/{thread_id}/close", response_model=Thread)
async def close(thread_id: str, body: CloseBody, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Close a thread (a participant, or an org key of an org with a participant; an open
    thread: the org that created it or hosts its team/network). 409 ``thread_closed`` when it
    is already closing or closed."""
    return await call.services.threads.close(call.principal, thread_id, reason=body.reason)


@router.post("/{thread_id}/context", response_model=Thread)
async def set_context(
    thread_id: str, body: ContextSet, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Set workflow context keys (``context.set``; the turn does not advance)."""
    return await call.services.threads.set_context(
        call.principal, thread_id, body.values, agent_id=body.agent_id, user_id=body.user_id
    )


@router.get("/{thread_id}/tools", response_model=list[WorkflowTool])
async def tools(
    thread_id: str,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    call: Call = Depends(get_call),
) -> list[dict[str, Any]]:
    """The workflow tools the caller's agent gets in this thread now (``[]`` outside
    workflows); an agent token may leave ``agent_id`` out."""
    return await call.services.threads.tools(call.principal, thread_id, agent_id=agent_id)


@router.get("/{thread_id}/messages", response_model=EnvelopePage)
async def list_messages(
    thread_id: str,
    after: Cursor = 0,
    limit: Limit = 100,
    wait: Wait = 0.0,
    call: Call = Depends(get_call),
) -> dict[str, Any]:
    """Messages with ``seq > after``; ``wait`` (seconds) long-polls for the next one."""
    return await call.services.threads.envelopes(
        call.principal, thread_id, after=after, limit=limit, wait=wait
    )


@router.get("/{thread_id}/envelopes", response_model=EnvelopePage)
async def list_envelopes(
    thread_id: str,
    after: Cursor = 0,
    limit: Limit = 100,
    wait: Wait = 0.0,
    call: Call = Depends(get_call),
) -> dict[str, Any]:
    """Every envelope (messages and thread events) with ``seq > after``; ``wait`` (seconds)
    long-polls for the next one."""
    return await call.services.threads.envelopes(
        call.principal, thread_id, after=after, limit=limit, wait=wait, messages_only=False
    )


@router.get("/{thread_id}/verify", response_model=Verification)
async def verify(thread_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Recompute the hash chain; ``ok`` false names the first broken ``seq``."""
    report = await call.services.threads.verify(call.principal, thread_id)
    return {
        "thread_id": report.thread_id,
        "ok": report.ok,
        "checked": report.checked,
        "first_bad_seq": report.first_bad_seq,
        "reason": report.reason,
    }
