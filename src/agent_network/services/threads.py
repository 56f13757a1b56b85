"""Threads: creation, messages (through the hub), history reads, chain verification."""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    ConflictError,
    InvalidAudienceError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolViolationError,
    ThreadClosedError,
)
from agent_network.hub import AccessChangedError, VerifyReport
from agent_network.model.envelope import Actor, Envelope, client_key
from agent_network.model.ids import new_id, now_iso
from agent_network.model.rule import Rule
from agent_network.protocol import (
    OpenRequest,
    check_created,
    get_adapter,
    thread_created_data,
    tools_for,
)
from agent_network.protocol.adapters.graph import parse_tool_calls
from agent_network.protocol.adapters.workflow import WorkflowState
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_CONTEXT_SET,
    EV_MESSAGE,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
    EV_VISIBILITY_SET,
)
from agent_network.protocol.knobs import parse_expectations
from agent_network.protocol.state import ThreadState
from agent_network.services.base import ServiceContext, record
from agent_network.services.cache import DecisionCache
from agent_network.services.claims import stored_key
from agent_network.services.policy import (
    EgressPolicy,
    EgressRefusedError,
    EgressResult,
    audit_egress,
    check_message,
    matches_data,
    policy_for_thread,
    policy_from_row,
)
from agent_network.services.principal import Principal
from agent_network.services.roles import require, require_role, standing
from agent_network.services.rules import AgentRow, RuleService, parse_rule
from agent_network.services.scope import (
    audience_admits,
    credential_in_force,
    org_member_ids,
    own_agent,
    own_user,
    post_access,
    require_org,
    system_actor,
    team_visible_to,
    thread_readable,
    visible_team,
    visible_thread,
)
from agent_network.services.secrets import org_secret_index
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    agents,
    envelopes,
    members,
    org_policies,
    orgs,
    teams,
    thread_participants,
    threads,
    users,
)

log = structlog.get_logger(__name__)

SenderKind = Literal["agent", "user"]

MAX_CONTENT = 32_000  # characters
ACCESS_RETRIES = 5  # checks of one post when access keeps being removed meanwhile
MAX_BUDGET = 1000
MAX_KEY = 150  # characters of a client idempotency key (stored as "<sender_id>:<key>")


class ThreadService:
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
            sender=system_actor(principal),
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
                    sender=Actor(
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
        system = system_actor(principal)
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

    async def list_threads(
        self, principal: Principal, team_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Threads visible to the caller, optionally of one team/network."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(threads)
                .join(teams, teams.c.id == threads.c.team_id)
                .where(
                    threads.c.deleted_at.is_(None),
                    team_visible_to(principal),
                    thread_readable(principal),
                )
                .order_by(threads.c.created_at)
            )
            if team_id is not None:
                await visible_team(conn, principal, team_id)
                q = q.where(threads.c.team_id == team_id)
            rows = list((await conn.execute(q)).mappings())
        return await self._describe(rows)

    async def get(self, principal: Principal, thread_id: str) -> dict[str, Any]:
        """A visible thread with its folded state; NotFoundError outside scope.

        Keys: ``id``, ``team_id``, ``org_id``, ``title``, ``adapter``, ``visibility``,
        ``status`` (open | invited | active | closing | closed), ``last_seq``, ``agent_budget``,
        ``consecutive_agent_messages``, ``created_at``, ``participants`` (``[{kind, id,
        name}]``: the protocol's speakers in order, or the participants of a restricted open
        thread; ``[]`` for an open members thread), ``initiator`` (``{kind, id, name}`` or
        None), ``pending_acks`` (invitees still to ack, same shape), ``expected_speaker`` (id
        of whose turn it is, None = anyone or nobody), ``close_reason`` (None while live), and
        for a workflow ``turns`` (messages taken) and ``context`` (``{key: JSON}``).
        """
        async with self.ctx.engine.connect() as conn:
            row, _team = await visible_thread(conn, principal, thread_id)
        return (await self._describe([row]))[0]

    async def _describe(self, rows: list[Any]) -> list[dict[str, Any]]:
        """Thread rows with their folded state (see :meth:`get`); one connection for the
        participants' names of all of them."""
        states = [await self.ctx.hub.state(row["id"]) for row in rows]
        listed: list[list[tuple[str, str]]] = [list(st.participants) for st in states]
        names: dict[str, str] = {}
        if any(listed) or any(r["visibility"] == "restricted" for r in rows):
            async with self.ctx.engine.connect() as conn:
                for i, row in enumerate(rows):
                    if not listed[i] and row["visibility"] == "restricted":
                        q = (
                            select(
                                thread_participants.c.member_kind,
                                thread_participants.c.member_id,
                            )
                            .where(thread_participants.c.thread_id == row["id"])
                            .order_by(thread_participants.c.created_at)
                        )
                        listed[i] = [(str(k), str(m)) for k, m in await conn.execute(q)]
                everyone = [p for pairs in listed for p in pairs]
                if everyone:
                    names = await _display_names(conn, everyone)
        return [
            self._thread_dict(row, state, pairs, names)
            for row, state, pairs in zip(rows, states, listed, strict=True)
        ]

    @staticmethod
    def _thread_dict(
        row: Any, state: ThreadState, pairs: list[tuple[str, str]], names: Mapping[str, str]
    ) -> dict[str, Any]:
        def person(p: tuple[str, str]) -> dict[str, Any]:
            return {"kind": p[0], "id": p[1], "name": names.get(p[1], "(deleted)")}

        out = {
            "id": row["id"],
            "team_id": row["team_id"],
            "org_id": row["org_id"],
            "title": row["title"],
            "adapter": state.adapter,
            "visibility": row["visibility"],
            "status": state.status,
            "last_seq": state.last_seq,
            "agent_budget": state.agent_budget,
            "consecutive_agent_messages": state.consecutive_agent,
            "created_at": row["created_at"],
            "participants": [person(p) for p in pairs],
            "initiator": person(state.initiator) if state.initiator else None,
            "pending_acks": [person(p) for p in state.pending_acks],
            "expected_speaker": state.expected_speaker,
            "close_reason": state.close_reason,
        }
        proto = state.protocol
        if isinstance(proto, WorkflowState):
            out["turns"] = proto.turns
            out["context"] = proto.context_dict()
        return out

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
            sender=system_actor(principal),
            acted_by=(principal.kind, principal.key_id),
        )
        return await self.get(principal, thread_id)

    async def post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        audience: list[str] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Post a message as one of the caller's own agents or users who is a thread member.

        ``audience`` (ids of agents/users; None = everyone who reads the thread) limits who
        receives the message: nobody else reads it through any API; the sender always does. In
        a protocol thread the hub checks that it names participants only; in an ``open`` thread
        every id must be a member of the thread's team or network (InvalidAudienceError, 422
        ``invalid_audience``, otherwise). ``tool_calls`` (``[{name, args?, result?}]``, at most
        50) are stored as ``data["tool_calls"]`` in the form
        ``agent_network.protocol.tool_call`` builds; a workflow thread routes on them (a
        Handoff/Finish result). InvalidRequestError for a bad shape.

        An org key names the sender (``agent_id`` or ``user_id``); a user or agent token posts
        as its own user/agent (naming anyone else is refused). In a **network** thread the
        egress policy of the sender's org is applied first (services/policy.py) — its rules,
        then its defaults (the org's own stored secrets, common key formats) unless turned off;
        in a team thread only the defaults, and only if the org applies them there: a
        ``refuse`` rule raises EgressRefusedError and nothing is written; ``redact`` rules
        replace their matches and the redacted text is what is appended. Each refusal
        (``egress.refused``) and each redaction (``egress.redacted``) is audited with the rule
        names, secret names and spans, never the text.

        ``causation_id`` names the envelope of this thread the message answers. An agent's reply
        key ``reply:<agent_id>:<causation_id>`` is stored unscoped, the same key the in-process
        runner uses, so a remote runner's reply and an in-process one collide
        (``services/claims.py`` :func:`stored_key`); every other key is scoped to its sender.

        Returns the stored envelope rendered like the REST items (:func:`render_envelope`).

        Cost: the scope checks (thread visible, sender one of the caller's own, a member, a
        participant of a restricted thread), the outbound_to rule check and the egress policy
        are one query, and a pass is cached per ``(principal, thread, sender)`` as a
        :class:`PostGrant` (services/cache.py: tagged with ``access_epoch`` and
        ``config_epoch``, at most ``DECISION_TTL`` s old), so a repeated post needs no query
        before the append. Content checks, ``causation_id``, the rule's adapter, delegation,
        concurrency and rate checks, and the egress policy's matching run on every post;
        refusals are never cached.

        Raises InvalidRequestError (empty/too long content, not exactly one sender, a
        ``causation_id`` that is no envelope of this thread), NotFoundError
        (thread/sender outside scope), PermissionDeniedError (sender not a member, or not the
        token's own subject; RuleViolationError for the agent's rule), EgressRefusedError —
        each of these audited in the caller's own org as a refused ``envelope.message`` — and
        ThreadClosedError, RunawayBudgetError (audited by the hub); AuthenticationError (not
        audited here) when the credential was revoked after it authenticated (a WebSocket
        connection that outlived it).
        """
        for _attempt in range(ACCESS_RETRIES):
            # the access epoch before any check: if access is removed before the append
            # commits, the hub refuses it (AccessChangedError) and everything is checked again
            checked_at = self.ctx.access_epoch
            try:
                calls = _tool_calls(tool_calls)
                _check_audience_shape(audience)
                grant, text, redactions = await self._check_post(
                    principal,
                    thread_id,
                    content,
                    agent_id,
                    user_id,
                    idempotency_key,
                    causation_id,
                    tool_calls=calls,
                )
                if redactions is not None and redactions.tool_calls is not None:
                    calls = redactions.tool_calls  # the egress policy checked them too
                if audience is not None:
                    await self._check_open_audience(grant, thread_id, audience)
            except (
                NotFoundError,
                PermissionDeniedError,
                InvalidRequestError,
                EgressRefusedError,
            ) as err:
                await self._audit_refused_post(principal, thread_id, err)
                raise
            sender = grant.sender
            data: dict[str, Any] = {"content": text}
            if calls:
                data["tool_calls"] = calls
            try:
                env = await self.ctx.hub.append(
                    thread_id,
                    type=EV_MESSAGE,
                    data=data,
                    sender=sender,
                    audience=list(audience) if audience is not None else None,
                    idempotency_key=stored_key(
                        sender.kind, sender.id, idempotency_key, causation_id
                    )
                    if idempotency_key
                    else None,
                    causation_id=causation_id,
                    acted_by=(principal.kind, principal.key_id),
                    checked_at=checked_at,
                )
            except AccessChangedError:
                continue
            break
        else:
            raise ConflictError("access to this thread kept changing while posting; retry")
        if redactions is not None and redactions.redacted:
            async with write_transaction(self.ctx.engine) as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.redacted",
                    thread_id,
                    redactions.redacted,
                    org_id=sender.org_id,
                    data=_egress_data(sender, envelope_id=env.id, **redactions.audit_data()),
                )
        if env.sender_id == sender.id and env.sender_org_id == sender.org_id:
            return render_envelope(env, sender.name, grant.sender_org_name)
        async with self.ctx.engine.connect() as conn:  # not ours: an idempotent duplicate
            return (await render(conn, [env]))[0]

    async def _check_open_audience(
        self, grant: PostGrant, thread_id: str, audience: list[str]
    ) -> None:
        """In an open thread (no participant list: the hub cannot check it) every audience id
        must be a member of the thread's team or network; InvalidAudienceError otherwise."""
        if (await self.ctx.hub.state(thread_id)).participants:
            return  # a protocol thread: the hub checks the audience against its participants
        async with self.ctx.engine.connect() as conn:
            q = select(members.c.member_id).where(
                members.c.team_id == grant.team_id, members.c.member_id.in_(set(audience))
            )
            known = {r[0] for r in await conn.execute(q)}
        strangers = sorted(set(audience) - known)
        if strangers:
            raise InvalidAudienceError(
                "audience may only name members (agent or user ids) of this thread's team or "
                f"network; not members: {', '.join(strangers)}"
            )

    async def _check_post(
        self,
        principal: Principal,
        thread_id: str,
        content: str,
        agent_id: str | None,
        user_id: str | None,
        idempotency_key: str | None,
        causation_id: str | None = None,
        *,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> tuple[PostGrant, str, EgressResult | None]:
        """Everything ``post`` checks before the append: ``(grant, content to append, what the
        egress policy let through — content and ``tool_calls``, redacted — or None when no
        policy applies)``; raises the refusals ``post`` documents, in this order:
        sender naming and content, credential, thread visible, ``causation_id``, sender own /
        member / participant, the agent's rule (adapter, outbound_to, delegation depth,
        concurrent threads, rate), the egress policy."""
        agent_id, user_id = _sender_for(principal, agent_id, user_id)
        if not content.strip():
            raise InvalidRequestError("message content must not be empty")
        if len(content) > MAX_CONTENT:
            raise InvalidRequestError(f"message content is longer than {MAX_CONTENT} characters")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise InvalidRequestError(f"idempotency_key must be 1-{MAX_KEY} characters")
        ctx = self.ctx
        key = (principal, thread_id, agent_id, user_id)
        epoch = (ctx.access_epoch, ctx.config_epoch)  # taken before any read (services/cache.py)
        grant = self.grants.get(key, epoch)
        if grant is None and (loading := self._loading.get(key)) is not None:
            await loading.wait()  # another post is making this grant: one query, not a herd
            epoch = (ctx.access_epoch, ctx.config_epoch)
            grant = self.grants.get(key, epoch)
        if grant is not None:
            if causation_id is not None:
                async with ctx.engine.connect() as conn:
                    await _check_causation(conn, thread_id, causation_id)
            await self._check_adapter(grant, thread_id)
        else:
            done = anyio.Event()
            leader = self._loading.setdefault(key, done) is done
            try:
                grant = await self._make_grant(
                    principal, thread_id, agent_id, user_id, causation_id
                )
                self.grants.put(key, grant, epoch)  # every check a grant stands for has passed
            finally:
                if leader:
                    del self._loading[key]
                    done.set()
        if grant.agent is not None:
            await self.rules.check_dynamic(
                grant.agent, grant.rule, thread_id=thread_id, causation_id=causation_id
            )
        if grant.policy is None:
            return grant, content, None  # a team thread without the defaults: not filtered
        org_id = grant.sender.org_id
        index = None
        if grant.policy.defaults.org_secrets != "off":  # the org's own secrets (fingerprints)
            index = await org_secret_index(ctx, org_id)
        try:
            result = check_message(grant.policy, content, tool_calls, index)
        except EgressRefusedError as err:
            async with write_transaction(ctx.engine) as conn:
                await audit_egress(
                    conn,
                    principal,
                    "egress.refused",
                    thread_id,
                    err.rules,
                    org_id=org_id,
                    data=_egress_data(grant.sender, **matches_data(err.matches)),
                )
            raise
        return grant, result.content, result

    async def _make_grant(
        self,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
        causation_id: str | None,
    ) -> PostGrant:
        """Every check a :class:`PostGrant` stands for, on one connection, plus the post's own
        ``causation_id`` and adapter checks; raises the first refusal, exactly as reported."""
        async with self.ctx.engine.connect() as conn:
            grant = await self._grant(conn, principal, thread_id, agent_id, user_id)
            if grant is None:  # some check failed: find which, exactly as it is reported
                grant = await self._checked_grant(
                    conn, principal, thread_id, agent_id, user_id, causation_id
                )
            elif causation_id is not None:
                await _check_causation(conn, thread_id, causation_id)
            await self._check_adapter(grant, thread_id)
            if grant.agent is not None:
                await RuleService.check_outbound(conn, grant.agent, grant.rule, grant.team_id)
        return grant

    async def _check_adapter(self, grant: PostGrant, thread_id: str) -> None:
        """The agent rule's allowed_adapters against the thread's adapter now (in memory)."""
        if grant.agent is not None and grant.rule is not None:
            adapter = (await self.ctx.hub.state(thread_id)).adapter
            RuleService.check_adapter(grant.agent, grant.rule, adapter)

    @staticmethod
    async def _grant(
        conn: AsyncConnection,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
    ) -> PostGrant | None:
        """The scope checks of a post in one query (:func:`post_access`): the grant, or None
        when any of them fails."""
        kind: SenderKind = "agent" if agent_id is not None else "user"
        sender_id = agent_id if agent_id is not None else user_id
        assert sender_id is not None
        row = await post_access(conn, principal, thread_id, kind, sender_id)
        if row is None:
            return None
        return _grant_of(row, kind, row["egress"], row["egress_updated_at"])

    @staticmethod
    async def _checked_grant(
        conn: AsyncConnection,
        principal: Principal,
        thread_id: str,
        agent_id: str | None,
        user_id: str | None,
        causation_id: str | None,
    ) -> PostGrant:
        """The scope checks of a post one by one: raises the first refusal (NotFoundError,
        InvalidRequestError for ``causation_id``, PermissionDeniedError); the grant if all pass
        after all (access was granted since :meth:`_grant` looked). AuthenticationError first
        if the principal's credential was revoked (a WebSocket connection outliving it)."""
        await credential_in_force(conn, principal)
        thread, team = await visible_thread(conn, principal, thread_id)
        if causation_id is not None:
            await _check_causation(conn, thread_id, causation_id)
        kind: SenderKind
        if agent_id is not None:
            who = await own_agent(conn, principal, agent_id)
            kind = "agent"
        else:
            assert user_id is not None
            who = await own_user(conn, principal, user_id)
            kind = "user"
        member = (
            await conn.execute(
                select(members.c.role).where(
                    members.c.team_id == team["id"],
                    members.c.member_kind == kind,
                    members.c.member_id == who["id"],
                )
            )
        ).first()
        if member is None:
            raise PermissionDeniedError(
                f"{kind} {who['name']!r} is not a member of this thread's {team['kind']}"
            )
        if thread["visibility"] == "restricted" and not await _is_participant(
            conn, thread_id, kind, who["id"]
        ):
            raise PermissionDeniedError(
                f"{kind} {who['name']!r} is not a participant of this restricted thread"
            )
        org_name = (
            await conn.execute(select(orgs.c.name).where(orgs.c.id == who["org_id"]))
        ).scalar_one()
        policy = await conn.execute(
            select(org_policies.c.egress, org_policies.c.updated_at).where(
                org_policies.c.org_id == who["org_id"]
            )
        )
        egress, updated_at = policy.first() or (None, None)
        row = {
            "team_id": team["id"],
            "team_kind": team["kind"],
            "sender_id": who["id"],
            "sender_org_id": who["org_id"],
            "sender_name": who["name"],
            "org_name": org_name,
            "rule": who["rule"] if kind == "agent" else None,
        }
        return _grant_of(row, kind, egress, updated_at)

    async def _audit_refused_post(
        self,
        principal: Principal,
        thread_id: str,
        err: AgentNetworkError,
        action: str = "envelope.message",
    ) -> None:
        """Audit a refused post in the caller's own org (principal = the credential); never the
        message text."""
        async with write_transaction(self.ctx.engine) as conn:
            await record(
                conn,
                principal,
                action,
                "thread",
                thread_id[:40],  # the id as given (a guess may be longer than any real one)
                outcome="refused",
                reason=f"{err.code}: {err.message}",
            )

    async def envelopes(
        self,
        principal: Principal,
        thread_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait: float = 0.0,
        messages_only: bool = True,
    ) -> dict[str, Any]:
        """Envelopes with ``seq > after`` (at most ``limit``, 1-1000), rendered with sender names.

        Only envelopes whose audience admits the caller are returned whole
        (:func:`~agent_network.services.scope.audience_admits`: no audience, the caller named in
        it, or sent by the caller; an org key also for its own org's senders and the agents and
        users it acts for). With ``messages_only`` (``GET .../messages``) the others are left
        out; otherwise (``GET .../envelopes``, the chain view) each of them is a stub
        (:func:`render_stub`: seq, hash, prev_hash, nothing else), so every reader gets the
        whole chain. ``next_after`` moves past the envelopes left out, so a reader never loops
        on a hidden one. With ``wait`` > 0 (seconds, at most 60) and nothing to return yet,
        waits until something arrives (a message for ``messages_only``) or ``wait`` runs out.
        Returns ``{"items": [...], "next_after": seq}``; pass ``next_after`` back as ``after``.
        InvalidRequestError for a bad ``limit``/``after``/``wait``, NotFoundError outside scope —
        also when the caller lost access while the request waited (scope and credential are
        checked again whenever access was removed anywhere meanwhile), AuthenticationError
        when its credential was revoked meanwhile.
        """
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000")
        if after < 0:
            raise InvalidRequestError("after must be >= 0")
        if not 0 <= wait <= 60:
            raise InvalidRequestError("wait must be between 0 and 60 seconds")
        checked_at = self.ctx.access_epoch  # before the scope check: see the end
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        hub = self.ctx.hub
        deadline = anyio.current_time() + wait
        acts_for: frozenset[str] | None = None
        cursor = after
        shown: list[Envelope] = []
        hidden: set[int] = set()  # seqs of ``shown`` answered as stubs
        while True:
            envs = await hub.read(thread_id, after=cursor, limit=limit)
            if not envs:
                left = deadline - anyio.current_time()
                if left > 0 and await hub.wait_for(thread_id, cursor, left):
                    continue
                break
            cursor = envs[-1].seq
            if acts_for is None and _needs_acts_for(principal, envs):
                async with self.ctx.engine.connect() as conn:
                    acts_for = await org_member_ids(conn, principal)
            admitted = [e for e in envs if audience_admits(principal, e, acts_for or frozenset())]
            if messages_only:
                shown = [e for e in admitted if e.type == EV_MESSAGE]
            else:  # the chain view: what the audience hides is a stub
                shown = envs
                hidden = {e.seq for e in envs} - {e.seq for e in admitted}
            if shown or len(admitted) == len(envs) or wait <= 0:
                break  # (nothing hidden by an audience: answered as before audiences)
            if anyio.current_time() >= deadline:
                break
        async with self.ctx.engine.connect() as conn:
            if self.ctx.access_epoch != checked_at:
                # access was removed somewhere while this request waited (or read): answer
                # only if the caller still has it (a revoked visa, membership or credential
                # ends a pending long-poll at once)
                await credential_in_force(conn, principal)
                await visible_thread(conn, principal, thread_id)
            whole = iter(await render(conn, [e for e in shown if e.seq not in hidden]))
            items = [render_stub(e) if e.seq in hidden else next(whole) for e in shown]
        return {"items": items, "next_after": cursor}

    # ------------------------------------------------------------------ protocol lifecycle

    async def ack(
        self,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """Accept an invitation to a protocol thread as one of the caller's own agents or users
        (exactly one; a user/agent token acts as itself): a ``thread.ack`` envelope. The last
        pending ack makes the thread ``active``. Returns the thread as :meth:`get`.

        Raises NotFoundError (thread or sender outside scope), PermissionDeniedError (not the
        token's own subject, not a member), InvalidRequestError (not exactly one sender),
        ProtocolViolationError (409: no pending invitation for this sender), ThreadClosedError.
        """
        await self._lifecycle(principal, thread_id, EV_THREAD_ACK, {}, agent_id, user_id)
        return await self.get(principal, thread_id)

    async def reject(
        self,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Decline an invitation (a ``thread.reject`` envelope with the optional ``reason``, at
        most 200 characters): the thread moves to ``closing`` with ``invite_rejected`` and then
        closes. Same senders and errors as :meth:`ack`."""
        data = {"reason": reason} if reason is not None else {}
        await self._lifecycle(principal, thread_id, EV_THREAD_REJECT, data, agent_id, user_id)
        return await self.get(principal, thread_id)

    async def close(
        self, principal: Principal, thread_id: str, *, reason: str | None = None
    ) -> dict[str, Any]:
        """Close a thread; ``reason`` (at most 200 characters, default ``closed``) becomes its
        ``close_reason``. Returns the thread as :meth:`get`.

        A protocol thread: a participant (its user/agent token) or an org key of an org that
        has a participant writes ``thread.closing`` (sender: the participant, or the org as
        ``system``); the hub's sweeper then writes ``thread.closed``. An open thread: the org
        that created it or hosts its team/network (an org key, or a user token with role admin
        there) writes ``thread.closed`` at once. Raises NotFoundError outside scope,
        PermissionDeniedError (not allowed to close it), ProtocolViolationError (409: a token
        whose subject is not a participant), ThreadClosedError (409: already closing or
        closed), InvalidRequestError (bad reason).
        """
        data = {"reason": reason} if reason is not None else {}
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
            org_part = await self._org_participants(conn, principal, thread_id)
            who = await standing(conn, principal, team)
        state = await self.ctx.hub.state(thread_id)
        acted_by = (principal.kind, principal.key_id)
        if not state.participants:
            if principal.org_id not in (row["org_id"], team["org_id"]):
                raise PermissionDeniedError(
                    "closing an open thread is for the org that created it or hosts its "
                    f"{team['kind']}"
                )
            require(who, "admin", "closing open threads of", team)
            await self.ctx.hub.append(
                thread_id,
                type=EV_THREAD_CLOSED,
                data=data,
                sender=system_actor(principal),
                acted_by=acted_by,
            )
        elif principal.is_member_scoped:
            await self._lifecycle(principal, thread_id, EV_THREAD_CLOSING, data, None, None)
        else:
            if not org_part:
                raise PermissionDeniedError(
                    "only a participant of this thread, or an org key of an org with a "
                    "participant, may close it"
                )
            await self.ctx.hub.append(
                thread_id,
                type=EV_THREAD_CLOSING,
                data=data,
                sender=system_actor(principal),
                acted_by=acted_by,
            )
        async with write_transaction(self.ctx.engine) as conn:
            await record(conn, principal, "thread.close", "thread", thread_id, data=data or None)
        return await self.get(principal, thread_id)

    async def set_context(
        self,
        principal: Principal,
        thread_id: str,
        values: Mapping[str, Any],
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """Set workflow context keys (a ``context.set`` envelope, data ``{"values": {key: JSON
        value}}``); the turn does not advance. The sender is one of the caller's own
        participants: a token's own subject, or for an org key ``agent_id``/``user_id`` (may be
        left out when exactly one of the org's agents/users takes part). Returns the thread as
        :meth:`get` (its ``context`` updated).

        Raises InvalidRequestError (empty values, keys that are not non-empty strings, more
        than 64 000 characters of JSON, no sender named when the org has several
        participants), ProtocolViolationError (409: not a workflow thread / not a participant),
        NotFoundError, PermissionDeniedError, ThreadClosedError as :meth:`ack`.
        """
        if not isinstance(values, Mapping) or not values:
            raise InvalidRequestError("values must be a non-empty object {key: JSON value}")
        try:
            size = len(json.dumps(dict(values), allow_nan=False))
        except (TypeError, ValueError):
            raise InvalidRequestError("context values must be JSON") from None
        if size > MAX_TOOL_CALLS_JSON:
            raise InvalidRequestError(f"context values exceed {MAX_TOOL_CALLS_JSON} characters")
        if not principal.is_member_scoped and agent_id is None and user_id is None:
            async with self.ctx.engine.connect() as conn:
                await visible_thread(conn, principal, thread_id)
                mine = await self._org_participants(conn, principal, thread_id)
            if len(mine) != 1:
                raise InvalidRequestError(
                    "name the sender with agent_id or user_id (your org has "
                    f"{len(mine)} participants in this thread)"
                )
            kind, pid = mine[0]
            agent_id, user_id = (pid, None) if kind == "agent" else (None, pid)
        await self._lifecycle(
            principal, thread_id, EV_CONTEXT_SET, {"values": dict(values)}, agent_id, user_id
        )
        return await self.get(principal, thread_id)

    async def tools(
        self, principal: Principal, thread_id: str, *, agent_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The workflow tools (``ToolSpec.to_data()``: name, description, speakers, handoff,
        finish) the caller's agent ``agent_id`` gets in this thread now (an agent token: its
        own agent, ``agent_id`` optional); ``[]`` outside workflow threads or while the thread
        is not active. Raises NotFoundError (thread/agent outside scope),
        PermissionDeniedError (not the token's own agent, not a member), InvalidRequestError
        (an org key without ``agent_id``) — the thread is checked first: out of scope is 404."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)  # scope first: 404 before 403/422
        if principal.kind == "user":
            raise PermissionDeniedError("workflow tools are for agents; use an agent token")
        if principal.kind == "org" and agent_id is None:
            raise InvalidRequestError("agent_id: name the agent whose tools you want")
        agent, _ = _sender_for(principal, agent_id, None)
        assert agent is not None
        async with self.ctx.engine.connect() as conn:
            grant = await self._checked_grant(conn, principal, thread_id, agent, None, None)
        state = await self.ctx.hub.state(thread_id)
        return [t.to_data() for t in tools_for(state, grant.sender)]

    async def _lifecycle(
        self,
        principal: Principal,
        thread_id: str,
        kind: str,
        data: dict[str, Any],
        agent_id: str | None,
        user_id: str | None,
    ) -> Envelope:
        """Append a lifecycle envelope of ``kind`` as one of the caller's own agents/users
        after the scope checks of a post (refusals before the hub are audited like a post's)."""
        try:
            agent_id, user_id = _sender_for(principal, agent_id, user_id)
            async with self.ctx.engine.connect() as conn:
                grant = await self._checked_grant(
                    conn, principal, thread_id, agent_id, user_id, None
                )
        except (NotFoundError, PermissionDeniedError, InvalidRequestError) as err:
            await self._audit_refused_post(principal, thread_id, err, f"envelope.{kind}")
            raise
        if kind == EV_CONTEXT_SET and not (await self.ctx.hub.state(thread_id)).participants:
            # (after the scope checks: a thread outside scope must look missing)
            raise ProtocolViolationError("context is for workflow threads; this one is open")
        return await self.ctx.hub.append(
            thread_id,
            type=kind,
            data=data,
            sender=grant.sender,
            acted_by=(principal.kind, principal.key_id),
        )

    @staticmethod
    async def _org_participants(
        conn: AsyncConnection, principal: Principal, thread_id: str
    ) -> list[tuple[str, str]]:
        """``(kind, id)`` of the participants of ``thread_id`` from the caller's org."""
        if principal.org_id is None:
            return []
        q = (
            select(thread_participants.c.member_kind, thread_participants.c.member_id)
            .where(
                thread_participants.c.thread_id == thread_id,
                thread_participants.c.org_id == principal.org_id,
            )
            .order_by(thread_participants.c.created_at)
        )
        return [(str(k), str(m)) for k, m in await conn.execute(q)]

    async def verify(self, principal: Principal, thread_id: str) -> VerifyReport:
        """Recompute the thread's hash chain (any member org may verify shared history)."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        return await self.ctx.hub.verify(thread_id)


def _needs_acts_for(principal: Principal, envs: Iterable[Envelope]) -> bool:
    """Whether an org key needs the ids of its agents/users to judge these envelopes' audiences
    (some envelope has an audience, from another org, not naming the org itself)."""
    if principal.kind != "org" or principal.is_member_scoped:
        return False
    return any(
        e.audience is not None
        and e.sender_org_id != principal.org_id
        and principal.org_id not in e.audience
        for e in envs
    )


async def _check_causation(conn: AsyncConnection, thread_id: str, envelope_id: str) -> None:
    """InvalidRequestError unless ``envelope_id`` is an envelope of ``thread_id``."""
    q = select(envelopes.c.seq).where(
        envelopes.c.thread_id == thread_id, envelopes.c.id == envelope_id
    )
    if (await conn.execute(q)).first() is None:
        raise InvalidRequestError(
            f"causation_id {envelope_id!r} is not an envelope of thread {thread_id!r}"
        )


async def _is_participant(
    conn: AsyncConnection, thread_id: str, member_kind: str, member_id: str
) -> bool:
    q = select(thread_participants.c.member_id).where(
        thread_participants.c.thread_id == thread_id,
        thread_participants.c.member_kind == member_kind,
        thread_participants.c.member_id == member_id,
    )
    return (await conn.execute(q)).first() is not None


@dataclass(frozen=True, slots=True)
class PostGrant:
    """A positive post decision, cached per ``(principal, thread, sender)`` (services/cache.py).

    ``sender`` is the actor the message is sent as and ``sender_org_name`` its org's name (for
    rendering); ``team_id`` the thread's team or network. For an agent sender, ``agent`` holds
    its ``id``, ``org_id``, ``name`` and stored ``rule`` and ``rule`` the parsed rule (None: no
    rule), whose adapter and outbound_to checks passed when the grant was made. ``policy`` is
    what of the sender org's egress policy applies in the thread (all of it in a network
    thread; in a team thread its defaults if it applies them there, else None).
    """

    team_id: str
    sender: Actor
    sender_org_name: str
    agent: AgentRow | None
    rule: Rule | None
    policy: EgressPolicy | None


def _grant_of(row: Mapping[Any, Any], kind: SenderKind, egress: Any, updated_at: Any) -> PostGrant:
    sender = Actor(kind, row["sender_id"], row["sender_org_id"], row["sender_name"])
    agent = None
    if kind == "agent":
        agent = {
            "id": row["sender_id"],
            "org_id": row["sender_org_id"],
            "name": row["sender_name"],
            "rule": row["rule"],
        }
    return PostGrant(
        team_id=row["team_id"],
        sender=sender,
        sender_org_name=row["org_name"],
        agent=agent,
        rule=parse_rule(row["rule"]) if agent is not None else None,
        policy=policy_for_thread(
            policy_from_row(egress, updated_at), row["team_kind"] == "network"
        ),
    )


def _sender_for(
    principal: Principal, agent_id: str | None, user_id: str | None
) -> tuple[str | None, str | None]:
    """The ``(agent_id, user_id)`` a post is sent as; tokens may only send as themselves."""
    if principal.is_member_scoped:
        named = agent_id if principal.kind == "agent" else user_id
        other = user_id if principal.kind == "agent" else agent_id
        if other is not None or (named is not None and named != principal.subject_id):
            raise PermissionDeniedError(
                f"{principal.credential_name} posts only as its own {principal.kind}"
            )
        subject = principal.subject_id
        return (subject, None) if principal.kind == "agent" else (None, subject)
    if (agent_id is None) == (user_id is None):
        raise InvalidRequestError("give exactly one of agent_id or user_id as the sender")
    return agent_id, user_id


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
    """Insert participant rows (an existing participant is left as it is)."""
    for p in people:
        exists_q = select(thread_participants.c.member_id).where(
            thread_participants.c.thread_id == thread_id,
            thread_participants.c.member_kind == p["member_kind"],
            thread_participants.c.member_id == p["member_id"],
        )
        if (await conn.execute(exists_q)).first() is None:
            await conn.execute(
                thread_participants.insert().values(
                    thread_id=thread_id,
                    member_kind=p["member_kind"],
                    member_id=p["member_id"],
                    org_id=p["org_id"],
                    created_at=now_iso(),
                )
            )


MAX_AUDIENCE = 200
MAX_TOOL_CALLS = 50
MAX_TOOL_CALLS_JSON = 64_000  # characters of data["tool_calls"] as JSON


def _check_audience_shape(audience: list[str] | None) -> None:
    """InvalidAudienceError unless ``audience`` is None or 1-200 non-empty id strings."""
    if audience is None:
        return
    if (
        not isinstance(audience, list)
        or not 0 < len(audience) <= MAX_AUDIENCE
        or not all(isinstance(a, str) and 0 < len(a) <= 40 for a in audience)
    ):
        raise InvalidAudienceError(
            f"audience must list 1-{MAX_AUDIENCE} participant ids (omit it to address everyone)"
        )


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``calls`` in the stored form ``{"name", "args", "result"}`` (see
    ``agent_network.protocol.tool_call``); InvalidRequestError for a bad shape, more than 50
    calls, or more than 64 000 characters of JSON."""
    if not calls:
        return []
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        raise InvalidRequestError(f"tool_calls must be a list of at most {MAX_TOOL_CALLS} calls")
    out: list[dict[str, Any]] = []
    for call in calls:
        if not isinstance(call, Mapping):
            raise InvalidRequestError(
                f"each tool call is an object {{name, args, result}}: {call!r}"
            )
        unknown = sorted(set(call) - {"name", "args", "result"})
        if unknown:
            raise InvalidRequestError(f"tool_calls: unknown fields {unknown}")
        args = call.get("args")
        if args is not None and not isinstance(args, Mapping):
            raise InvalidRequestError("tool_calls: args must be an object")
        out.append(
            {"name": call.get("name"), "args": dict(args or {}), "result": call.get("result")}
        )
    parse_tool_calls({"tool_calls": out})  # names, at most one Handoff/Finish, their shapes
    try:
        size = len(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidRequestError(
            "tool_calls must be JSON (objects, lists, strings, numbers)"
        ) from None
    if size > MAX_TOOL_CALLS_JSON:
        raise InvalidRequestError(f"tool_calls exceed {MAX_TOOL_CALLS_JSON} characters of JSON")
    return out


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


def _egress_data(sender: Actor, **extra: Any) -> dict[str, Any]:
    return {"sender": {"kind": sender.kind, "id": sender.id}, **extra}


def _check_budget(budget: int) -> None:
    if not 0 <= budget <= MAX_BUDGET:
        raise InvalidRequestError(f"agent_budget must be between 0 and {MAX_BUDGET}")


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
