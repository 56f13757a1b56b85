"""rules name principals by id: agents.rule entries converted from names to ids

Before, ``inbound_from`` / ``outbound_to`` entries were case-insensitive globs matched against
display names and ``org:<org name>``; names are chosen by their owners and need not be unique
(a second org calling itself "Acme" passed ``org:Acme``). Rules now hold ids only (agent, user
and org ids, ``org:self``, ``*``), and the checks compare ids.

Each entry of each live agent's rule is converted as the old matching read it:

- ``*`` stays;
- a pattern (any other entry holding ``*``, ``?``, ``[`` or ``]``) cannot be converted;
- ``org:<name>`` names the org called ``<name>`` (case-insensitively), any other entry the
  agent or user called that;
- a name is looked up among the principals of the rule owner's own org first (the org, its
  live agents and users); only when none there is called that, among what the owner shares
  with other orgs (the live agents and users that are members of a team or network visible to
  it, their orgs, the host orgs of those networks, the orgs with a live visa to a network it
  hosts). Exactly one match: its id. None, or several in the same tier: not convertible.

If any entry of any rule cannot be converted, the migration converts nothing and raises
:class:`RuleMigrationError` listing every such entry (agent id and name, field, entry, why);
the database stays at revision 0008. Fix those rules with the previous version (``PUT
/agents/{id}/rule`` with names that name exactly one principal, or without the entry), then
upgrade again. Rules of deleted agents (which never act again) and rules that are not a JSON
object with lists of strings (read as "deny everything" by the rule service) are left as they
are. Downgrading writes names back (``<name>``, ``org:<name>``; ``org:self`` as the owner's
``org:<name>``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FIELDS = ("inbound_from", "outbound_to")
_PATTERN_CHARS = frozenset("*?[]")

_agents = sa.table(
    "agents",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("name", sa.String),
    sa.column("rule", sa.JSON),
    sa.column("deleted_at", sa.String),
)
_users = sa.table(
    "users",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("name", sa.String),
    sa.column("deleted_at", sa.String),
)
_orgs = sa.table("orgs", sa.column("id", sa.String), sa.column("name", sa.String))
_teams = sa.table(
    "teams",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("deleted_at", sa.String),
)
_visas = sa.table(
    "visas",
    sa.column("network_id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("revoked_at", sa.String),
)
_members = sa.table(
    "members",
    sa.column("team_id", sa.String),
    sa.column("member_kind", sa.String),
    sa.column("member_id", sa.String),
)

Party = tuple[str, str, str]  # (kind: agent | user | org, id, name)


class RuleMigrationError(RuntimeError):
    """Some rule entries name no principal, or several; nothing was converted."""


class _World:
    """Everything the conversion reads, loaded once."""

    def __init__(self, conn: sa.Connection) -> None:
        self.org_names: dict[str, str] = {
            r.id: r.name for r in conn.execute(sa.select(_orgs.c.id, _orgs.c.name))
        }
        self.people: dict[str, tuple[str, str, str]] = {}  # id -> (kind, name, org id)
        for kind, table in (("agent", _agents), ("user", _users)):
            q = sa.select(table.c.id, table.c.name, table.c.org_id).where(
                table.c.deleted_at.is_(None)
            )
            for person in conn.execute(q):
                self.people[person.id] = (kind, person.name, person.org_id)
        self.teams: dict[str, tuple[str, str]] = {
            r.id: (r.org_id, r.kind)
            for r in conn.execute(
                sa.select(_teams.c.id, _teams.c.org_id, _teams.c.kind).where(
                    _teams.c.deleted_at.is_(None)
                )
            )
        }
        self.visas: set[tuple[str, str]] = {
            (r.network_id, r.org_id)
            for r in conn.execute(
                sa.select(_visas.c.network_id, _visas.c.org_id).where(_visas.c.revoked_at.is_(None))
            )
        }
        self.members: dict[str, set[str]] = {}
        for member in conn.execute(sa.select(_members.c.team_id, _members.c.member_id)):
            self.members.setdefault(member.team_id, set()).add(member.member_id)
        self._tiers: dict[str, tuple[list[Party], list[Party]]] = {}

    def tiers(self, org_id: str) -> tuple[list[Party], list[Party]]:
        """``(own, shared)`` principals of ``org_id`` (as ``services.rules.visible_parties``)."""
        if org_id in self._tiers:
            return self._tiers[org_id]
        own: list[Party] = [("org", org_id, self.org_names.get(org_id, ""))]
        own += [(k, pid, n) for pid, (k, n, o) in self.people.items() if o == org_id]
        visible = [
            tid
            for tid, (host, kind) in self.teams.items()
            if host == org_id or (kind == "network" and (tid, org_id) in self.visas)
        ]
        shared: dict[str, Party] = {}
        other_orgs: set[str] = set()
        for tid in visible:
            other_orgs.add(self.teams[tid][0])
            for pid in self.members.get(tid, ()):
                person = self.people.get(pid)
                if person is not None and person[2] != org_id:
                    shared[pid] = (person[0], pid, person[1])
                    other_orgs.add(person[2])
            if self.teams[tid][0] == org_id:
                other_orgs |= {o for (net, o) in self.visas if net == tid}
        for oid in other_orgs - {org_id}:
            if oid in self.org_names:
                shared[oid] = ("org", oid, self.org_names[oid])
        self._tiers[org_id] = (own, list(shared.values()))
        return self._tiers[org_id]


def _convert(entry: str, own: list[Party], shared: list[Party]) -> str:
    """The id ``entry`` names (old semantics, see the module docstring); ValueError saying
    why when it names no principal or several."""
    if entry == "*":
        return entry
    if _PATTERN_CHARS & set(entry):
        raise ValueError("a pattern other than '*': list the principals it meant by id")
    if entry[:4].lower() == "org:":
        wanted, kinds, what = entry[4:], {"org"}, "org"
    else:
        wanted, kinds, what = entry, {"agent", "user"}, "agent or user"
    key = wanted.lower()
    for tier in (own, shared):
        found = sorted({pid for kind, pid, name in tier if kind in kinds and name.lower() == key})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"ambiguous: {len(found)} principals are called that ({', '.join(found)})"
            )
    raise ValueError(f"no {what} called {wanted!r} is visible to the agent's org")


def _lists(rule: Any) -> bool:
    """Whether ``rule`` is an object whose rule lists are lists of strings (convertible)."""
    return isinstance(rule, dict) and all(
        isinstance(rule.get(f, []), list) and all(isinstance(e, str) for e in rule.get(f, []))
        for f in FIELDS
    )


def upgrade() -> None:
    conn = op.get_bind()
    world = _World(conn)
    q = sa.select(_agents.c.id, _agents.c.org_id, _agents.c.name, _agents.c.rule).where(
        _agents.c.rule.is_not(None), _agents.c.deleted_at.is_(None)
    )
    updates: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for agent_id, org_id, name, rule in conn.execute(q).all():
        if not _lists(rule):
            continue
        own, shared = world.tiers(org_id)
        new = dict(rule)
        for field in FIELDS:
            if field not in rule:
                continue
            out: list[str] = []
            for entry in rule[field]:
                try:
                    converted = _convert(entry, own, shared)
                except ValueError as err:
                    problems.append(f"  agent {agent_id} ({name!r}) {field} {entry!r}: {err}")
                    continue
                if converted not in out:
                    out.append(converted)
            new[field] = out
        if new != rule:
            updates.append((agent_id, new))
    if problems:
        raise RuleMigrationError(
            "migration 0009 (rules name principals by id) converted nothing: "
            f"{len(problems)} rule entries do not name exactly one principal:\n"
            + "\n".join(problems)
            + "\nFix these rules with the previous version (PUT /agents/{id}/rule naming each "
            "principal by a name only it has, or without the entry), then upgrade again."
        )
    for agent_id, new in updates:
        conn.execute(sa.update(_agents).where(_agents.c.id == agent_id).values(rule=new))


def downgrade() -> None:
    conn = op.get_bind()
    world = _World(conn)
    q = sa.select(_agents.c.id, _agents.c.org_id, _agents.c.rule).where(_agents.c.rule.is_not(None))
    for agent_id, org_id, rule in conn.execute(q).all():
        if not _lists(rule):
            continue
        new = dict(rule)
        for field in FIELDS:
            if field not in rule:
                continue
            out: list[str] = []
            for entry in rule[field]:
                if entry == "org:self":
                    entry = f"org:{world.org_names.get(org_id, '')}"
                elif entry in world.org_names:
                    entry = f"org:{world.org_names[entry]}"
                elif entry in world.people:
                    entry = world.people[entry][1]
                out.append(entry)
            new[field] = out
        if new != rule:
            conn.execute(sa.update(_agents).where(_agents.c.id == agent_id).values(rule=new))
