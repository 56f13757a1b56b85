"""The org's egress policy (what its agents and people may post into networks)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from agent_network.api.deps import Call, get_call
from agent_network.api.schemas import EgressPolicyBody

router = APIRouter(prefix="/policy", tags=["policy"])


@router.get("/egress")
async def get_egress(call: Call = Depends(get_call)) -> dict[str, Any]:
    """The org's egress rules (``{"rules": [], "updated_at": null}`` until it sets some)."""
    return await call.services.policy.get_egress(call.principal)


@router.put("/egress")
async def put_egress(body: EgressPolicyBody, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Replace the org's egress rules (org key only).

    Each rule: ``name`` (unique), ``kind`` (``email``, ``card_number``, ``secret`` or ``regex``
    with a ``pattern``), ``action`` (``refuse`` or ``redact``). Applied to every message the
    org's agents and users post into network threads. 422 for an invalid rule, including a
    regex that is too long (over 500 characters) or backtracks catastrophically.
    """
    rules = [r.model_dump() for r in body.rules]
    return await call.services.policy.set_egress(call.principal, rules)
