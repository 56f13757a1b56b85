"""The org's egress policy (what its agents and people may post into networks)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.responses import EgressPolicyOut
from agent_network.api.schemas import EgressPolicyBody

router = APIRouter(prefix="/policy", tags=["policy"], route_class=ApiRoute)


@router.get("/egress", response_model=EgressPolicyOut)
async def get_egress(call: Call = Depends(get_call)) -> dict[str, Any]:
    """The org's egress policy: ``rules`` (none until it sets some), ``updated_at``,
    ``defaults`` (the built-in detectors' actions and ``team_threads``) and ``defaults_off``
    (the detectors it turned off; [] unless it loosened the policy)."""
    return await call.services.policy.get_egress(call.principal)


@router.put("/egress", response_model=EgressPolicyOut)
async def put_egress(body: EgressPolicyBody, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Replace the org's egress policy (org key only).

    Each rule: ``name`` (unique), ``kind`` (``email``, ``card_number``, ``secret`` or ``regex``
    with a ``pattern``), ``action`` (``refuse`` or ``redact``). Applied to every message the
    org's agents and users post into network threads, followed by the ``defaults``:
    ``org_secrets`` (the org's own stored secrets, default ``refuse``) and ``key_formats``
    (default ``redact``), each ``refuse``, ``redact`` or ``off``, and ``team_threads`` (apply
    them in the org's team threads too). Omitting ``defaults`` restores the built-in ones.
    Turning a default ``off`` needs ``"acknowledge_loosening": true`` (422
    ``loosening_not_acknowledged`` otherwise) and is audited as ``policy.egress_loosened``.
    422 for an invalid rule, including a regex that is too long (over 500 characters) or
    backtracks catastrophically.
    """
    rules = [r.model_dump() for r in body.rules]
    defaults = body.defaults.model_dump() if body.defaults is not None else None
    return await call.services.policy.set_egress(
        call.principal, rules, defaults, acknowledge_loosening=body.acknowledge_loosening
    )
