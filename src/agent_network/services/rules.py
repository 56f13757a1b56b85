"""Agent rules: storage, and the checks every path that lets an agent speak goes through.

Rules name principals by id (see :mod:`agent_network.model.rule`): ``inbound_from`` and
``outbound_to`` hold agent, user and org ids, ``org:self`` and ``*``, and every check compares
the sender's id and org id with them, never a name. :meth:`RuleService.put` (the only writer of
rules) accepts names too and resolves each one to an id at write time among the principals the
writing org can see (:func:`visible_parties`: its own agents, users and org first; then those of
other orgs it shares a network with), refusing one that names nobody or several with
:class:`UnresolvedPrincipalError` (422) naming the entry; nothing is written then. Reading a
rule shows the ids and, in ``principals``, who each id is.

``RuleService.check_send`` is called by the thread service (an agent posting over REST, with an
org key or its agent token) and by the runner (before the model call, so no call is wasted);
``inbound_allows`` and ``inbox_cap`` are applied by the runner when it dispatches triggers. A
refusal is a :class:`RuleViolationError` (403) naming the rule, and is audited by the caller.

``check_send`` is also available in its parts, for the thread service's cached post path:
:meth:`RuleService.check_adapter` and :meth:`RuleService.check_outbound` (which depend only on
the rule, the thread's adapter and the team's members, so a pass may be cached until
``config_epoch`` or ``access_epoch`` changes) and :meth:`RuleService.check_dynamic` (delegation
depth, concurrent threads and rate: checked on every post, never cached).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import InvalidRequestError, PermissionDeniedError
from agent_network.model.ids import now_iso
from agent_network.model.rule import (
    EntryUnresolved,
    Party,
    PartyKind,
    Rule,
    id_kind,
    matches,
    resolve_entries,
)
from agent_network.protocol.events import EV_MESSAGE
from agent_network.services.base import ServiceContext, record
from agent_network.services.principal import Principal
from agent_network.services.ratelimit import RateLimiter, rate_limiter
from agent_network.services.scope import own_agent, require_org_key, team_visible
from agent_network.services.teams import member_list
from agent_network.store.engine import write_transaction
from agent_network.store.tables import agents, envelopes, members, orgs, teams, users, visas

AgentRow = Mapping[Any, Any]  # an agents row (RowMapping) or a dict with id, org_id, name, rule


class RuleViolationError(PermissionDeniedError):
    """The agent's rule forbids this; the message names the rule."""

    code = "rule_violation"


class UnresolvedPrincipalError(InvalidRequestError):
    """A rule entry names no principal the org can see, or several (422): ``details`` holds
    ``field``, ``entry``, ``reason`` and ``candidates`` (``[{"id", "kind", "name", "org_id",
    "org_name"}]``, the principals an ambiguous name could mean)."""

    code = "unresolved_principal"


def parse_rule(raw: Any) -> Rule | None:
    """The stored rule of an agent row (``None``: no rule, nothing restricted)."""
    if raw is None:
        return None
    try:
        return Rule.model_validate(raw)
    except ValidationError:
        return Rule(inbound_from=[], outbound_to=[])  # unreadable rule: deny rather than allow


async def visible_parties(conn: AsyncConnection, org_id: str) -> tuple[list[Party], list[Party]]:
    """The principals a rule of ``org_id``'s agents may name, as ``(own, shared)``.

    ``own``: the org itself and its live agents and users. ``shared``: what the org sees of
    other orgs through the teams and networks visible to it (``scope.team_visible``): the live
    agents and users that are members of them, the orgs of those members, the host orgs of
    those networks, and the orgs holding a live visa to a network ``org_id`` hosts. Nothing
    else: an org that merely exists, or shares nothing with ``org_id``, is never a candidate.
    """
    own_name = (await conn.execute(select(orgs.c.name).where(orgs.c.id == org_id))).scalar()
    own = [Party("org", org_id, own_name or "", org_id, own_name or "")]
    kinds: tuple[tuple[PartyKind, Any], ...] = (("agent", agents), ("user", users))
    for kind, table in kinds:
        q = select(table.c.id, table.c.name).where(
            table.c.org_id == org_id, table.c.deleted_at.is_(None)
        )
        own += [Party(kind, r[0], r[1], org_id, own_name or "") for r in await conn.execute(q)]
    visible = list(
        await conn.execute(select(teams.c.id, teams.c.org_id).where(team_visible(org_id)))
    )
    if not visible:
        return own, []
    team_ids = [r[0] for r in visible]
    found: list[tuple[PartyKind, str, str, str]] = []  # (kind, id, name, org id)
    for kind, table in kinds:
        q = (
            select(table.c.id, table.c.name, table.c.org_id)
            .join(members, and_(members.c.member_kind == kind, members.c.member_id == table.c.id))
            .where(
                members.c.team_id.in_(team_ids),
                table.c.org_id != org_id,
                table.c.deleted_at.is_(None),
            )
        )
        found += [(kind, r[0], r[1], r[2]) for r in await conn.execute(q)]
    q_visas = (
        select(visas.c.org_id)
        .join(teams, teams.c.id == visas.c.network_id)
        .where(teams.c.org_id == org_id, teams.c.deleted_at.is_(None), visas.c.revoked_at.is_(None))
    )
    other_orgs = {r[1] for r in visible} | {f[3] for f in found}
    other_orgs |= {r[0] for r in await conn.execute(q_visas)}
    other_orgs.discard(org_id)
    q_orgs = select(orgs.c.id, orgs.c.name).where(orgs.c.id.in_(sorted(other_orgs)))
    org_names = {r[0]: r[1] for r in await conn.execute(q_orgs)} if other_orgs else {}
    shared = {
        pid: Party(kind, pid, name, oid, org_names.get(oid, "")) for kind, pid, name, oid in found
    }
    shared.update({oid: Party("org", oid, name, oid, name) for oid, name in org_names.items()})
    return own, sorted(shared.values(), key=lambda p: p.id)


def rule_view(rule: Rule, own: list[Party], shared: list[Party]) -> dict[str, Any]:
    """The API form of a stored rule: its fields, plus ``principals``: ``{id: {"kind",
    "name", "org_id", "org_name"}}`` for every id in ``inbound_from`` and ``outbound_to``
    (``name``, ``org_id`` and ``org_name`` None for an id the org no longer sees)."""
    known = {p.id: p for p in (*own, *shared)}
    labels: dict[str, dict[str, Any]] = {}
    for entry in (*rule.inbound_from, *rule.outbound_to):
        kind = id_kind(entry)
        if kind is None or entry in labels:
            continue
        party = known.get(entry)
        labels[entry] = (
            party.label()
            if party is not None
            else {"kind": kind, "name": None, "org_id": None, "org_name": None}
        )
    return {**rule.model_dump(), "principals": labels}


def resolve_rule(rule: Rule, own: list[Party], shared: list[Party]) -> Rule:
    """``rule`` with every ``inbound_from`` / ``outbound_to`` entry in its stored form (ids,
    ``org:self``, ``*``; see :func:`agent_network.model.rule.resolve_entry`).
    UnresolvedPrincipalError naming the field and the entry it cannot resolve."""
    fields: dict[str, list[str]] = {}
    for field in ("inbound_from", "outbound_to"):
        try:
            fields[field] = resolve_entries(getattr(rule, field), own, shared)
        except EntryUnresolved as err:
            raise UnresolvedPrincipalError(
                f"{field} entry {err.entry!r}: {err.reason}",
                details={
                    "field": field,
                    "entry": err.entry,
                    "reason": err.reason,
                    "candidates": [{"id": p.id, **p.label()} for p in err.candidates],
                },
            ) from None
    return rule.model_copy(update=fields)


class RuleService:
    """Get/set an agent's rule, and enforce it. Rate windows are shared by the server processes
    on PostgreSQL and kept in this process on SQLite (:func:`rate_limiter`)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._rates: dict[float, RateLimiter] = {}

    async def get(self, principal: Principal, agent_id: str) -> dict[str, Any]:
        """The agent's rule (all defaults when none is set) as :func:`rule_view` shows it:
        the stored fields plus ``principals`` naming each id. NotFoundError for an agent
        outside the caller's org."""
        async with self.ctx.engine.connect() as conn:
            agent = await own_agent(conn, principal, agent_id)
            rule = parse_rule(agent["rule"]) or Rule()
            own, shared = await visible_parties(conn, agent["org_id"])
        return rule_view(rule, own, shared)

    async def put(self, principal: Principal, agent_id: str, rule: Rule) -> dict[str, Any]:
        """Replace the agent's rule (org key only); audited. Returns it as :meth:`get` does.

        Names in ``inbound_from`` / ``outbound_to`` are resolved to ids among the principals
        the org can see (:func:`resolve_rule`, :func:`visible_parties`) and only ids are
        stored. Raises UnresolvedPrincipalError (422) naming the field and the entry when one
        names nobody, several principals, an id the org cannot see, or is a pattern (nothing
        is written then); PermissionDeniedError for a token; NotFoundError for an agent
        outside the caller's org."""
        require_org_key(principal, "setting an agent's rule")
        async with write_transaction(self.ctx.engine) as conn:
            agent = await own_agent(conn, principal, agent_id)
            own, shared = await visible_parties(conn, agent["org_id"])
            stored = resolve_rule(rule, own, shared)
            await conn.execute(
                update(agents)
                .where(agents.c.id == agent_id)
                .values(rule=stored.model_dump(), updated_at=now_iso())
            )
            await record(
                conn, principal, "agent.rule_set", "agent", agent_id, data=stored.model_dump()
            )
        self.ctx.config_epoch += 1  # cached post decisions hold the old rule
        return rule_view(stored, own, shared)

    # ------------------------------------------------------------ enforcement

    @staticmethod
    def inbound_allows(
        rule: Rule | None, sender_id: str, sender_org_id: str, owner_org_id: str
    ) -> bool:
        """Whether a message from the sender ``sender_id`` of org ``sender_org_id`` may trigger
        an agent of org ``owner_org_id`` with this rule (ids only; None: no rule, yes)."""
        return rule is None or matches(rule.inbound_from, sender_id, sender_org_id, owner_org_id)

    async def check_send(
        self,
        conn: AsyncConnection,
        agent: RowMapping,
        *,
        thread_id: str,
        team_id: str,
        adapter: str,
        causation_id: str | None = None,
        consume_rate: bool = True,
    ) -> None:
        """Raise RuleViolationError when ``agent`` may not post into this thread now.

        Checks, in order: allowed adapters, outbound_to (every other member of the thread's team
        or network), delegation depth (with ``causation_id``), max concurrent threads, rate.
        ``consume_rate=False`` checks everything but the rate (a pre-check before a model call);
        :meth:`take_rate` then counts the message when it is actually sent.
        """
        rule = parse_rule(agent["rule"])
        if rule is None:
            return
        self.check_adapter(agent, rule, adapter)
        await self.check_outbound(conn, agent, rule, team_id)
        await self.check_dynamic(
            agent,
            rule,
            thread_id=thread_id,
            causation_id=causation_id,
            consume_rate=consume_rate,
            conn=conn,
        )

    @staticmethod
    def check_adapter(agent: AgentRow, rule: Rule | None, adapter: str) -> None:
        """The first check of :meth:`check_send`: ``adapter`` is in the rule's
        ``allowed_adapters`` (pure); RuleViolationError otherwise."""
        if (
            rule is not None
            and rule.allowed_adapters is not None
            and adapter not in rule.allowed_adapters
        ):
            raise RuleViolationError(
                f"rule of {agent['name']!r}: adapter {adapter!r} is not in allowed_adapters"
            )

    @staticmethod
    async def check_outbound(
        conn: AsyncConnection, agent: AgentRow, rule: Rule | None, team_id: str
    ) -> None:
        """The second check of :meth:`check_send`: every other member of ``team_id`` matches
        the rule's ``outbound_to`` by id and org id (``agent`` needs ``id``, ``org_id`` and
        ``name``; one query per member kind unless it is ``["*"]``).
        RuleViolationError naming the first member it does not admit."""
        if rule is None or rule.outbound_to == ["*"]:
            return
        for m in await member_list(conn, team_id):
            if m["id"] != agent["id"] and not matches(
                rule.outbound_to, m["id"], m["org_id"], agent["org_id"]
            ):
                raise RuleViolationError(
                    f"rule of {agent['name']!r}: outbound_to does not admit {m['name']!r} "
                    f"({m['org_name']}), a participant of this thread"
                )

    async def check_dynamic(
        self,
        agent: AgentRow,
        rule: Rule | None,
        *,
        thread_id: str,
        causation_id: str | None = None,
        consume_rate: bool = True,
        conn: AsyncConnection | None = None,
    ) -> None:
        """The checks of :meth:`check_send` that depend on what happened since, never cached:
        delegation depth (with ``causation_id``; reads the thread), max concurrent threads (one
        query, on ``conn`` or a connection of its own when None), then the rate (counted unless
        ``consume_rate`` is False). RuleViolationError naming the rule."""
        if rule is None:
            return
        name = agent["name"]
        if rule.delegation_depth is not None and causation_id is not None:
            depth = await self._reply_depth(thread_id, causation_id)
            if depth > rule.delegation_depth:
                raise RuleViolationError(
                    f"rule of {name!r}: this reply would be {depth} agent replies deep "
                    f"(delegation_depth {rule.delegation_depth})"
                )
        if rule.max_concurrent_threads is not None:
            if conn is None:
                async with self.ctx.engine.connect() as own:
                    await self._check_concurrency(
                        own, agent, thread_id, rule.max_concurrent_threads
                    )
            else:
                await self._check_concurrency(conn, agent, thread_id, rule.max_concurrent_threads)
        if consume_rate:
            await self.take_rate(agent, rule)

    async def take_rate(self, agent: AgentRow, rule: Rule | None = None) -> None:
        """Count one message against the agent's rate; RuleViolationError when over it.

        ``rule`` is the agent's parsed rule when the caller has it (default: parsed from
        ``agent["rule"]``). The agent's window is keyed by its id, per ``per_seconds``: one
        window for every process on PostgreSQL."""
        if rule is None:
            rule = parse_rule(agent["rule"])
        if rule is None or rule.rate is None:
            return
        per = rule.rate.per_seconds
        limiter = self._rates.get(per)
        if limiter is None:
            limiter = rate_limiter(self.ctx.engine, f"rate:{per:g}", rule.rate.messages, per)
            self._rates[per] = limiter
        wait = await limiter.wait_for(agent["id"], limit=rule.rate.messages)
        if wait > 0:
            raise RuleViolationError(
                f"rule of {agent['name']!r}: rate of {rule.rate.messages} messages per "
                f"{rule.rate.per_seconds:g} s reached; next message possible in {wait:.1f} s"
            )

    async def _reply_depth(self, thread_id: str, causation_id: str) -> int:
        """1 + the number of consecutive agent messages up the causation chain."""
        by_id = {e.id: e for e in await self.ctx.hub.read(thread_id)}
        depth, current = 1, by_id.get(causation_id)
        while current is not None and current.sender_kind == "agent" and depth <= 1000:
            depth += 1
            current = by_id.get(current.causation_id or "")
        return depth

    async def _check_concurrency(
        self, conn: AsyncConnection, agent: AgentRow, thread_id: str, cap: int
    ) -> None:
        q = (
            select(envelopes.c.thread_id)
            .distinct()
            .where(envelopes.c.sender_id == agent["id"], envelopes.c.type == EV_MESSAGE)
        )
        posted = {r[0] for r in await conn.execute(q)}
        if thread_id in posted:
            return
        open_threads = [t for t in posted if (await self.ctx.hub.state(t)).status != "closed"]
        if len(open_threads) >= cap:
            raise RuleViolationError(
                f"rule of {agent['name']!r}: already active in {len(open_threads)} open threads "
                f"(max_concurrent_threads {cap})"
            )
