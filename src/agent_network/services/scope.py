"""Isolation in one place: every read and write of an org resource passes through here.

A resource outside the caller's scope raises :class:`NotFoundError` exactly like a missing one,
so ids of other orgs leak nothing. Scope rules:

- an org sees its own users, agents, routines, teams, knowledge and audit log;
- a team is visible to its org; a network to its host org and to every org holding a live visa;
- a thread is visible to whoever sees its team or network;
- a user or agent token (``Principal.is_member_scoped``) sees only the teams and networks its
  user/agent is a member of, and their threads.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import NotFoundError, PermissionDeniedError
from agent_network.model.envelope import Actor
from agent_network.services.principal import Principal
from agent_network.store.tables import (
    agents,
    members,
    teams,
    thread_participants,
    threads,
    users,
    visas,
)


def require_org(principal: Principal) -> str:
    """The caller's org id; PermissionDeniedError for the platform admin (who owns no org data)."""
    if principal.org_id is None:
        raise PermissionDeniedError("this call needs an org key, not the platform admin key")
    return principal.org_id


def visa_exists(org_id: str) -> Any:
    """SQL condition: ``org_id`` holds a live visa to the network in ``teams.c.id``."""
    return exists().where(
        and_(
            visas.c.network_id == teams.c.id, visas.c.org_id == org_id, visas.c.revoked_at.is_(None)
        )
    )


def team_visible(org_id: str) -> Any:
    """SQL condition over ``teams``: the team/network is visible to ``org_id``."""
    return and_(
        teams.c.deleted_at.is_(None),
        (teams.c.org_id == org_id) | ((teams.c.kind == "network") & visa_exists(org_id)),
    )


def team_visible_to(principal: Principal) -> Any:
    """SQL condition over ``teams``: visible to ``principal`` (org scope, then membership for
    user/agent tokens)."""
    cond = team_visible(require_org(principal))
    if principal.is_member_scoped:
        cond = and_(
            cond,
            exists().where(
                and_(
                    members.c.team_id == teams.c.id,
                    members.c.member_kind == principal.kind,
                    members.c.member_id == principal.subject_id,
                )
            ),
        )
    return cond


def thread_readable(principal: Principal) -> Any:
    """SQL condition over ``threads``: a ``members`` thread, or a ``restricted`` thread the
    principal takes part in (an org: one of its agents/users is a participant, or it created
    the thread; a token: its own user/agent is a participant)."""
    tp = thread_participants
    part: Any
    if principal.is_member_scoped:
        part = exists().where(
            and_(
                tp.c.thread_id == threads.c.id,
                tp.c.member_kind == principal.kind,
                tp.c.member_id == principal.subject_id,
            )
        )
    else:
        org_id = require_org(principal)
        part = (threads.c.org_id == org_id) | exists().where(
            and_(tp.c.thread_id == threads.c.id, tp.c.org_id == org_id)
        )
    return (threads.c.visibility == "members") | part


def system_actor(principal: Principal) -> Actor:
    """The sender of thread lifecycle envelopes the caller causes: its org, never the credential
    (envelopes are read by other orgs; credential ids are private to their org)."""
    org_id = require_org(principal)
    return Actor("system", org_id, org_id)


def require_org_key(principal: Principal, what: str = "this call") -> str:
    """The caller's org id if it is an org key; PermissionDeniedError for tokens and the admin."""
    if principal.kind != "org" or principal.org_id is None:
        raise PermissionDeniedError(f"{what} needs an org key")
    return principal.org_id


async def own_agent(conn: AsyncConnection, principal: Principal, agent_id: str) -> RowMapping:
    """The caller's live agent ``agent_id``; NotFoundError otherwise."""
    org_id = require_org(principal)
    row = (
        (
            await conn.execute(
                select(agents).where(
                    agents.c.id == agent_id,
                    agents.c.org_id == org_id,
                    agents.c.deleted_at.is_(None),
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFoundError("agent", agent_id)
    return row


async def own_user(conn: AsyncConnection, principal: Principal, user_id: str) -> RowMapping:
    """The caller's live user ``user_id``; NotFoundError otherwise."""
    org_id = require_org(principal)
    row = (
        (
            await conn.execute(
                select(users).where(
                    users.c.id == user_id, users.c.org_id == org_id, users.c.deleted_at.is_(None)
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFoundError("user", user_id)
    return row


async def visible_team(
    conn: AsyncConnection, principal: Principal, team_id: str, *, kind: str | None = None
) -> RowMapping:
    """Team or network ``team_id`` if the caller may see it (and it is of ``kind``)."""
    q = select(teams).where(teams.c.id == team_id, team_visible_to(principal))
    if kind is not None:
        q = q.where(teams.c.kind == kind)
    row = (await conn.execute(q)).mappings().first()
    if row is None:
        raise NotFoundError(kind or "team", team_id)
    return row


async def visible_thread(
    conn: AsyncConnection, principal: Principal, thread_id: str
) -> tuple[RowMapping, RowMapping]:
    """``(thread, team)`` if the caller may see the thread; NotFoundError otherwise."""
    row = (
        (
            await conn.execute(
                select(threads).where(
                    threads.c.id == thread_id,
                    threads.c.deleted_at.is_(None),
                    thread_readable(principal),
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFoundError("thread", thread_id)
    team = (
        (
            await conn.execute(
                select(teams).where(teams.c.id == row["team_id"], team_visible_to(principal))
            )
        )
        .mappings()
        .first()
    )
    if team is None:
        raise NotFoundError("thread", thread_id)
    return row, team
