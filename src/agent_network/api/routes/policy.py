"""The org's egress policy (what its agents and people may post into networks)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["policy"])
