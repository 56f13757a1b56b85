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

import functools
from collections.abc import Set
from typing import Any

from sqlalchemy import Select, and_, bindparam, exists, null, select, true, union_all
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from agent_network.model.envelope import Envelope, Sender
from agent_network.protocol.turns import visible_to
from agent_network.services.principal import Principal
from agent_network.store.tables import (
    agents,
    credentials,
    knowledge_documents,
    members,
    org_policies,
    orgs,
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


def audience_admits(
    viewer: Principal | Sender, envelope: Envelope, acts_for: Set[str] = frozenset()
) -> bool:
    """Whether ``viewer`` may see ``envelope`` given its ``audience`` (the one audience rule,
    for every path that hands envelopes out: WebSocket frames, REST pages and long-polls).

    ``audience`` None means everyone who can read the thread. Otherwise it lists agent, user or
    org ids, and the viewer is admitted when it is named: an :class:`Sender` or a user/agent
    token by its own id, an org key by its org id or by any id in ``acts_for`` (the ids of the
    org's agents and users the caller knows of). The sender always sees its own envelope, and an
    org key sees every envelope sent by its own org. The platform admin sees none. Pure: no I/O.
    """
    audience = envelope.audience
    if audience is None:
        return True
    if isinstance(viewer, Sender):
        return visible_to(viewer.id, envelope)
    if viewer.org_id is None:
        return False
    if viewer.is_member_scoped:
        subject = viewer.subject_id
        return subject == envelope.sender_id or subject in audience
    if viewer.org_id == envelope.sender_org_id or viewer.org_id in audience:
        return True
    return not acts_for.isdisjoint(audience)


async def org_member_ids(conn: AsyncConnection, principal: Principal) -> frozenset[str]:
    """Ids of the live agents and users of an org key's org (the ``acts_for`` of
    :func:`audience_admits`); empty for tokens and the platform admin."""
    if principal.kind != "org" or principal.org_id is None:
        return frozenset()
    q = union_all(
        select(agents.c.id).where(
            agents.c.org_id == principal.org_id, agents.c.deleted_at.is_(None)
        ),
        select(users.c.id).where(users.c.org_id == principal.org_id, users.c.deleted_at.is_(None)),
    )
    return frozenset(str(r[0]) for r in await conn.execute(q))


def system_sender(principal: Principal) -> Sender:
    """The sender of thread lifecycle envelopes the caller causes: its org, never the credential
    (envelopes are read by other orgs; credential ids are private to their org)."""
    org_id = require_org(principal)
    return Sender("system", org_id, org_id)


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
    thread_q, team_q = _visible_thread_queries(principal.kind, principal.internal)
    params = _scope_params(principal)
    row = (await conn.execute(thread_q, {**params, "thread_id": thread_id})).mappings().first()
    if row is None:
        raise NotFoundError("thread", thread_id)
    team = (await conn.execute(team_q, {**params, "team_id": row["team_id"]})).mappings().first()
    if team is None:
        raise NotFoundError("thread", thread_id)
    return row, team


def _scope_params(principal: Principal) -> dict[str, Any]:
    """The values of :func:`_stand_in`'s parameters for ``principal``."""
    return {
        "org_id": require_org(principal),
        "key_id": principal.key_id,
        "subject_id": principal.subject_id,
    }


def _stand_in(kind: str, internal: bool) -> Principal:
    """A principal of ``kind`` whose ids are the bound parameters ``org_id``, ``key_id`` and
    ``subject_id``: the scope conditions built over it make a statement that serves every
    principal of that kind (values from :func:`_scope_params`). Never used outside a statement."""
    ids: Any = {name: bindparam(name) for name in ("org_id", "key_id", "subject_id")}
    return Principal(
        kind,  # type: ignore[arg-type]  # one of PrincipalKind (the caller's)
        ids["org_id"],
        ids["key_id"],
        subject_id=ids["subject_id"],
        internal=internal,
    )


@functools.lru_cache(maxsize=16)
def _visible_thread_queries(kind: str, internal: bool) -> tuple[Select[Any], Select[Any]]:
    """:func:`visible_thread`'s two statements for one kind of principal (parameters:
    :func:`_scope_params`, ``thread_id``, ``team_id``), built once: building them cost more
    than running them."""
    principal = _stand_in(kind, internal)
    thread_q = select(threads).where(
        threads.c.id == bindparam("thread_id"),
        threads.c.deleted_at.is_(None),
        thread_readable(principal),
    )
    team_q = select(teams).where(teams.c.id == bindparam("team_id"), team_visible_to(principal))
    return thread_q, team_q


async def post_access(
    conn: AsyncConnection, principal: Principal, thread_id: str, sender_kind: str, sender_id: str
) -> RowMapping | None:
    """Every scope check of a post in one query, or None if any of them fails.

    The row exists exactly when, as checked one by one by :func:`visible_thread`,
    :func:`own_agent` / :func:`own_user` and the membership lookups: the thread is visible to
    ``principal`` (live, readable, its team or network visible), the principal's credential is
    not revoked (see :func:`credential_in_force`), the sender ``sender_kind``
    (``agent`` | ``user``) ``sender_id`` is a live one of the principal's org, is a member of the
    thread's team or network and, in a restricted thread, a participant. Columns: ``team_id``,
    ``team_kind``, ``visibility``, ``sender_id``, ``sender_org_id``, ``sender_name``,
    ``org_name`` (the sender org's name), ``rule`` (the agent's stored rule; None for a user),
    ``egress`` and ``egress_updated_at`` (the sender org's stored egress policy, None if unset).
    None tells nothing about *which* check failed: run them one by one for the exact refusal.
    """
    params = {**_scope_params(principal), "sender_id": sender_id, "thread_id": thread_id}
    q = _post_access_query(principal.kind, principal.internal, sender_kind)
    row: RowMapping | None = (await conn.execute(q, params)).mappings().first()
    return row


@functools.lru_cache(maxsize=32)
def _post_access_query(kind: str, internal: bool, sender_kind: str) -> Select[Any]:
    """:func:`post_access`'s statement for one kind of principal and sender, every id in it a
    bound parameter (``org_id``, ``key_id``, ``subject_id``, ``sender_id``, ``thread_id``):
    built once, because building it took ~10 times longer than the database takes to run it
    (SQLAlchemy constructs and cache-keys every clause), so that a post into a thread whose
    grant is not cached costs one cheap query. The scope conditions are built over
    :func:`_stand_in`."""
    principal = _stand_in(kind, internal)
    org_id = require_org(principal)
    sender_id: Any = bindparam("sender_id")
    who = agents if sender_kind == "agent" else users
    # aliases: the scope conditions correlate their own subqueries on ``members`` and
    # ``thread_participants``; the sender's rows must not be mistaken for theirs
    member = members.alias("sender_member")
    part = thread_participants.alias("sender_part")
    q = (
        select(
            teams.c.id.label("team_id"),
            teams.c.kind.label("team_kind"),
            threads.c.visibility,
            who.c.id.label("sender_id"),
            who.c.org_id.label("sender_org_id"),
            who.c.name.label("sender_name"),
            orgs.c.name.label("org_name"),
            (agents.c.rule if sender_kind == "agent" else null()).label("rule"),
            org_policies.c.egress,
            org_policies.c.updated_at.label("egress_updated_at"),
        )
        .select_from(threads)
        .join(teams, teams.c.id == threads.c.team_id)
        .join(
            who,
            and_(who.c.id == sender_id, who.c.org_id == org_id, who.c.deleted_at.is_(None)),
        )
        .join(
            member,
            and_(
                member.c.team_id == teams.c.id,
                member.c.member_kind == sender_kind,
                member.c.member_id == who.c.id,
            ),
        )
        .join(orgs, orgs.c.id == who.c.org_id)
        .outerjoin(org_policies, org_policies.c.org_id == who.c.org_id)
        .where(
            threads.c.id == bindparam("thread_id"),
            threads.c.deleted_at.is_(None),
            _credential_unrevoked(principal),
            thread_readable(principal),
            team_visible_to(principal),
            (threads.c.visibility != "restricted")
            | exists().where(
                and_(
                    part.c.thread_id == threads.c.id,
                    part.c.member_kind == sender_kind,
                    part.c.member_id == who.c.id,
                )
            ),
        )
    )
    return q


def _credential_unrevoked(principal: Principal) -> Any:
    """SQL condition: the credential behind ``principal`` exists and is not revoked (always
    true for an internal principal, which has none: services/principal.py
    :func:`~agent_network.services.principal.agent_principal`)."""
    if principal.internal:
        return true()
    return exists().where(
        and_(credentials.c.id == principal.key_id, credentials.c.revoked_at.is_(None))
    )


async def credential_in_force(conn: AsyncConnection, principal: Principal) -> None:
    """AuthenticationError if the org key or token behind ``principal`` was revoked since it
    authenticated (a long-lived WebSocket connection keeps its principal). A user or agent
    token whose subject was deleted is refused by the sender checks that follow. An internal
    principal has no credential: nothing to check."""
    if principal.internal:
        return
    q = select(credentials.c.id).where(_credential_unrevoked(principal))
    if (await conn.execute(q)).first() is None:
        raise AuthenticationError(
            "the credential was revoked since this connection authenticated; "
            "connect again with a valid credential"
        )


_HEX = frozenset("0123456789abcdef")


def looks_like_id(segment: str) -> bool:
    """Whether a URL path segment has the shape of our ids: a lower-case prefix, ``_`` and
    lower-case hex (``agt_3f9c…``); a secret name such as ``API_KEY`` or ``thr_key`` has not."""
    prefix, sep, rest = segment.partition("_")
    return bool(sep and rest and prefix.isalpha() and prefix.islower() and set(rest) <= _HEX)


# Rows of one org, by the prefix of their ids (what a path may name besides the above).
_OWNED_BY_PREFIX = {
    "cred": ("credential", credentials),
    "doc": ("document", knowledge_documents),
}


async def path_in_scope(conn: AsyncConnection, principal: Principal, path: str) -> None:
    """NotFoundError if the URL ``path`` names an id the caller could not read.

    Used before a refusal by credential kind or scope (403), so that an id of another org —
    or one that does not exist — answers 404 whatever the caller may do: scope first, then
    role. Each segment shaped like an id (:func:`looks_like_id`) is checked as its read checks
    it: agents and users of the caller's org (:func:`own_agent`, :func:`own_user`), teams and
    networks visible to the caller (:func:`visible_team`: for a token, those its subject is a
    member of), threads it may read (:func:`visible_thread`: restricted ones only as a
    participant), and its org's credentials and knowledge documents. Other segments are not
    looked at. One indexed lookup per id, only on a refused call. The platform admin has no
    org scope: nothing is checked.
    """
    if principal.org_id is None:
        return
    for segment in path.split("/"):
        if not looks_like_id(segment):
            continue
        prefix = segment.partition("_")[0]
        if prefix == "agt":
            await own_agent(conn, principal, segment)
        elif prefix == "usr":
            await own_user(conn, principal, segment)
        elif prefix in ("team", "net"):
            await visible_team(
                conn, principal, segment, kind="network" if prefix == "net" else "team"
            )
        elif prefix == "thr":
            await visible_thread(conn, principal, segment)
        elif prefix in _OWNED_BY_PREFIX:
            what, table = _OWNED_BY_PREFIX[prefix]
            q = select(table.c.id).where(table.c.id == segment, table.c.org_id == principal.org_id)
            if (await conn.execute(q)).first() is None:
                raise NotFoundError(what, segment)
