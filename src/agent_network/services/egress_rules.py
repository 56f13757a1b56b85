"""Egress rules: the model of an org's egress policy (rules, default detectors, matches,
results, the refusal error) and the validation of what an org sends as its policy.

A ``regex`` rule is accepted only if it compiles, is at most :data:`MAX_PATTERN` characters,
cannot match the empty string, has no back-references and no nested unbounded quantifier such as
``(a+)+``, and — since Python's ``re`` has no timeout and a backtracking search holds the event
loop — if a probe in a separate process (killed after :data:`PROBE_SECONDS`) finds it fast on
:data:`PROBE_SIZE`-character adversarial inputs built from its own characters (each search under
:data:`PROBE_INPUT_LIMIT` seconds). What the policy means: ``services/policy.py``.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from agent_network.errors import AgentNetworkError, InvalidRequestError

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
    """One rule of an egress policy (what rules mean: services/policy.py)."""

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
    """The built-in detectors of every org's policy (services/policy.py): the action of
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
