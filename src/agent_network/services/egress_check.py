"""Egress checks: the built-in detectors (e-mail, card numbers, key formats, the org's own
secrets) and the pure checks of a message against an egress policy (no I/O, no audit).

Cost: every built-in detector is linear in the message length (matches may only start at a token
boundary and every repetition is bounded or unambiguous). What the policy means:
``services/policy.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from agent_network.services.egress_rules import (
    ORG_SECRETS,
    EgressMatch,
    EgressPolicy,
    EgressRefusedError,
    EgressResult,
    EgressRule,
)
from agent_network.services.fingerprints import SecretIndex

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
