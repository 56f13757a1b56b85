"""Egress policy: what an org's agents and people may post into networks (cross-org threads).

An org keeps one egress policy, an ordered list of rules ``{name, kind, pattern, action}``:

- ``kind`` is a built-in detector — ``email`` (e-mail addresses), ``card_number`` (payment card
  numbers that pass the Luhn check), ``secret`` (this platform's credentials, ``sk-…`` API keys,
  AWS access key ids, PEM private keys, ``password=``-style assignments) — or ``regex`` (the
  rule's own ``pattern``, Python :mod:`re` syntax);
- ``action`` ``refuse`` rejects the whole message (:class:`EgressRefusedError`, nothing is
  written); ``redact`` replaces every match by ``[redacted:<rule name>]``.

**Defaults.** Besides its own rules, every org's policy has two built-in detectors that are on
unless the org turns them off (:class:`EgressDefaults`), applied after its rules:

- ``default:org_secrets`` (action ``refuse`` by default): the org's own stored agent secrets —
  every agent's — as exact values and simple encodings (base64, base64url, hex, URL-encoding),
  found through keyed fingerprints without their plaintext (services/fingerprints.py);
- ``default:key_formats`` (action ``redact`` by default): the common key formats of the
  ``secret`` kind (:data:`SECRETS`).

An exact org secret is refused rather than redacted by default: a reply that repeats one is a
leak by construction, and the whole reply is suspect; a key format can be a false positive, so
it is cut out and the rest goes through. Either action may be changed (``refuse``/``redact``)
or turned ``off``; turning one off needs ``acknowledge_loosening`` and is audited as
``policy.egress_loosened`` (:meth:`PolicyService.set_egress`). With ``team_threads`` the two
defaults (not the org's own rules) also apply in the org's own team threads.

The policy of the *sender's* org is applied to every message posted into a **network** thread
(``ThreadService.post``; the runner calls :func:`check_outgoing`), before the hub appends it.
Org-internal team threads are filtered only by the defaults, and only with ``team_threads``.
:func:`check_egress` / :func:`apply_egress` are pure (no I/O) and :func:`load_egress_policy` is
the async loader; none of them audits (the caller does, never with the matched text: rule
names, secret names, encodings and character positions only).

The rule model and its validation live in ``services/egress_rules.py``, the detectors and
the pure checks in ``services/egress_check.py``; this module loads policies, checks outgoing
messages against the stored policy, audits, and is the service. Design notes: docs/security.md
("Rules and egress", "Egress default and the org's secrets").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.errors import InvalidRequestError
from agent_network.model.ids import now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.egress_check import check_message
from agent_network.services.egress_rules import (
    DEFAULT_POLICY,
    EMPTY_POLICY,
    PROBE_INPUT_LIMIT,
    PROBE_SIZE,
    EgressPolicy,
    EgressRefusedError,
    EgressResult,
    LooseningNotAcknowledgedError,
    matches_data,
    parse_defaults,
    parse_rules,
    policy_for_thread,
    policy_from_row,
    probe_patterns,
)
from agent_network.services.principal import Principal
from agent_network.services.scope import require_org_key
from agent_network.services.secrets import org_secret_index
from agent_network.store.engine import write_transaction
from agent_network.store.tables import org_policies, teams, threads

log = structlog.get_logger(__name__)


async def read_egress_policy(conn: AsyncConnection, org_id: str) -> EgressPolicy:
    """The stored egress policy of ``org_id`` (:data:`DEFAULT_POLICY` if it never set one)."""
    row = (
        await conn.execute(
            select(org_policies.c.egress, org_policies.c.updated_at).where(
                org_policies.c.org_id == org_id
            )
        )
    ).first()
    return DEFAULT_POLICY if row is None else policy_from_row(row[0], row[1])


async def load_egress_policy(
    engine: AsyncEngine, org_id: str, thread_id: str | None = None
) -> EgressPolicy:
    """The egress policy that applies when ``org_id`` posts (into ``thread_id``).

    With ``thread_id``: a network thread gets the whole policy; a team thread (or no such
    thread) gets :data:`EMPTY_POLICY`, or only the defaults when the org applies them to team
    threads (:func:`policy_for_thread`), so the caller can always follow with
    :func:`check_egress`.
    """
    async with engine.connect() as conn:
        policy = await read_egress_policy(conn, org_id)
        if thread_id is not None:
            kind = (
                await conn.execute(
                    select(teams.c.kind)
                    .join(threads, threads.c.team_id == teams.c.id)
                    .where(threads.c.id == thread_id)
                )
            ).scalar_one_or_none()
            if kind is None:
                return EMPTY_POLICY
            return policy_for_thread(policy, kind == "network") or EMPTY_POLICY
        return policy


async def check_outgoing(
    ctx: ServiceContext,
    org_id: str,
    thread_id: str,
    content: str,
    tool_calls: list[dict[str, Any]] | None = None,
) -> EgressResult:
    """The egress check of a message ``org_id`` sends into ``thread_id`` (the runner's; the
    REST path does the same from its cached grant): the applicable policy
    (:func:`load_egress_policy`), the org's secret fingerprints when its org-secret detector is
    on, then :func:`check_message` over the content and ``tool_calls``. Raises
    :class:`EgressRefusedError`."""
    policy = await load_egress_policy(ctx.engine, org_id, thread_id)
    index = await org_secret_index(ctx, org_id) if policy.defaults.org_secrets != "off" else None
    return check_message(policy, content, tool_calls, index)


async def audit_egress(
    conn: AsyncConnection,
    principal: Principal,
    action: Literal["egress.refused", "egress.redacted"],
    thread_id: str,
    rules: Sequence[str],
    *,
    org_id: str,
    data: dict[str, Any] | None = None,
) -> None:
    """Audit one egress refusal or redaction in ``org_id`` (the sender's): reason = the rule
    names, resource = the thread. Never given the matched text."""
    await record(
        conn,
        principal,
        action,
        "thread",
        thread_id,
        org_id=org_id,
        outcome="refused" if action == "egress.refused" else "accepted",
        reason=", ".join(rules),
        data={"rules": list(rules), **(data or {})},
    )


# ----------------------------------------------------------------------------- service


class PolicyService:
    """An org's egress policy: read and replace (org keys only)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def get_egress(self, principal: Principal) -> dict[str, Any]:
        """``{"rules": [...], "updated_at": str | None, "defaults": {...}, "defaults_off":
        [...]}`` of the caller's org (no rules and the defaults on if unset)."""
        org_id = require_org_key(principal, "reading the egress policy")
        async with self.ctx.engine.connect() as conn:
            return (await read_egress_policy(conn, org_id)).to_dict()

    async def set_egress(
        self,
        principal: Principal,
        rules: Any,
        defaults: Any = None,
        *,
        acknowledge_loosening: bool = False,
    ) -> dict[str, Any]:
        """Replace the caller org's egress policy: its rules (see :func:`parse_rules`) and its
        ``defaults`` (see :func:`parse_defaults`; None restores the built-in defaults). Regex
        patterns that are new to the policy are probed (:func:`probe_patterns`).

        Loosening is never silent: a policy with a default detector ``off`` is refused with
        LooseningNotAcknowledgedError (422) unless ``acknowledge_loosening`` is true, and any
        weakening of the defaults against the stored policy (a detector off or from refuse to
        redact, ``team_threads`` off) is audited as ``policy.egress_loosened`` (who, what) in
        the same transaction. InvalidRequestError (422) for any invalid rule or default;
        audited as ``policy.egress_update`` (names, kinds, actions, defaults only)."""
        org_id = require_org_key(principal, "changing the egress policy")
        parsed = parse_rules(rules)
        wanted = parse_defaults(defaults)
        if wanted.off and not acknowledge_loosening:
            off = ", ".join(wanted.off)
            raise LooseningNotAcknowledgedError(
                f"turning off the egress default(s) {off} lets what they catch (your org's "
                "stored secrets, common key formats) reach other orgs; send "
                '"acknowledge_loosening": true with the policy to confirm',
                details={"off": wanted.off},
            )
        async with self.ctx.engine.connect() as conn:
            current = await read_egress_policy(conn, org_id)
        known = {r.pattern for r in current.rules if r.kind == "regex"}
        fresh = [r for r in parsed if r.kind == "regex" and r.pattern not in known]
        try:
            worst = await probe_patterns([cast(str, r.pattern) for r in fresh])
        except OSError as exc:
            log.error("policy.probe_failed", error=repr(exc))
            raise InvalidRequestError(
                "regex rules cannot be checked on this server right now; try again"
            ) from exc
        for rule, seconds in zip(fresh, worst, strict=False):
            if seconds is None or seconds > PROBE_INPUT_LIMIT:
                raise InvalidRequestError(
                    f"the pattern of rule {rule.name!r} is refused: it backtracks too much "
                    f"(catastrophic or polynomial time on a {PROBE_SIZE}-character message); "
                    "bound its repetitions (e.g. {1,50}) or anchor it"
                )
        policy = EgressPolicy(tuple(parsed), now_iso(), wanted)
        stored = {"rules": [r.to_dict() for r in policy.rules], "defaults": wanted.to_dict()}
        summary = [{"name": r.name, "kind": r.kind, "action": r.action} for r in policy.rules]
        async with write_transaction(self.ctx.engine) as conn:
            ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            await conn.execute(
                ins(org_policies)
                .values(org_id=org_id, egress=stored, updated_at=policy.updated_at)
                .on_conflict_do_update(
                    index_elements=["org_id"],
                    set_={"egress": stored, "updated_at": policy.updated_at},
                )
            )
            await record(
                conn,
                principal,
                "policy.egress_update",
                "org",
                org_id,
                data={"rules": summary, "defaults": wanted.to_dict()},
            )
            loosened = wanted.loosened_from(current.defaults)
            if loosened:
                await record(
                    conn,
                    principal,
                    "policy.egress_loosened",
                    "org",
                    org_id,
                    reason=", ".join(loosened),
                    data={
                        "loosened": loosened,
                        "before": current.defaults.to_dict(),
                        "after": wanted.to_dict(),
                        "acknowledged": acknowledge_loosening,
                    },
                )
        self.ctx.config_epoch += 1  # cached post decisions hold the old policy
        return policy.to_dict()


# EgressRefusedError, EgressResult and matches_data live in services/egress_rules.py; the
# runner's job builder (services/jobs.py) still imports them from here.
__all__ = [
    "EgressRefusedError",
    "EgressResult",
    "PolicyService",
    "audit_egress",
    "check_outgoing",
    "load_egress_policy",
    "matches_data",
    "read_egress_policy",
]
