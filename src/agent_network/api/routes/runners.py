"""Runners: what a runner credential has to work on, and claims on triggers (leases).

Used by remote runners (``agent-network runner``) with an org key or an agent token; the
in-process runner uses the same store functions directly. See :mod:`agent_network.services.claims`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import Field

from agent_network.api.deps import Call, get_call
from agent_network.api.schemas import Body
from agent_network.services.claims import MAX_LEASE, MAX_RUNNER_ID, ClaimService

router = APIRouter(tags=["runners"])


class ClaimTarget(Body):
    agent_id: str = Field(min_length=1, max_length=40)
    thread_id: str = Field(min_length=1, max_length=40)
    trigger_seq: int = Field(
        ge=1,
        le=2**62,
        description=(
            "seq of the envelope to answer (a message, or in a protocol thread any envelope "
            "that makes the agent the expected speaker)"
        ),
    )
    runner_id: str = Field(min_length=1, max_length=MAX_RUNNER_ID)


class ClaimCreate(ClaimTarget):
    lease_seconds: float = Field(default=30.0, gt=0, le=MAX_LEASE, description="seconds")


def _claims(call: Call) -> ClaimService:
    return ClaimService(call.services.ctx, rules=call.services.rules)


@router.get("/runners/assignments")
async def assignments(call: Call = Depends(get_call)) -> list[dict[str, Any]]:
    """The agents this credential runs (active ``participate`` routine) and their threads."""
    return await _claims(call).assignments(call.principal)


@router.post("/claims", status_code=201)
async def claim(body: ClaimCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Claim a trigger for an agent with a lease: 201 if free, expired or already ours (renew);
    409 ``claim_held`` while another runner's lease is live; 409 ``claim_done`` when done."""
    return await _claims(call).claim(call.principal, **body.model_dump())


@router.post("/claims/complete")
async def complete(body: ClaimTarget, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Mark a trigger done (replied or deliberately skipped); 409 ``claim_held`` while another
    runner's lease is live."""
    return await _claims(call).complete(call.principal, **body.model_dump())


@router.get("/claims/done")
async def done(agent_id: str, thread_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """The trigger seqs of a thread that are done for an agent."""
    return await _claims(call).done(call.principal, agent_id=agent_id, thread_id=thread_id)
