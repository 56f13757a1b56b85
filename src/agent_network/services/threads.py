"""Threads: the service behind every thread call. Creation and widening live here; reads,
the post path and the protocol lifecycle in their own modules (thread_reads, posting,
thread_lifecycle), mixed into :class:`ThreadService`."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import anyio
import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    InvalidRequestError,
    PermissionDeniedError,
    ThreadClosedError,
)
from agent_network.model.envelope import Sender
from agent_network.model.ids import new_id, now_iso
from agent_network.protocol import (
    OpenRequest,
    check_created,
    get_adapter,
    thread_created_data,
)
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_ACK,
    EV_THREAD_CREATED,
    EV_VISIBILITY_SET,
)
from agent_network.protocol.knobs import parse_expectations
from agent_network.services.base import ServiceContext, record
from agent_network.services.cache import DecisionCache
from agent_network.services.posting import (
    PostGrant,
)
from agent_network.services.principal import Principal
from agent_network.services.roles import require_role
from agent_network.services.rules import RuleService, parse_rule
from agent_network.services.scope import (
    require_org,
    system_sender,
    visible_team,
    visible_thread,
)
from agent_network.services.thread_lifecycle import ThreadLifecycle
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    agents,
    members,
    orgs,
    thread_participants,
    threads,
    users,
)

log = structlog.get_logger(__name__)

MAX_BUDGET = 1000


class ThreadService(ThreadLifecycle):
    """Threads of visible teams and networks.

    ``grants`` caches positive post decisions (:class:`PostGrant`, see :meth:`post`); posts
    that miss it while another post is already making the same grant wait for that one.
    """

    def __init__(self, ctx: ServiceContext, *, rules: RuleService | None = None) -> None:
        self.ctx = ctx
        self.rules = rules or RuleService(ctx)
        self.grants: DecisionCache[PostGrant] = DecisionCache()
        self._loading: dict[Hashable, anyio.Event] = {}  # grants being made, by cache key

    async def create(
        self,
        principal: Principal,
        team_id: str,
        title: str,
        *,
        kind: str | None = None,
        agent_budget: int | None = None,
        visibility: str = "members",
        participants: list[tuple[str, str]] | None = None,
        adapter: str = "open",
        initiator: tuple[str, str] | None = None,
        invitees: list[tuple[str, str]] | None = None,
        ttl: float | None = None,
        ack_timeout: float | None = None,
        expectations: list[dict[str, Any]] | None = None,
        names: Mapping[str, str] | None = None,
        graph: Mapping[str, Any] | None = None,
        knobs: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a thread on a visible, open team or network; its WAL opens with thread.created.

        ``visibility`` is ``members`` (everyone in the team/network reads it) or ``restricted``:
        only its participants (``(kind, id)`` of members of the team/network, any org) read and
        post in it.

        ``adapter`` names the thread's protocol (default ``open``: any member, any time; see
        ``agent_network.protocol.adapter_names()``). An ``open`` thread takes ``participants``
        only when restricted, and of the protocol knobs only ``ttl`` and ``expectations``.
        Any other adapter needs ``participants`` (the speakers, incl. the initiator; stored as
        the thread's participants whatever its visibility) and takes the knobs of
        ``thread.created``: ``initiator`` (default the first participant; one of the caller's
        own agents or users), ``invitees`` (who must ack before it is live; default every
        participant but the initiator, ``[]`` nobody), ``ttl`` and ``ack_timeout`` (seconds),
        ``expectations`` (``[{kind, seconds, handler?, name?}]``), ``names`` (name -> id, merged
        over the participants' names and lookup keys, used by workflow targets), ``graph``
        (workflow) and ``knobs`` (adapter-specific, e.g. discussion ``order``). Everything is
        validated before anything is written.

        Right after ``thread.created`` each invitee may ack automatically: an agent when its
        rule admits the adapter (``allowed_adapters``) and the initiator (``inbound_from``;
        otherwise it stays pending and a ``rule.refused`` audit record in the agent's org says
        why), a user when its ``auto_ack`` setting is on. Returns the thread as :meth:`get`.

        Every member may create threads, user and agent tokens included (they see only the
        teams and networks their subject is a member of); a token opens a restricted thread
        only among its participants and a protocol thread only as its initiator.

        Raises InvalidRequestError (422) naming the bad knob or a participant who is not a
        member, NotFoundError for a team outside scope, ThreadClosedError for a closed network.
        """
        org_id = require_org(principal)
        if not title.strip():
            raise InvalidRequestError("thread title must not be empty")
        if visibility not in ("members", "restricted"):
            raise InvalidRequestError("visibility must be 'members' or 'restricted'")
        protocol = adapter != "open"
        if not protocol:
            given = {
                "initiator": initiator is not None,
                "invitees": invitees is not None,
                "ack_timeout": ack_timeout is not None,
                "names": names is not None,
                "graph": graph is not None,
                "knobs": bool(knobs),
            }
            bad = sorted(k for k, v in given.items() if v)
            if bad:
                raise InvalidRequestError(
                    f"{', '.join(bad)}: only for protocol threads (adapter other than 'open')"
                )
            if visibility == "members" and participants:
                raise InvalidRequestError("participants are only for a restricted thread")
            if visibility == "restricted" and not participants:
                raise InvalidRequestError("a restricted thread needs at least one participant")
        else:
            get_adapter(adapter)  # InvalidRequestError naming the known adapters
            if not participants:
                raise InvalidRequestError(
                    f"participants: a {adapter} thread needs its participants (the speakers, "
                    "incl. the initiator)"
                )
        budget = self.ctx.settings.agent_budget if agent_budget is None else agent_budget
        _check_budget(budget)
        async with self.ctx.engine.connect() as conn:
            team = await visible_team(conn, principal, team_id, kind=kind)
            _check_token_opens(principal, protocol, visibility, participants or [], initiator)
            people = await self._members_of(conn, team_id, participants or [])
            info = await _participant_info(conn, participants or []) if protocol else {}
        if team["status"] == "closed":
            raise ThreadClosedError(f"the {team['kind']} is closed; no new threads")
        data: dict[str, Any] = {"title": title.strip(), "team_id": team_id}
        pairs = list(participants or [])
        if protocol:
            opener = initiator or pairs[0]
            if opener in info and info[opener]["org_id"] != org_id:
                raise InvalidRequestError(
                    f"initiator: {opener[0]} {opener[1]!r} is not one of your org's agents or "
                    "users (a thread is opened in the name of its initiator)"
                )
            data.update(
                thread_created_data(
                    adapter,
                    pairs,
                    initiator=opener,
                    invitees=[p for p in pairs if p != opener] if invitees is None else invitees,
                    ttl=ttl,
                    ack_timeout=ack_timeout,
                    expectations=parse_expectations(expectations or []),
                    names={**_default_names(info), **dict(names or {})},
                    graph=graph,
                    **_extra_knobs(knobs),
                )
            )
        else:
            data["adapter"] = "open"
            if ttl is not None:
                data["ttl"] = ttl
            if expectations:
                data["expectations"] = expectations
        data["agent_budget"] = budget
        request = check_created(data)  # (again) the very check the hub runs on append
        thread_id = new_id("thr")
        await self.ctx.hub.append(
            thread_id,
            type=EV_THREAD_CREATED,
            data=data,
            sender=system_sender(principal),
            acted_by=(principal.kind, principal.key_id),
        )
        row = {
            "id": thread_id,
            "team_id": team_id,
            "org_id": org_id,
            "title": title.strip(),
            "adapter": adapter,
            "visibility": visibility,
            "created_at": now_iso(),
        }
        async with write_transaction(self.ctx.engine) as conn:
            await conn.execute(threads.insert().values(**row))
            await _add_participants(conn, thread_id, people)
            await record(
                conn, principal, "thread.create", "thread", thread_id, data={"adapter": adapter}
            )
        if request.invitees:
            await self._auto_ack(principal, thread_id, request, info)
        return await self.get(principal, thread_id)

    async def _auto_ack(
        self,
        principal: Principal,
        thread_id: str,
        request: OpenRequest,
        info: Mapping[tuple[str, str], Mapping[str, Any]],
    ) -> None:
        """Ack for every invitee whose rule (agent) or setting (user) says so; audit an agent
        whose rule refuses (``rule.refused``, in the agent's org) and leave it pending."""
        assert request.initiator is not None
        opener = info[request.initiator]
        for who in request.invitees:
            p = info[who]
            refusal: str | None = None
            if who[0] == "agent":
                rule = parse_rule(p["rule"])
                allowed = rule.allowed_adapters if rule is not None else None
                if allowed is not None and request.adapter not in allowed:
                    refusal = f"adapter {request.adapter!r} is not in allowed_adapters"
                if refusal is None and not RuleService.inbound_allows(
                    rule, request.initiator[1], opener["org_id"], p["org_id"]
                ):
                    refusal = f"inbound_from does not admit the initiator {opener['name']!r}"
            elif not p["auto_ack"]:
                continue  # a person acks explicitly
            if refusal is not None:
                async with write_transaction(self.ctx.engine) as conn:
                    await record(
                        conn,
                        principal,
                        "rule.refused",
                        "thread",
                        thread_id,
                        org_id=p["org_id"],
                        reason=f"rule of {p['name']!r}: {refusal}; the invitation stays pending",
                        data={"agent_id": who[1], "envelope": "thread.ack"},
                    )
                continue
            try:
                await self.ctx.hub.append(
                    thread_id,
                    type=EV_THREAD_ACK,
                    data={"auto": True},
                    sender=Sender(
                        "agent" if who[0] == "agent" else "user", who[1], p["org_id"], p["name"]
                    ),
                )
            except AgentNetworkError as err:  # e.g. closed meanwhile: it stays pending
                log.info("thread.auto_ack_refused", thread=thread_id, code=err.code)

    @staticmethod
    async def _members_of(
        conn: AsyncConnection, team_id: str, wanted: list[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """``wanted`` as member rows of the team; InvalidRequestError for a non-member."""
        out = []
        for kind, member_id in wanted:
            row = (
                (
                    await conn.execute(
                        select(members.c.member_kind, members.c.member_id, members.c.org_id).where(
                            members.c.team_id == team_id,
                            members.c.member_kind == kind,
                            members.c.member_id == member_id,
                        )
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise InvalidRequestError(
                    f"{kind} {member_id!r} is not a member of this team or network"
                )
            out.append(dict(row))
        return out

    async def widen(
        self,
        principal: Principal,
        thread_id: str,
        *,
        visibility: str | None = None,
        participants: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Widen who sees a restricted thread: add participants, or open it to all members.

        Visibility can be widened, never narrowed: ``members`` -> ``restricted`` is refused
        (InvalidRequestError). Each change is also an envelope in the thread's WAL. A user
        token needs role admin in the thread's team or network (PermissionDeniedError).
        """
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
            await require_role(conn, principal, team, "admin", "widening threads of")
            people = await self._members_of(conn, team["id"], participants or [])
        if visibility == "restricted" and row["visibility"] == "members":
            raise InvalidRequestError("visibility can be widened, never narrowed")
        if people and row["adapter"] != "open":
            raise InvalidRequestError(
                f"participants of a {row['adapter']} thread are fixed when it opens; open a new "
                "thread to include someone else"
            )
        if visibility not in (None, "members", "restricted"):
            raise InvalidRequestError("visibility must be 'members' or 'restricted'")
        system = system_sender(principal)
        if people and row["visibility"] == "restricted":
            await self.ctx.hub.append(
                thread_id,
                type=EV_PARTICIPANTS_ADDED,
                sender=system,
                data={"participants": [[p["member_kind"], p["member_id"]] for p in people]},
                acted_by=(principal.kind, principal.key_id),
            )
            async with write_transaction(self.ctx.engine) as conn:
                await _add_participants(conn, thread_id, people)
                await record(conn, principal, "thread.participants_add", "thread", thread_id)
        if visibility == "members" and row["visibility"] == "restricted":
            await self.ctx.hub.append(
                thread_id,
                type=EV_VISIBILITY_SET,
                data={"visibility": "members"},
                sender=system,
                acted_by=(principal.kind, principal.key_id),
            )
            async with write_transaction(self.ctx.engine) as conn:
                await conn.execute(
                    update(threads).where(threads.c.id == thread_id).values(visibility="members")
                )
                await record(conn, principal, "thread.visibility_widen", "thread", thread_id)
        self.ctx.config_epoch += 1  # cached post decisions hold the thread's old visibility
        return await self.get(principal, thread_id)

    async def set_budget(self, principal: Principal, thread_id: str, budget: int) -> dict[str, Any]:
        """Set the thread's budget of consecutive agent messages (the org that created it or
        hosts its team/network; a user token needs role admin there). NotFoundError outside
        scope, PermissionDeniedError, InvalidRequestError (bad budget)."""
        _check_budget(budget)
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
            if principal.org_id not in (row["org_id"], team["org_id"]):
                raise PermissionDeniedError(
                    "setting the agent budget of a thread is for the org that created it or "
                    f"hosts its {team['kind']}"
                )
            await require_role(
                conn, principal, team, "admin", "setting the agent budget of threads in"
            )
        await self.ctx.hub.append(
            thread_id,
            type=EV_BUDGET_SET,
            data={"agent_budget": budget},
            sender=system_sender(principal),
            acted_by=(principal.kind, principal.key_id),
        )
        return await self.get(principal, thread_id)


def _check_token_opens(
    principal: Principal,
    protocol: bool,
    visibility: str,
    participants: list[tuple[str, str]],
    initiator: tuple[str, str] | None,
) -> None:
    """A user or agent token opens threads as itself: a restricted thread must list its own
    user/agent among the participants (else it could not read what it opened), and a protocol
    thread must have it as the initiator (by default the first participant).
    InvalidRequestError otherwise; nothing to check for an org key."""
    if not principal.is_member_scoped:
        return
    me = (principal.kind, str(principal.subject_id))
    if protocol:
        opener = initiator or (participants[0] if participants else None)
        if opener is not None and tuple(opener) != me:
            raise InvalidRequestError(
                f"initiator: {principal.credential_name} opens a protocol thread as its own "
                f"{principal.kind} {me[1]!r} (name it as the initiator or first participant)"
            )
    elif visibility == "restricted" and me not in {tuple(p) for p in participants}:
        raise InvalidRequestError(
            f"participants: {principal.credential_name} opens a restricted thread only with its "
            f"own {principal.kind} {me[1]!r} among the participants"
        )


async def _add_participants(
    conn: AsyncConnection, thread_id: str, people: list[dict[str, Any]]
) -> None:
    """Insert participant rows (an existing participant is left as it is): one query for those
    already there, one insert for the rest."""
    wanted = {(p["member_kind"], p["member_id"]): p for p in people}  # first of each, in order
    if not wanted:
        return
    tp = thread_participants
    q = select(tp.c.member_kind, tp.c.member_id).where(
        tp.c.thread_id == thread_id, tp.c.member_id.in_({key[1] for key in wanted})
    )
    have = {(r[0], r[1]) for r in await conn.execute(q)}
    at = now_iso()
    rows = [
        {
            "thread_id": thread_id,
            "member_kind": kind,
            "member_id": member_id,
            "org_id": p["org_id"],
            "created_at": at,
        }
        for (kind, member_id), p in wanted.items()
        if (kind, member_id) not in have
    ]
    if rows:
        await conn.execute(tp.insert(), rows)


RESERVED_KNOBS = frozenset(
    {
        "title",
        "team_id",
        "adapter",
        "participants",
        "initiator",
        "invitees",
        "ttl",
        "ack_timeout",
        "expectations",
        "names",
        "graph",
        "agent_budget",
        "visibility",
    }
)


def _extra_knobs(knobs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Adapter-specific knobs of ``thread.created``; InvalidRequestError for a reserved name."""
    extra = dict(knobs or {})
    clash = sorted(set(extra) & RESERVED_KNOBS)
    if clash:
        raise InvalidRequestError(
            f"knobs: {', '.join(clash)} cannot be given as adapter knobs; use the field itself"
        )
    return extra


async def _participant_info(
    conn: AsyncConnection, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """``(kind, id) -> {name, org_id, org_name, lookup_key, rule, auto_ack}`` of live agents and
    users (absent ids are left out)."""
    wanted = list(pairs)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    agent_ids = [pid for k, pid in wanted if k == "agent"]
    user_ids = [pid for k, pid in wanted if k == "user"]
    if agent_ids:
        q = (
            select(
                agents.c.id,
                agents.c.name,
                agents.c.org_id,
                agents.c.lookup_key,
                agents.c.rule,
                orgs.c.name.label("org_name"),
            )
            .join(orgs, orgs.c.id == agents.c.org_id)
            .where(agents.c.id.in_(agent_ids), agents.c.deleted_at.is_(None))
        )
        for r in (await conn.execute(q)).mappings():
            out[("agent", r["id"])] = {**dict(r), "auto_ack": False}
    if user_ids:
        q = (
            select(
                users.c.id,
                users.c.name,
                users.c.org_id,
                users.c.auto_ack,
                orgs.c.name.label("org_name"),
            )
            .join(orgs, orgs.c.id == users.c.org_id)
            .where(users.c.id.in_(user_ids), users.c.deleted_at.is_(None))
        )
        for r in (await conn.execute(q)).mappings():
            out[("user", r["id"])] = {**dict(r), "lookup_key": None, "rule": None}
    return out


def _default_names(info: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, str]:
    """``name -> id`` from the participants' display names and agents' lookup keys, leaving out
    a name two participants share (a workflow can always use ids, or give ``names``)."""
    seen: dict[str, set[str]] = {}
    for (_, pid), p in info.items():
        for name in (p["name"], p["lookup_key"]):
            if isinstance(name, str) and name:
                seen.setdefault(name, set()).add(pid)
    return {name: next(iter(ids)) for name, ids in seen.items() if len(ids) == 1}


def _check_budget(budget: int) -> None:
    if not 0 <= budget <= MAX_BUDGET:
        raise InvalidRequestError(f"agent_budget must be between 0 and {MAX_BUDGET}")
