"""Credentials (org keys, user and agent tokens) and agent secrets."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["credentials"])
