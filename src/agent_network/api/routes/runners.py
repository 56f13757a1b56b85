"""Runners: what a runner credential has to work on, and claims on triggers (leases).

Used by remote runners (``agent-network runner``) with an org key or an agent token; the
in-process runner uses the same store functions directly. See :mod:`agent_network.services.claims`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import Field

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.responses import (
    Assignment,
    Claim,
    ClaimDone,
    DoneSeqs,
    Released,
    SecretValue,
    TriageRouted,
)
from agent_network.api.schemas import Body
from agent_network.services.claims import MAX_LEASE, MAX_RUNNER_ID, ClaimService
from agent_network.services.jobs import Job, job_for_claim
from agent_network.services.routing import route_request

router = APIRouter(tags=["runners"], route_class=ApiRoute)


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
    lease_seconds: float = Field(default=10.0, gt=0, le=MAX_LEASE, description="seconds")
    job: bool = Field(
        default=False,
        description=(
            "return what answering the trigger needs with the granted claim (``job``: the "
            "agent, the visible history, protocol notes, tools, knowledge, the reply's "
            "audience; null when the agent is not to answer now)"
        ),
    )


def _claims(call: Call) -> ClaimService:
    return ClaimService(call.services.ctx, rules=call.services.rules)


@router.get("/runners/assignments", response_model=list[Assignment])
async def assignments(call: Call = Depends(get_call)) -> list[dict[str, Any]]:
    """The agents this credential runs (an active ``participate`` or ``triage`` routine), the
    threads to follow for each routine, and the agents' triage configs."""
    return await _claims(call).assignments(call.principal)


@router.post("/claims", status_code=201, response_model=Claim)
async def claim(body: ClaimCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Claim a trigger for an agent with a lease: 201 if free, expired or already ours (renew);
    409 ``claim_held`` while another runner's lease is live; 409 ``claim_done`` when done.
    With ``job``, the granted claim carries the job the server built for it."""
    fields = body.model_dump(exclude={"job"})
    granted = await _claims(call).claim(call.principal, **fields)
    if body.job:
        granted["job"] = await job_for_claim(
            call.services.ctx,
            call.services.rules,
            call.principal,
            agent_id=body.agent_id,
            thread_id=body.thread_id,
            trigger_seq=body.trigger_seq,
        )
    return granted


class ClaimComplete(ClaimTarget):
    dropped: Literal["inbox_cap", "failed", "empty_reply"] | None = Field(
        default=None,
        description=(
            "why the runner leaves the trigger unanswered, audited like the in-process "
            "runner: inbox_cap (the agent's inbox_cap triggers already wait in it: "
            "rule.refused), failed (the job failed: routine.failed), empty_reply (the model's "
            "reply was empty after cleaning: routine.skipped)"
        ),
    )
    detail: str | None = Field(
        default=None, max_length=500, description="what went wrong, for the audit log"
    )


@router.post("/claims/complete", response_model=ClaimDone)
async def complete(body: ClaimComplete, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Mark a trigger done (replied or deliberately skipped; ``dropped``: why it was dropped
    unanswered); 409 ``claim_held`` while another runner's lease is live."""
    return await _claims(call).complete(call.principal, **body.model_dump())


class ClaimRelease(Body):
    runner_id: str = Field(min_length=1, max_length=MAX_RUNNER_ID)


@router.post("/claims/release", response_model=Released)
async def release(body: ClaimRelease, call: Call = Depends(get_call)) -> dict[str, Any]:
    """End the live leases ``runner_id`` holds on the caller's agents (a runner stopping
    cleanly), so other runners take the triggers over at once: ``{"runner_id", "released"}``.
    403 for a user token."""
    return await _claims(call).release(call.principal, runner_id=body.runner_id)


@router.get("/claims/done", response_model=DoneSeqs)
async def done(agent_id: str, thread_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """The trigger seqs of a thread that are done for an agent."""
    return await _claims(call).done(call.principal, agent_id=agent_id, thread_id=thread_id)


class SecretRequest(ClaimTarget):
    name: str = Field(min_length=1, max_length=100, description="the secret's name")


@router.post("/runners/secrets", response_model=SecretValue)
async def secret(
    body: SecretRequest, response: Response, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """One secret of the runner's agent, for the tools it runs (``{"agent_id", "name",
    "value"}``). Only the agent's own token is answered, and only while ``runner_id`` holds a
    live claim on the trigger (409 ``claim_required`` otherwise); an org key or user token
    gets 403, another agent's token 404. Audited as ``secret.revealed`` (the name, never the
    value); the answer is marked ``Cache-Control: no-store``."""
    response.headers["Cache-Control"] = "no-store"
    return await call.services.secrets.reveal_for_runner(call.principal, **body.model_dump())


class TriageAnswer(ClaimTarget):
    answer: str | None = Field(
        default=None,
        max_length=2000,
        description=(
            "the agent's model's answer to the classification prompt (null: the model failed "
            "or is not used; the keywords decide)"
        ),
    )


@router.post("/runners/triage", response_model=TriageRouted)
async def triage(body: TriageAnswer, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Route an intake request of a triage routine with the classification a remote runner's
    model gave: the server decides the label, forwards the request and replies in intake with
    every check of the in-process runner. The runner must hold a live claim on the request
    (409 ``claim_required`` otherwise); it completes the claim afterwards."""
    routine_id, trigger = await _claims(call).triage_request(
        call.principal,
        agent_id=body.agent_id,
        thread_id=body.thread_id,
        trigger_seq=body.trigger_seq,
        runner_id=body.runner_id,
    )
    outcome = await route_request(
        call.services.ctx,
        call.services.rules,
        Job(body.agent_id, routine_id, trigger, "triage"),
        answer=body.answer,
    )
    return {
        "agent_id": body.agent_id,
        "thread_id": body.thread_id,
        "trigger_seq": body.trigger_seq,
        "routed": outcome is not None,
        "label": outcome.label if outcome else None,
        "forward_id": outcome.forward.id if outcome and outcome.forward else None,
        "forward_thread_id": outcome.forward.thread_id if outcome and outcome.forward else None,
        "reply_id": outcome.reply.id if outcome and outcome.reply else None,
    }
