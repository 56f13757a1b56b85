"""Envelopes as readers receive them: sender names resolved, the REST/WebSocket item shape,
and the stub an audience leaves of an envelope it hides."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.model.envelope import Envelope, client_key
from agent_network.protocol.events import (
    EV_MESSAGE,
)
from agent_network.store.tables import (
    agents,
    orgs,
    users,
)


async def _display_names(conn: AsyncConnection, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``id -> display name`` of the agents and users in ``pairs`` (deleted ones included)."""
    ids: dict[str, set[str]] = {"agent": set(), "user": set()}
    for kind, pid in pairs:
        if kind in ids:
            ids[kind].add(pid)
    out: dict[str, str] = {}
    for kind, table in (("agent", agents), ("user", users)):
        if ids[kind]:
            q = select(table.c.id, table.c.name).where(table.c.id.in_(ids[kind]))
            out.update({r[0]: r[1] for r in await conn.execute(q)})
    return out


async def sender_names(
    conn: AsyncConnection, envs: Iterable[Envelope]
) -> dict[str, tuple[str, str]]:
    """``sender_id -> (display name, org name)`` for the senders of ``envs``."""
    ids: dict[str, set[str]] = {"agent": set(), "user": set()}
    org_ids: set[str] = set()
    for e in envs:
        if e.sender_kind in ids:
            ids[e.sender_kind].add(e.sender_id)
        org_ids.add(e.sender_org_id)
    names: dict[str, str] = {}
    for kind, table in (("agent", agents), ("user", users)):
        if ids[kind]:
            q = select(table.c.id, table.c.name).where(table.c.id.in_(ids[kind]))
            names.update({r[0]: r[1] for r in await conn.execute(q)})
    org_names = {}
    if org_ids:
        q = select(orgs.c.id, orgs.c.name).where(orgs.c.id.in_(org_ids))
        org_names = {r[0]: r[1] for r in await conn.execute(q)}
    out: dict[str, tuple[str, str]] = {}
    for e in envs:
        out[e.sender_id] = (
            names.get(e.sender_id, "system" if e.sender_kind == "system" else "(deleted)"),
            org_names.get(e.sender_org_id, ""),
        )
    return out


async def render(conn: AsyncConnection, envs: list[Envelope]) -> list[dict[str, Any]]:
    """Envelopes as API dicts: seq, id, type, content, data, sender (kind, id, name, org)."""
    names = await sender_names(conn, envs)
    return [render_envelope(e, *names.get(e.sender_id, ("", ""))) for e in envs]


def render_envelope(e: Envelope, name: str, org_name: str) -> dict[str, Any]:
    """One envelope as its API dict, given its sender's display ``name`` and ``org_name`` (the
    one shape shared by REST pages and WebSocket ``envelope`` frames).

    It carries every hashed field with its stored value (docs/security.md, "The hash chain,
    byte for byte"): ``idempotency_key`` is the key as its sender gave it, and
    ``stored_idempotency_key`` the key as stored and hashed (a client key scoped as
    ``<sender_id>:<key>``), so any reader can recompute ``hash``.
    """
    return {
        "id": e.id,
        "thread_id": e.thread_id,
        "seq": e.seq,
        "type": e.type,
        "content": e.data.get("content") if e.type == EV_MESSAGE else None,
        "data": e.data,
        "sender": {
            "kind": e.sender_kind,
            "id": e.sender_id,
            "name": name,
            "org_id": e.sender_org_id,
            "org_name": org_name,
        },
        "causation_id": e.causation_id,
        "idempotency_key": client_key(e.sender_id, e.idempotency_key),
        "stored_idempotency_key": e.idempotency_key,
        "audience": e.audience,
        "created_at": e.created_at,
        "hash": e.hash,
        "prev_hash": e.prev_hash,
    }


def render_stub(e: Envelope) -> dict[str, Any]:
    """An envelope whose audience excludes the reader, as that reader gets it: its place in
    the chain only (``thread_id``, ``seq``, ``hash``, ``prev_hash``, ``"stub": true``) — no
    type, content, data, sender, audience or time — so the reader can still check that the
    chain links up (docs/security.md, "The hash chain, byte for byte")."""
    return {
        "thread_id": e.thread_id,
        "seq": e.seq,
        "hash": e.hash,
        "prev_hash": e.prev_hash,
        "stub": True,
    }
