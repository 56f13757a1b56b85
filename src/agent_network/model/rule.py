"""The rule: per-agent governance the hub enforces (seed: Rule / HubArbiter).

Rules name principals by id, never by name (names are chosen by their owners and need not be
unique: a second org may call itself "Acme" too). An entry of ``inbound_from`` or
``outbound_to`` is one of:

- an agent id (``agt_...``) or a user id (``usr_...``): that principal;
- an org id (``org_...``): every agent and user of that org;
- ``org:self``: every agent and user of the rule owner's own org;
- ``*``: everyone.

:func:`matches` decides on exactly these, comparing ids for equality (pure; no I/O). An empty
list matches nothing; any other entry (a name, a pattern) matches nobody.

A writer may give a name instead of an id: :func:`resolve_entry` turns it into an id once, at
write time, among the principals the writing org can see (:class:`Party`), and refuses it
(:class:`EntryUnresolved`) when no principal or more than one is called that. The stored rule
holds ids only (``services/rules.py`` does the lookups; migration 0009 converted older rules).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EVERYONE = "*"
"""The entry that matches every sender."""

OWN_ORG = "org:self"
"""The entry that matches every agent and user of the rule owner's org."""

PartyKind = Literal["agent", "user", "org"]

ID_PREFIXES: dict[str, PartyKind] = {"agt_": "agent", "usr_": "user", "org_": "org"}
"""Id prefix -> kind of the principals a rule can name (``model.ids.new_id`` prefixes)."""

_PATTERN_CHARS = frozenset("*?[]")


class RateLimit(BaseModel):
    """At most ``messages`` agent messages in any ``per_seconds`` seconds."""

    model_config = ConfigDict(extra="forbid")

    messages: int = Field(ge=1, le=100_000)
    per_seconds: float = Field(gt=0, le=86_400)


class Rule(BaseModel):
    """What an agent may do. Every field is enforced; ``None`` means no limit.

    - ``inbound_from``: whose messages the agent reacts to (others never trigger it).
    - ``outbound_to``: every other participant of a thread the agent posts into must match.
    - ``rate``: messages per window, across all threads.
    - ``inbox_cap``: at most this many triggers waiting for the agent; more are dropped.
    - ``max_concurrent_threads``: open threads the agent has posted in, at most.
    - ``allowed_adapters``: thread adapters the agent may post in (``None``: any).
    - ``delegation_depth``: at most this many agent replies in a causation chain ending in the
      agent's own reply (a reply to a person has depth 1, a reply to that reply depth 2, ...).

    Stored, ``inbound_from`` and ``outbound_to`` hold ids, ``org:self`` or ``*`` only (see the
    module docstring); this model also carries a writer's input, whose names the rule service
    resolves to ids before storing.
    """

    model_config = ConfigDict(extra="forbid")

    inbound_from: list[str] = Field(default_factory=lambda: ["*"], max_length=100)
    outbound_to: list[str] = Field(default_factory=lambda: ["*"], max_length=100)
    rate: RateLimit | None = None
    inbox_cap: int | None = Field(default=None, ge=0, le=1_000_000)
    max_concurrent_threads: int | None = Field(default=None, ge=0, le=1_000_000)
    allowed_adapters: list[str] | None = Field(default=None, max_length=20)
    delegation_depth: int | None = Field(default=None, ge=0, le=1000)


def id_kind(entry: str) -> PartyKind | None:
    """The kind of principal ``entry`` is the id of (by its prefix), or None when it is no id."""
    for prefix, kind in ID_PREFIXES.items():
        if entry.startswith(prefix) and len(entry) > len(prefix):
            return kind
    return None


def matches(entries: Iterable[str], sender_id: str, sender_org_id: str, owner_org_id: str) -> bool:
    """Whether a rule list admits a sender, deciding on ids only (pure).

    ``entries``: a stored ``inbound_from`` / ``outbound_to``; ``sender_id`` and
    ``sender_org_id``: the sender's (or participant's) id and its org's id; ``owner_org_id``: the
    org of the agent whose rule it is. True when an entry is ``*``, the sender's id, the
    sender's org id, or ``org:self`` and the sender belongs to the owner's org. Names play no
    part: an entry that is not an id or one of the two keywords matches nobody.
    """
    for entry in entries:
        if entry == EVERYONE:
            return True
        if entry == OWN_ORG:
            if sender_org_id == owner_org_id:
                return True
        elif id_kind(entry) is not None and entry in (sender_id, sender_org_id):
            return True
    return False


@dataclass(frozen=True)
class Party:
    """A principal a rule can name, as the writing org sees it: ``kind`` (agent, user or org),
    ``id``, display ``name``, and its org (an org is its own ``org_id`` / ``org_name``)."""

    kind: PartyKind
    id: str
    name: str
    org_id: str
    org_name: str

    def label(self) -> dict[str, Any]:
        """``{"kind", "name", "org_id", "org_name"}``: how a rule shows this id to people."""
        return {
            "kind": self.kind,
            "name": self.name,
            "org_id": self.org_id,
            "org_name": self.org_name,
        }


class EntryUnresolved(ValueError):
    """A rule entry names no principal, or more than one: ``entry``, ``reason`` (for people)
    and the ``candidates`` it could mean (empty unless ambiguous)."""

    def __init__(self, entry: str, reason: str, candidates: Sequence[Party] = ()) -> None:
        super().__init__(f"{entry!r}: {reason}")
        self.entry = entry
        self.reason = reason
        self.candidates = tuple(candidates)


def resolve_entry(entry: str, own: Sequence[Party], shared: Sequence[Party]) -> str:
    """The stored form of one rule entry given by a writer (pure).

    ``own``: the principals of the writing org (its agents, users and the org itself);
    ``shared``: those of other orgs it shares a team or network with. ``*`` and ``org:self``
    stay; an id stays when it is one of ``own`` or ``shared``; ``org:<name>`` names an org and
    any other entry an agent or user, by its name compared case-insensitively: first among
    ``own``, then (no match there) among ``shared``. Returns the id; raises
    :class:`EntryUnresolved` for an unknown id, a pattern (``*`` inside a longer entry, ``?``,
    ``[``), a name nobody has, or a name several principals of the same tier have (ambiguous:
    the writer must give the id).
    """
    if entry in (EVERYONE, OWN_ORG):
        return entry
    kind = id_kind(entry)
    if kind is not None:
        if any(p.id == entry for p in (*own, *shared)):
            return entry
        raise EntryUnresolved(entry, f"no {kind} with this id is visible to the rule's org")
    if _PATTERN_CHARS & set(entry):
        raise EntryUnresolved(
            entry,
            "patterns are not supported: rules name principals by id "
            "(give ids, names, org:<name>, org:self or *)",
        )
    if entry[:4].lower() == "org:":
        wanted, kinds, what = entry[4:], {"org"}, "org"
    else:
        wanted, kinds, what = entry, {"agent", "user"}, "agent or user"
    key = wanted.lower()
    for tier in (own, shared):
        found = {p.id: p for p in tier if p.kind in kinds and p.name.lower() == key}
        if len(found) == 1:
            return next(iter(found))
        if len(found) > 1:
            ids = ", ".join(sorted(found))
            raise EntryUnresolved(
                entry,
                f"ambiguous: {len(found)} principals visible to the rule's org are called "
                f"{wanted!r} ({ids}); give the id of the one you mean",
                sorted(found.values(), key=lambda p: p.id),
            )
    raise EntryUnresolved(entry, f"no {what} called {wanted!r} is visible to the rule's org")


def resolve_entries(
    entries: Iterable[str], own: Sequence[Party], shared: Sequence[Party]
) -> list[str]:
    """:func:`resolve_entry` for each entry, in order, without duplicates; raises
    :class:`EntryUnresolved` for the first entry it cannot resolve."""
    out: list[str] = []
    for entry in entries:
        resolved = resolve_entry(entry, own, shared)
        if resolved not in out:
            out.append(resolved)
    return out
