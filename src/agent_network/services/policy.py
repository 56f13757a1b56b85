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

Cost: every built-in detector is linear in the message length (matches may only start at a token
boundary and every repetition is bounded or unambiguous). A ``regex`` rule is accepted only if it
compiles, is at most :data:`MAX_PATTERN` characters, cannot match the empty string, has no
back-references and no nested unbounded quantifier such as ``(a+)+``, and — since Python's ``re``
has no timeout and a backtracking search holds the event loop — if a probe in a separate process
(killed after :data:`PROBE_SECONDS`) finds it fast on :data:`PROBE_SIZE`-character adversarial
inputs built from its own characters (each search under :data:`PROBE_INPUT_LIMIT` seconds).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast, get_args

import anyio
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.errors import AgentNetworkError, InvalidRequestError
from agent_network.model.ids import now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.fingerprints import SecretIndex
from agent_network.services.principal import Principal
from agent_network.services.scope import require_org_key
from agent_network.services.secrets import org_secret_index
from agent_network.store.engine import write_transaction
from agent_network.store.tables import org_policies, teams, threads

log = structlog.get_logger(__name__)

RuleKind = Literal["email", "card_number", "secret", "regex"]
RuleAction = Literal["refuse", "redact"]
RULE_KINDS: tuple[str, ...] = get_args(RuleKind)
RULE_ACTIONS: tuple[str, ...] = get_args(RuleAction)

MAX_RULES = 50
MAX_PATTERN = 500  # characters of a regex rule's pattern
RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
PROBE_SIZE = 32_768  # characters of each probe input (at least ThreadService's MAX_CONTENT)
PROBE_INPUT_LIMIT = 0.1  # seconds one search over one probe input may take
PROBE_SECONDS = 2.0  # seconds the probe of one pattern may take in all before it is killed


class EgressRefusedError(AgentNetworkError):
    """A message matched a ``refuse`` rule of the sender org's egress policy; nothing was posted.

    The message names the rule(s), never the matched text; ``rules`` lists their names.
    """

    code = "egress_refused"
    status = 422

    def __init__(self, rules: Sequence[str], matches: Sequence[EgressMatch] = ()) -> None:
        names = ", ".join(repr(r) for r in rules)
        plural = "rules" if len(rules) > 1 else "rule"
        super().__init__(
            f"the message was refused by your org's egress policy ({plural} {names}); "
            "nothing was posted",
            details={"rules": list(rules)},
        )
        self.rules = list(rules)
        # where the refuse rules matched, for the audit log only (never in the answer)
        self.matches = list(matches)


class LooseningNotAcknowledgedError(InvalidRequestError):
    """An egress policy turning a default detector off was sent without
    ``acknowledge_loosening: true``; nothing was changed. ``details.off`` names the detectors."""

    code = "loosening_not_acknowledged"


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One rule of an egress policy (see the module docstring)."""

    name: str
    kind: RuleKind
    action: RuleAction
    pattern: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "kind", "pattern", "action"}`` (the stored and the API shape)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "pattern": self.pattern,
            "action": self.action,
        }


DefaultAction = Literal["refuse", "redact", "off"]
DEFAULT_ACTIONS: tuple[str, ...] = get_args(DefaultAction)
ORG_SECRETS = "default:org_secrets"  # rule name of the org-secret detector (':' no rule has)
KEY_FORMATS = "default:key_formats"  # rule name of the default key-format detector
_STRENGTH = {"off": 0, "redact": 1, "refuse": 2}
MAX_AUDITED_MATCHES = 50  # matches listed in one audit record


@dataclass(frozen=True, slots=True)
class EgressDefaults:
    """The built-in detectors of every org's policy (see the module docstring): the action of
    ``org_secrets`` and of ``key_formats`` (``refuse``, ``redact`` or ``off``), and whether
    they also apply in the org's own team threads (``team_threads``)."""

    org_secrets: DefaultAction = "refuse"
    key_formats: DefaultAction = "redact"
    team_threads: bool = False

    @property
    def off(self) -> list[str]:
        """The detectors turned off (``org_secrets``, ``key_formats``)."""
        return [d for d in ("org_secrets", "key_formats") if getattr(self, d) == "off"]

    def loosened_from(self, before: EgressDefaults) -> list[str]:
        """What this weakens compared with ``before``: each detector whose action is weaker
        (refuse > redact > off) and ``team_threads`` turned off."""
        out = [
            d
            for d in ("org_secrets", "key_formats")
            if _STRENGTH[getattr(self, d)] < _STRENGTH[getattr(before, d)]
        ]
        if before.team_threads and not self.team_threads:
            out.append("team_threads")
        return out

    def rules(self) -> tuple[EgressRule, ...]:
        """The default detectors that are on, as rules (applied after the org's own)."""
        out: list[EgressRule] = []
        if self.org_secrets != "off":
            out.append(EgressRule(ORG_SECRETS, "secret", self.org_secrets))
        if self.key_formats != "off":
            out.append(EgressRule(KEY_FORMATS, "secret", self.key_formats))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """``{"org_secrets", "key_formats", "team_threads"}`` (the stored and the API shape)."""
        return {
            "org_secrets": self.org_secrets,
            "key_formats": self.key_formats,
            "team_threads": self.team_threads,
        }


BUILTIN_DEFAULTS = EgressDefaults()
NO_DEFAULTS = EgressDefaults("off", "off", False)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """An org's ordered egress rules and its :class:`EgressDefaults` (on unless turned off)."""

    rules: tuple[EgressRule, ...] = ()
    updated_at: str | None = None
    defaults: EgressDefaults = BUILTIN_DEFAULTS

    def to_dict(self) -> dict[str, Any]:
        """``{"rules": [...], "updated_at", "defaults": {...}, "defaults_off": [...]}``."""
        return {
            "rules": [r.to_dict() for r in self.rules],
            "updated_at": self.updated_at,
            "defaults": self.defaults.to_dict(),
            "defaults_off": self.defaults.off,
        }

    def all_rules(self) -> tuple[EgressRule, ...]:
        """The org's own rules, then the default detectors that are on."""
        return self.rules + self.defaults.rules()


DEFAULT_POLICY = EgressPolicy()  # an org that never set a policy: no rules, defaults on
EMPTY_POLICY = EgressPolicy(defaults=NO_DEFAULTS)  # applies nothing (e.g. a team thread)


@dataclass(frozen=True, slots=True)
class EgressMatch:
    """One match of a rule in a message: the rule's name, the span ``[start, end)`` in the
    original text and, for the org-secret detector, which secret (``agent_id``, ``name``) in
    which ``encoding``. Never the matched text."""

    rule: str
    start: int
    end: int
    agent_id: str | None = None
    secret: str | None = None
    encoding: str | None = None
    field: str | None = None  # where, for a string inside tool_calls (e.g. "tool_calls[0].args")

    def to_dict(self) -> dict[str, Any]:
        """The audit shape: ``{"rule", "start", "end"}`` plus ``{"agent_id", "secret",
        "encoding"}`` for an org secret and ``field`` for a string inside ``tool_calls``."""
        out: dict[str, Any] = {"rule": self.rule, "start": self.start, "end": self.end}
        if self.secret is not None:
            out.update(agent_id=self.agent_id, secret=self.secret, encoding=self.encoding)
        if self.field is not None:
            out["field"] = self.field
        return out


@dataclass(frozen=True, slots=True)
class EgressResult:
    """What :func:`check_egress` let through: the ``content`` to post, the names of the redact
    rules applied (``redacted``) and their ``matches``; :func:`check_message` also gives the
    ``tool_calls`` to post (redacted like the content; None when there were none)."""

    content: str
    redacted: list[str]
    matches: list[EgressMatch]
    tool_calls: list[dict[str, Any]] | None = None

    def audit_data(self) -> dict[str, Any]:
        """``{"matches": [...]}`` for the audit record (at most :data:`MAX_AUDITED_MATCHES`)."""
        return matches_data(self.matches)


def matches_data(matches: Sequence[EgressMatch]) -> dict[str, Any]:
    """``{"matches": [...], "matches_total"?}`` for an audit record: rule names, secret names,
    encodings and spans only (at most :data:`MAX_AUDITED_MATCHES`)."""
    out: dict[str, Any] = {"matches": [m.to_dict() for m in matches[:MAX_AUDITED_MATCHES]]}
    if len(matches) > MAX_AUDITED_MATCHES:
        out["matches_total"] = len(matches)
    return out


# ----------------------------------------------------------------------------- detectors

# A match may only start where no local-part character precedes it, and every repetition is
# bounded, so each start costs O(1) and a search is linear (a naive ``[\w.]+@…`` is quadratic).
EMAIL = re.compile(
    r"(?<![\w.+%-])[\w.+%-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)

# Maximal runs of digits joined by single spaces or dashes (unambiguous, so linear).
_DIGIT_RUN = re.compile(r"\d+(?:[ -]\d+)*")
_DIGITS = re.compile(r"\d+")

SECRETS: tuple[re.Pattern[str], ...] = (
    # this platform's own credentials: org keys, user/agent tokens, the admin key
    re.compile(r"(?<![A-Za-z0-9])an_(?:org|usr|agt|admin)_[A-Za-z0-9_-]{16,}"),
    # sk-… API keys (OpenAI style, incl. sk-proj-…, sk-ant-…)
    re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{20,}"),
    # AWS access key ids (long-term AKIA…, temporary ASIA…)
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    # GitHub tokens (personal, OAuth, user-to-server, server-to-server, refresh; fine-grained)
    re.compile(
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
    ),
    # GitLab personal access tokens
    re.compile(r"(?<![A-Za-z0-9_-])glpat-[A-Za-z0-9_-]{20,}"),
    # Slack tokens (bot, user, app-level) and incoming webhooks
    re.compile(r"(?<![A-Za-z0-9-])(?:xox[abposr]-[A-Za-z0-9-]{10,}|xapp-\d-[A-Za-z0-9-]{10,})"),
    re.compile(r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_-]{20,}"),
    # JSON Web Tokens (header.payload.signature, each base64url; header and payload are JSON)
    re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    # Google API keys
    re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),
    # Stripe secret and restricted keys, webhook signing secrets
    re.compile(
        r"(?<![A-Za-z0-9_])(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{20,})"
    ),
    # SendGrid, npm, PyPI and Hugging Face tokens
    re.compile(r"(?<![A-Za-z0-9_.-])SG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"),
    re.compile(r"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9_-])pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
    re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}"),
    # an Authorization header's bearer token
    re.compile(r"(?<![A-Za-z0-9_-])[Bb]earer[ \t]{1,5}[A-Za-z0-9._~+/-]{20,}=*"),
    # credentials in a URL: scheme://user:password@host
    re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s/:@]{1,64}:[^\s/@]{3,128}@"),
    # PEM private keys: the header and the block up to its END line (or to the end if cut off)
    re.compile(
        r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:.*?-----END (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----|.*)",
        re.DOTALL,
    ),
    # password= / api_key: style assignments (key, separator, value), any prefix (DB_PASSWORD=)
    re.compile(
        r"(?:password|passwd|passphrase|pwd|api[_-]?key|api[_-]?secret|access[_-]?token"
        r"|auth[_-]?token|refresh[_-]?token|bearer[_-]?token|client[_-]?secret|secret[_-]?key"
        r"|secret[_-]?access[_-]?key|private[_-]?key|account[_-]?key|client[_-]?token)"
        r"[\"']?[ \t]{0,3}[:=][ \t]{0,3}[\"']?[^\s\"',;&]{3,}",
        re.IGNORECASE,
    ),
)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812-1 that payment card numbers satisfy.

    From the rightmost digit (the check digit) leftwards, every second digit is doubled (minus 9
    when the double exceeds 9); the number is valid when the sum is a multiple of 10. See Hans
    Peter Luhn, US patent 2,950,048 (1960), and https://en.wikipedia.org/wiki/Luhn_algorithm.
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_grouping(lengths: Sequence[int]) -> bool:
    """Group lengths printed on cards: 4-4-4-4(-1..3) and shorter 4-…-4-x, Amex 4-6-5,
    Diners 4-6-4."""
    if len(lengths) == 1:
        return True
    if all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4:
        return True
    return list(lengths) in ([4, 6, 5], [4, 6, 4])


def card_number_spans(content: str) -> list[tuple[int, int]]:
    """Spans of payment card numbers: 13-19 digits, optionally separated by single spaces or
    dashes, that pass the Luhn check (:func:`luhn_valid`).

    A whole run of digits and separators is a candidate; inside a longer run (a card followed by
    its CVV, a reference number before it) so is any stretch of consecutive digit groups printed
    the way cards are (see :func:`_card_grouping`). Linear in ``len(content)``.
    """
    spans: list[tuple[int, int]] = []
    for run in _DIGIT_RUN.finditer(content):
        groups = [(m.start(), m.end()) for m in _DIGITS.finditer(content, run.start(), run.end())]
        total = sum(e - s for s, e in groups)
        if total < 13:
            continue
        if total <= 19 and luhn_valid(re.sub(r"\D", "", run.group())):
            spans.append(run.span())
            continue
        for i in range(len(groups)):
            digits = ""
            for j in range(i, min(i + 5, len(groups))):
                digits += content[groups[j][0] : groups[j][1]]
                if len(digits) > 19:
                    break
                if (
                    len(digits) >= 13
                    and _card_grouping([e - s for s, e in groups[i : j + 1]])
                    and luhn_valid(digits)
                ):
                    spans.append((groups[i][0], groups[j][1]))
    return spans


def secret_spans(content: str) -> list[tuple[int, int]]:
    """Spans of credentials and secrets (see :data:`SECRETS`)."""
    return [m.span() for rx in SECRETS for m in rx.finditer(content)]


def rule_spans(rule: EgressRule, content: str) -> list[tuple[int, int]]:
    """Where ``rule`` matches ``content`` (non-empty spans, possibly overlapping)."""
    if rule.kind == "email":
        return [m.span() for m in EMAIL.finditer(content)]
    if rule.kind == "card_number":
        return card_number_spans(content)
    if rule.kind == "secret":
        return secret_spans(content)
    assert rule.pattern is not None
    return [m.span() for m in re.compile(rule.pattern).finditer(content) if m.end() > m.start()]


def _by_span(m: EgressMatch) -> tuple[int, int]:
    return m.start, m.end


def _matches(rule: EgressRule, content: str, org_secrets: SecretIndex | None) -> list[EgressMatch]:
    if rule.name == ORG_SECRETS:
        if org_secrets is None:
            return []
        return [
            EgressMatch(rule.name, m.start, m.end, m.agent_id, m.name, m.encoding)
            for m in org_secrets.find(content)
        ]
    return [EgressMatch(rule.name, s, e) for s, e in rule_spans(rule, content)]


def check_egress(
    policy: EgressPolicy, content: str, org_secrets: SecretIndex | None
) -> EgressResult:
    """Apply ``policy`` (its own rules, then its default detectors that are on) to a message.

    Pure and deterministic. ``org_secrets`` is the sender org's fingerprint index
    (:func:`~agent_network.services.secrets.org_secret_index`; None: the org-secret detector
    finds nothing). Raises :class:`EgressRefusedError` naming every ``refuse`` rule that matches
    (then nothing may be posted; ``matches`` says where, for the audit). Otherwise every match
    of every ``redact`` rule is replaced by ``[redacted:<rule name>]``. All matches are found in
    the original text (a marker is never matched again); overlapping matches merge into one
    span named after the rule of the match that starts first (the earlier rule on a tie). With
    no match the content comes back unchanged.
    """
    rules = policy.all_rules()
    refused: list[str] = []
    refused_at: list[EgressMatch] = []
    for rule in rules:
        if rule.action == "refuse":
            found = _matches(rule, content, org_secrets)
            if found:
                refused.append(rule.name)
                refused_at.extend(found)
    if refused:
        raise EgressRefusedError(refused, sorted(refused_at, key=_by_span))
    spans: list[tuple[int, int, int]] = []  # start, end, rule index
    applied: list[str] = []
    matches: list[EgressMatch] = []
    for index, rule in enumerate(rules):
        if rule.action != "redact":
            continue
        found = _matches(rule, content, org_secrets)
        if found:
            applied.append(rule.name)
            matches.extend(found)
            spans.extend((m.start, m.end, index) for m in found)
    if not spans:
        return EgressResult(content, [], [])
    spans.sort(key=lambda t: (t[0], t[2], -t[1]))
    merged: list[list[int]] = []
    for start, end, index in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, index])
    out: list[str] = []
    pos = 0
    for start, end, index in merged:
        out.append(content[pos:start])
        out.append(f"[redacted:{rules[index].name}]")
        pos = end
    out.append(content[pos:])
    return EgressResult("".join(out), applied, sorted(matches, key=_by_span))


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(path, string)`` of every string inside a JSON value (dict keys stay as they are)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _replace_strings(value: Any, path: str, new: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return new.get(path, value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, f"{path}.{k}", new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, f"{path}[{i}]", new) for i, v in enumerate(value)]
    return value


def check_message(
    policy: EgressPolicy,
    content: str,
    tool_calls: list[dict[str, Any]] | None,
    org_secrets: SecretIndex | None,
) -> EgressResult:
    """:func:`check_egress` over a whole message: its ``content`` and every string inside its
    ``tool_calls`` (a workflow reason or summary the model wrote, a tool's arguments and
    result). All or nothing: a ``refuse`` rule matching anywhere raises
    :class:`EgressRefusedError` (matches inside ``tool_calls`` carry their ``field``);
    otherwise every string is redacted as :func:`check_egress` does. Pure."""
    texts: list[tuple[str | None, str]] = [(None, content)]
    if tool_calls:
        texts += list(_strings(tool_calls, "tool_calls"))
    results: list[EgressResult] = []
    refused: set[str] = set()
    refused_at: list[EgressMatch] = []
    for where, text in texts:
        try:
            results.append(check_egress(policy, text, org_secrets))
        except EgressRefusedError as err:
            refused.update(err.rules)
            refused_at += [replace(m, field=where) for m in err.matches]
    if refused:
        names = [r.name for r in policy.all_rules() if r.name in refused]
        raise EgressRefusedError(names, refused_at)
    redacted = [r.name for r in policy.all_rules() if any(r.name in x.redacted for x in results)]
    matches = [
        replace(m, field=where)
        for (where, _), x in zip(texts, results, strict=True)
        for m in x.matches
    ]
    calls = tool_calls
    if tool_calls:
        new = {
            str(w): x.content
            for (w, t), x in zip(texts[1:], results[1:], strict=True)
            if x.content != t
        }
        calls = _replace_strings(tool_calls, "tool_calls", new) if new else tool_calls
    return EgressResult(results[0].content, redacted, matches, calls)


def apply_egress(
    policy: EgressPolicy, content: str, org_secrets: SecretIndex | None = None
) -> tuple[str, list[str]]:
    """:func:`check_egress` as ``(content to post, names of the redact rules applied)``."""
    result = check_egress(policy, content, org_secrets)
    return result.content, result.redacted


# ----------------------------------------------------------------------------- validation

_parser: Any = importlib.import_module("re._parser")  # the stdlib's own regex parser (3.11+)
_REPEATS = {_parser.MAX_REPEAT, _parser.MIN_REPEAT}  # backtracking repetitions
_POSSESSIVE = getattr(_parser, "POSSESSIVE_REPEAT", None)


def _static_problem(tree: Any) -> str | None:
    """A reason to reject a parsed pattern without running it, or None."""
    if tree.getwidth()[0] == 0:
        return "it can match the empty string"

    def walk(items: Iterable[Any], repeated: bool) -> str | None:
        for op, av in items:
            if op in (_parser.GROUPREF, _parser.GROUPREF_EXISTS):
                return "back-references and conditional groups are not allowed"
            if op in _REPEATS or (_POSSESSIVE is not None and op == _POSSESSIVE):
                _low, high, body = av
                if repeated and high == _parser.MAXREPEAT and op in _REPEATS:
                    return (
                        "it nests an unbounded quantifier inside a repeated group, such as "
                        "(a+)+, which can take exponential time; bound the inner repetition, "
                        "e.g. {1,50}"
                    )
                problem = walk(body, repeated or (high > 1 and op in _REPEATS))
            elif op == _parser.SUBPATTERN:
                problem = walk(av[3], repeated)
            elif op == _parser.BRANCH:
                problem = None
                for alt in av[1]:
                    problem = problem or walk(alt, repeated)
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
                problem = walk(av[1], repeated)
            elif op == getattr(_parser, "ATOMIC_GROUP", None):
                problem = walk(av, repeated)
            else:
                problem = None
            if problem:
                return problem
        return None

    return walk(tree, False)


_PROBE_BASE = ["a", "A", "0", " ", "\t", "\n", ".", "-", "_", "@", "=", ":", "/", "'", '"',
               "é", "a ", "a.", "a-", "0 ", "0-", "a0", "a@", "a=", "ab", "0.", "a\n"]  # fmt: skip


def _literal_chars(tree: Any) -> tuple[set[str], list[str]]:
    """Characters a parsed pattern names and its runs of literal text."""
    chars: set[str] = set()
    runs: list[str] = []

    def walk(items: Iterable[Any]) -> None:
        run = ""
        for op, av in items:
            if op == _parser.LITERAL:
                chars.add(chr(av))
                run += chr(av)
                continue
            if len(run) > 1:
                runs.append(run)
            run = ""
            if op == _parser.IN:
                for sub_op, sub_av in av:
                    if sub_op == _parser.LITERAL:
                        chars.add(chr(sub_av))
                    elif sub_op == _parser.RANGE:
                        chars.update((chr(sub_av[0]), chr(sub_av[1])))
            elif op in _REPEATS or (_POSSESSIVE is not None and op == _POSSESSIVE):
                walk(av[2])
            elif op == _parser.SUBPATTERN:
                walk(av[3])
            elif op == _parser.BRANCH:
                for alt in av[1]:
                    walk(alt)
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
                walk(av[1])
        if len(run) > 1:
            runs.append(run)

    walk(tree)
    return chars, runs


def probe_units(tree: Any) -> list[str]:
    """Strings whose long repetitions make a backtracking pattern show its worst case."""
    chars, runs = _literal_chars(tree)
    units = list(_PROBE_BASE)
    for ch in sorted(chars)[:40]:
        units += [ch, ch + " ", ch + "a", ch + "0"]
    for run in runs[:10]:
        units += [run, run + " ", run + "a", run + "0"]
    return list(dict.fromkeys(units))


_PROBE_SCRIPT = r"""
import json, re, sys, time
req = json.loads(sys.stdin.read())
for job in req["jobs"]:
    rx = re.compile(job["pattern"])
    worst = 0.0
    for unit in job["units"]:
        text = (unit * (req["size"] // len(unit) + 1))[: req["size"]]
        for sample in (text, text[:-1] + "\x00"):
            t0 = time.perf_counter()
            for _ in rx.finditer(sample):
                pass
            worst = max(worst, time.perf_counter() - t0)
        if worst > req["limit"]:
            break
    print(json.dumps({"worst": worst}), flush=True)
"""


async def probe_patterns(patterns: Sequence[str]) -> list[float | None]:
    """Worst search time (seconds) of each pattern over adversarial inputs, measured in a child
    process; None for the first pattern that did not finish within :data:`PROBE_SECONDS` (the
    child is killed, later patterns are not measured). An empty list for no patterns."""
    if not patterns:
        return []
    jobs = [{"pattern": p, "units": probe_units(_parser.parse(p))} for p in patterns]
    payload = json.dumps({"jobs": jobs, "size": PROBE_SIZE, "limit": PROBE_INPUT_LIMIT})
    results: list[float | None] = []
    process = await anyio.open_process(
        [sys.executable, "-I", "-S", "-c", _PROBE_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send(payload.encode())
        await process.stdin.aclose()
        reader = BufferedByteReceiveStream(process.stdout)
        for _ in patterns:
            line = b""
            try:
                with anyio.move_on_after(PROBE_SECONDS):
                    line = await reader.receive_until(b"\n", 1000)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
                pass  # the child died (e.g. out of memory): treat the pattern as refused
            if not line:
                results.append(None)
                break
            results.append(float(json.loads(line)["worst"]))
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return results


def parse_rules(raw: Any) -> list[EgressRule]:
    """Validate a list of rule dicts (the PUT body's ``rules``): kinds, actions, names (unique,
    1-64 letters, digits, spaces, ``_.-``), patterns (regex rules only: compiles, at most
    :data:`MAX_PATTERN` characters, no static catastrophic form). InvalidRequestError otherwise.
    Does not probe patterns (see :func:`probe_patterns`)."""
    if not isinstance(raw, list):
        raise InvalidRequestError("rules must be a list")
    if len(raw) > MAX_RULES:
        raise InvalidRequestError(f"a policy has at most {MAX_RULES} rules")
    rules: list[EgressRule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object")
        unknown = set(item) - {"name", "kind", "pattern", "action"}
        if unknown:
            raise InvalidRequestError(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        name, kind, action = item.get("name"), item.get("kind"), item.get("action")
        pattern = item.get("pattern")
        if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{where}.name must be 1-64 letters, digits, spaces, '_', '.' or '-' "
                "(starting with a letter or digit)"
            )
        if name in seen:
            raise InvalidRequestError(f"duplicate rule name {name!r}")
        seen.add(name)
        if kind not in RULE_KINDS:
            raise InvalidRequestError(f"{where}.kind must be one of {', '.join(RULE_KINDS)}")
        if action not in RULE_ACTIONS:
            raise InvalidRequestError(f"{where}.action must be one of {', '.join(RULE_ACTIONS)}")
        if kind == "regex":
            _check_pattern(where, pattern)
        elif pattern is not None:
            raise InvalidRequestError(f"{where}.pattern is only for kind 'regex'")
        rules.append(EgressRule(name, cast(RuleKind, kind), cast(RuleAction, action), pattern))
    return rules


def _check_pattern(where: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequestError(f"{where}.pattern is required for kind 'regex'")
    if len(pattern) > MAX_PATTERN:
        raise InvalidRequestError(f"{where}.pattern is longer than {MAX_PATTERN} characters")
    try:
        re.compile(pattern)
        tree = _parser.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise InvalidRequestError(
            f"{where}.pattern is not a valid regular expression: {exc}"
        ) from None
    problem = _static_problem(tree)
    if problem:
        raise InvalidRequestError(f"{where}.pattern is refused: {problem}")


def parse_defaults(raw: Any) -> EgressDefaults:
    """Validate the ``defaults`` object of a policy (None: :data:`BUILTIN_DEFAULTS`): keys
    ``org_secrets`` and ``key_formats`` (``refuse``, ``redact`` or ``off``; omitted: the
    built-in action) and ``team_threads`` (bool, default false). InvalidRequestError
    otherwise."""
    if raw is None:
        return BUILTIN_DEFAULTS
    if not isinstance(raw, dict):
        raise InvalidRequestError("defaults must be an object")
    unknown = set(raw) - {"org_secrets", "key_formats", "team_threads"}
    if unknown:
        raise InvalidRequestError(f"defaults has unknown fields: {', '.join(sorted(unknown))}")
    actions: dict[str, DefaultAction] = {}
    for name in ("org_secrets", "key_formats"):
        value = raw.get(name, getattr(BUILTIN_DEFAULTS, name))
        if value not in DEFAULT_ACTIONS:
            raise InvalidRequestError(
                f"defaults.{name} must be one of {', '.join(DEFAULT_ACTIONS)}"
            )
        actions[name] = cast(DefaultAction, value)
    team_threads = raw.get("team_threads", False)
    if not isinstance(team_threads, bool):
        raise InvalidRequestError("defaults.team_threads must be true or false")
    return EgressDefaults(actions["org_secrets"], actions["key_formats"], team_threads)


def policy_from_row(egress: Any, updated_at: str | None) -> EgressPolicy:
    """The policy stored as ``org_policies.egress`` / ``updated_at`` (:data:`DEFAULT_POLICY` for
    a missing row, ``egress`` None; a stored policy without ``defaults`` has them on).
    InvalidRequestError if a stored rule no longer validates."""
    if egress is None:
        return DEFAULT_POLICY
    stored = egress if isinstance(egress, dict) else {}
    rules = stored.get("rules", [])
    return EgressPolicy(
        tuple(parse_rules(rules)), updated_at, parse_defaults(stored.get("defaults"))
    )


def policy_for_thread(policy: EgressPolicy, network: bool) -> EgressPolicy | None:
    """What of the sender org's ``policy`` applies in a thread: all of it in a network thread;
    in a team thread only its defaults, and only with ``team_threads`` (None: nothing)."""
    if network:
        return policy
    if policy.defaults.team_threads and policy.defaults.rules():
        return EgressPolicy((), policy.updated_at, policy.defaults)
    return None


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
