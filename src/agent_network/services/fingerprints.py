"""Keyed fingerprints of an org's stored secrets, and the detector that finds them in text.

The egress default (services/policy.py) must recognise an org's own secrets in an outgoing
message without the server keeping their plaintext around. So when a secret is written
(``SecretService.put``), the server derives its **forms** — the exact value and a fixed set of
simple encodings (:func:`secret_forms`) — and stores for each form only keyed MACs
(:func:`fingerprint`): the MAC of the whole form and the MACs of its first
:data:`MAX_STRIDE` :data:`ANCHOR`-character windows ("anchors"). The plaintext is then dropped;
a :class:`SecretIndex` built from the stored records holds MACs and the org's MAC key only.

Forms (:data:`ENCODINGS`), each of the value and, when it differs, of the value stripped of
surrounding whitespace, deduplicated: ``plain``; ``base64`` and ``base64url`` (RFC 4648 §4/§5
of the UTF-8 bytes), each padded and unpadded; ``hex`` in lower and upper case; ``url``
(percent-encoding, ``quote(value, safe="")``) and ``url_plus`` (form encoding, spaces as
``+``). Values shorter than :data:`MIN_SECRET_CHARS` characters are not fingerprinted (they
would match ordinary words). Not covered: other encodings (reversed, ROT13, JSON escapes, a
secret re-encoded inside a longer base64 blob at another alignment), and any change of the value
(case, line breaks).

Detection (:meth:`SecretIndex.find`): a form of length ``L`` occurring at position ``j`` of the
text covers every window start in ``[j, j + L - ANCHOR]``; the index samples windows every
``stride`` characters, where ``stride`` is the smallest ``min(MAX_STRIDE, L - ANCHOR + 1)`` over
its forms, so some sampled window lies at an offset ``o < stride`` inside the occurrence, and
the anchor stored for offset ``o`` finds it. Each anchor hit proposes a start ``p - o`` that is
confirmed by the MAC of the whole candidate substring. So every occurrence of every form is
found, also with no separator around it; a false positive needs a collision of 128-bit keyed
BLAKE2b MACs (probability about ``2**-128`` per candidate). Cost: ``len(text) / stride`` keyed
hashes of :data:`ANCHOR` characters (about 1 µs each), plus one MAC of ``L`` characters per
anchor hit; nothing for an org without secrets.

MACs are keyed BLAKE2b (RFC 7693 keyed mode, a PRF), with a key per org derived from the
server's secret key (:func:`org_key`): a copy of the database alone reveals nothing about a
secret, and equal secrets of two orgs do not have equal fingerprints. BLAKE2b rather than
HMAC-SHA256 because one keyed BLAKE2b call of 8 bytes costs half of an HMAC call in CPython,
and the scan makes one call per sampled window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

FORMAT_VERSION = 1
MIN_SECRET_CHARS = 8  # shorter values are not fingerprinted
ANCHOR = 8  # characters of one anchor window (= MIN_SECRET_CHARS: every form has one)
MAX_STRIDE = 16  # anchors stored per form; the scan's widest step
ENCODINGS = (
    "plain",
    "base64",
    "base64_nopad",
    "base64url",
    "base64url_nopad",
    "hex",
    "hex_upper",
    "url",
    "url_plus",
)

_ANCHOR_PERSON = b"an-egress-anchor"
_FORM_PERSON = b"an-egress-form"


def _bytes(text: str) -> bytes:
    # lone surrogates can arrive in JSON strings; encode them rather than fail
    return text.encode("utf-8", "surrogatepass")


def org_key(master: bytes, org_id: str) -> bytes:
    """The fingerprint key of ``org_id``: HMAC-SHA256(master, ``"org:" + org_id``)."""
    return hmac.new(master, b"org:" + org_id.encode(), hashlib.sha256).digest()


def key_id(master: bytes) -> str:
    """A short public name of the master fingerprint key (records made with another key are
    recomputed)."""
    return hmac.new(master, b"key-id", hashlib.sha256).hexdigest()[:16]


def _anchor(key: bytes, window: str) -> bytes:
    return hashlib.blake2b(_bytes(window), key=key, digest_size=8, person=_ANCHOR_PERSON).digest()


def _mac(key: bytes, form: str) -> bytes:
    return hashlib.blake2b(_bytes(form), key=key, digest_size=16, person=_FORM_PERSON).digest()


def secret_forms(value: str) -> list[tuple[str, str]]:
    """``[(encoding, form)]`` of a secret value (see the module docstring), each form once (the
    first encoding producing it names it); [] when the value is shorter than
    :data:`MIN_SECRET_CHARS` characters, also after stripping."""
    found: dict[str, str] = {}
    if len(value.strip()) < MIN_SECRET_CHARS:
        return []
    for base in [value] if value.strip() == value else [value, value.strip()]:
        raw = _bytes(base)
        b64 = base64.b64encode(raw).decode()
        url64 = base64.urlsafe_b64encode(raw).decode()
        for encoding, form in (
            ("plain", base),
            ("base64", b64),
            ("base64_nopad", b64.rstrip("=")),
            ("base64url", url64),
            ("base64url_nopad", url64.rstrip("=")),
            ("hex", raw.hex()),
            ("hex_upper", raw.hex().upper()),
            ("url", quote(raw, safe="")),
            ("url_plus", quote_plus(raw, safe="")),
        ):
            found.setdefault(form, encoding)
    return [(encoding, form) for form, encoding in found.items()]


def fingerprint(master: bytes, org_id: str, value: str) -> dict[str, Any]:
    """The stored fingerprint record of one secret value of ``org_id`` (JSON-ready):
    ``{"v", "kid", "forms": [{"enc", "len", "mac", "anchors"}]}`` — MACs in hex, never the
    value. ``forms`` is empty for a value too short to match (:data:`MIN_SECRET_CHARS`)."""
    key = org_key(master, org_id)
    forms = []
    for encoding, form in secret_forms(value):
        offsets = range(min(MAX_STRIDE, len(form) - ANCHOR + 1))
        forms.append(
            {
                "enc": encoding,
                "len": len(form),
                "mac": _mac(key, form).hex(),
                "anchors": [_anchor(key, form[o : o + ANCHOR]).hex() for o in offsets],
            }
        )
    return {"v": FORMAT_VERSION, "kid": key_id(master), "forms": forms}


def is_current(record: Any, master: bytes) -> bool:
    """Whether a stored record is of this format and key (else it is recomputed)."""
    return (
        isinstance(record, Mapping)
        and record.get("v") == FORMAT_VERSION
        and record.get("kid") == key_id(master)
        and isinstance(record.get("forms"), list)
    )


@dataclass(frozen=True, slots=True)
class SecretMatch:
    """One occurrence of a stored secret in a text: ``[start, end)`` (character offsets), which
    secret (``agent_id``, ``name``) and in which ``encoding``."""

    start: int
    end: int
    agent_id: str
    name: str
    encoding: str


@dataclass(frozen=True, slots=True)
class _Form:
    agent_id: str
    name: str
    encoding: str
    length: int
    mac: bytes


class SecretIndex:
    """The fingerprints of one org's secrets, ready to scan texts (see the module docstring).

    Built from ``(agent_id, name, record)`` triples (records from :func:`fingerprint`, made
    with the same ``master`` key and ``org_id``). Holds the org's MAC key and MACs only.
    """

    def __init__(
        self, master: bytes, org_id: str, secrets: Iterable[tuple[str, str, Mapping[str, Any]]]
    ) -> None:
        self._key = org_key(master, org_id)
        self._forms: list[_Form] = []
        self._anchors: dict[bytes, list[tuple[int, int]]] = {}
        stride = MAX_STRIDE
        for agent_id, name, record in secrets:
            for entry in record.get("forms", []):
                length = int(entry["len"])
                if length < ANCHOR:
                    continue
                index = len(self._forms)
                self._forms.append(
                    _Form(agent_id, name, str(entry["enc"]), length, bytes.fromhex(entry["mac"]))
                )
                anchors = entry["anchors"]
                stride = min(stride, len(anchors))
                for offset, anchor in enumerate(anchors):
                    self._anchors.setdefault(bytes.fromhex(anchor), []).append((index, offset))
        self.stride = max(1, stride)

    def __len__(self) -> int:
        """How many forms (of all secrets) the index holds."""
        return len(self._forms)

    def find(self, text: str) -> list[SecretMatch]:
        """Every occurrence of every form in ``text``, ordered by start (then longest first),
        without an occurrence lying inside a longer one of the same secret (the unpadded base64
        inside the padded one). Pure; ``len(text) / stride`` anchor hashes plus one MAC per
        anchor hit."""
        n = len(text)
        if not self._forms or n < ANCHOR:
            return []
        key, anchors, forms = self._key, self._anchors, self._forms
        tried: set[tuple[int, int]] = set()
        found: list[SecretMatch] = []
        for p in range(0, n - ANCHOR + 1, self.stride):
            hits = anchors.get(_anchor(key, text[p : p + ANCHOR]))
            if not hits:
                continue
            for index, offset in hits:
                start = p - offset
                form = forms[index]
                end = start + form.length
                if start < 0 or end > n or (index, start) in tried:
                    continue
                tried.add((index, start))
                if hmac.compare_digest(_mac(key, text[start:end]), form.mac):
                    found.append(SecretMatch(start, end, form.agent_id, form.name, form.encoding))
        found.sort(key=lambda m: (m.start, -m.end))
        kept: list[SecretMatch] = []
        reach: dict[tuple[str, str], int] = {}  # per secret, the furthest end kept so far
        for m in found:  # by start: m lies inside a kept match iff one of them reaches m.end
            if reach.get((m.agent_id, m.name), -1) < m.end:
                kept.append(m)
                reach[(m.agent_id, m.name)] = m.end
        return kept
