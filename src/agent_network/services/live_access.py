"""Access checks a long-lived connection repeats: is its credential still live, when does it
expire now, and may it show a given sender as typing in a thread.

The realtime protocol (``api/realtime/``) calls these inside its own connections to the
database (bounded and shielded there); they only read. See docs/protocol.md for when the
WebSocket protocol re-checks, and docs/architecture.md ("Module map and sizes") for where
things live.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import PermissionDeniedError
from agent_network.services.posting import _sender_for
from agent_network.services.principal import Principal, epoch_of, not_expired
from agent_network.services.scope import own_agent, own_user, visible_thread
from agent_network.store.tables import (
    agents,
    credentials,
    members,
    platform_keys,
    thread_participants,
    users,
)


async def credential_live(conn: AsyncConnection, principal: Principal) -> bool:
    """Whether the credential behind ``principal`` still authenticates: not revoked, not
    expired, and for a user or agent token, its subject not deleted."""
    if principal.kind == "admin":
        q = select(platform_keys.c.id).where(
            platform_keys.c.id == principal.key_id, platform_keys.c.revoked_at.is_(None)
        )
        return (await conn.execute(q)).first() is not None
    q = select(credentials.c.id).where(
        credentials.c.id == principal.key_id, credentials.c.revoked_at.is_(None), not_expired()
    )
    if (await conn.execute(q)).first() is None:
        return False
    table = {"user": users, "agent": agents}.get(principal.kind)
    if table is None:
        return True
    q = select(table.c.id).where(table.c.id == principal.subject_id, table.c.deleted_at.is_(None))
    return (await conn.execute(q)).first() is not None


async def credential_expiry(conn: AsyncConnection, principal: Principal) -> float | None:
    """The current expiry (epoch seconds) of ``principal``'s credential, None when it has none
    (a renewal may have moved it since the principal was authenticated)."""
    at = (
        await conn.execute(
            select(credentials.c.expires_at).where(credentials.c.id == principal.key_id)
        )
    ).scalar()
    return epoch_of(at)


async def typing_sender(
    conn: AsyncConnection,
    principal: Principal,
    thread_id: str,
    agent_id: str | None,
    user_id: str | None,
) -> dict[str, Any]:
    """The sender ``{"kind", "id", "org_id", "name"}`` that ``principal`` shows as typing in
    ``thread_id``, checked like a post's sender: its own agent or user, a member of the
    thread's team, a participant of a restricted thread.

    Errors: NotFoundError (thread or sender outside the principal's scope),
    PermissionDeniedError (a token typing as someone else, or a sender that does not take part
    in the thread), InvalidRequestError (not exactly one of ``agent_id``/``user_id`` for an org
    key)."""
    agent_id, user_id = _sender_for(principal, agent_id, user_id)
    thread, team = await visible_thread(conn, principal, thread_id)
    if agent_id is not None:
        who, kind = await own_agent(conn, principal, agent_id), "agent"
    else:
        assert user_id is not None
        who, kind = await own_user(conn, principal, user_id), "user"
    member = await conn.execute(
        select(members.c.role).where(
            members.c.team_id == team["id"],
            members.c.member_kind == kind,
            members.c.member_id == who["id"],
        )
    )
    allowed = member.first() is not None
    if allowed and thread["visibility"] == "restricted":
        part = await conn.execute(
            select(thread_participants.c.member_id).where(
                thread_participants.c.thread_id == thread_id,
                thread_participants.c.member_kind == kind,
                thread_participants.c.member_id == who["id"],
            )
        )
        allowed = part.first() is not None
    if not allowed:
        raise PermissionDeniedError(f"{kind} {who['name']!r} does not take part in this thread")
    return {"kind": kind, "id": who["id"], "org_id": who["org_id"], "name": who["name"]}


__all__ = ["credential_expiry", "credential_live", "typing_sender"]
