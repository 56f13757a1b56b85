"""Check a thread's hash chain on the client, from what the API returns.

```python
from agent_network.client import AsyncClient, verify_chain

async with AsyncClient(url, token) as client:
    report = verify_chain([e async for e in client.threads.chain(thread_id)])
    assert report.ok, (report.first_bad_seq, report.reason)
```

This module recomputes every hash itself from the specification in ``docs/security.md`` ("The
hash chain, byte for byte") and imports nothing of the server: it is an independent check of
what the server says. Every envelope of a thread commits to its predecessor:

    hash = lowercase hex SHA-256 of the UTF-8 bytes of the JSON array
        [thread_id, seq, id, type, data, sender_kind, sender_id, sender_org_id, audience,
         causation_id, idempotency_key (as stored), created_at (as stored), prev_hash]
    serialised with sorted object keys, no whitespace (separators "," and ":") and non-ASCII
    characters written as themselves (not \\u escapes)

and ``prev_hash`` of seq 1 is 64 zeros. An envelope the reader's audience hides arrives as a
stub (``thread_id``, ``seq``, ``hash``, ``prev_hash``, ``"stub": true``): its hash cannot be
recomputed, but it must link to its neighbours, so a reader still checks the whole chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_network.client.models import Envelope, EnvelopeStub

GENESIS_HASH = "0" * 64
"""``prev_hash`` of a thread's first envelope."""

HASHED_FIELDS = (
    "thread_id",
    "seq",
    "id",
    "type",
    "data",
    "sender_kind",
    "sender_id",
    "sender_org_id",
    "audience",
    "causation_id",
    "idempotency_key",
    "created_at",
    "prev_hash",
)
"""The hash input, in order (see :func:`hash_input`)."""


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of :func:`verify_chain`.

    ``ok``: the chain holds; ``checked``: envelopes looked at (whole ones and stubs) up to the
    first break; ``stubs``: how many of them were stubs (hashes taken on trust, linkage
    checked); ``first_bad_seq``: the first seq that does not verify (for a missing envelope:
    the seq expected there), None when ``ok``; ``reason``: why, None when ``ok``;
    ``last_hash``: the hash of the last envelope checked (pin it to detect a later rewrite or
    truncation of the history); ``thread_id``: the thread of the envelopes, None when there
    were none.
    """

    ok: bool
    checked: int
    stubs: int = 0
    first_bad_seq: int | None = None
    reason: str | None = None
    last_hash: str | None = None
    thread_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "thread_id": self.thread_id,
            "ok": self.ok,
            "checked": self.checked,
            "stubs": self.stubs,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "last_hash": self.last_hash,
        }


class _Malformed(ValueError):
    """An item lacks a field of the hash input (or has one of the wrong type)."""


def canonical_json(value: Any) -> str:
    """``value`` as the hash input's JSON text: sorted keys, separators ``","``/``":"``,
    non-ASCII characters as themselves (``ensure_ascii=False``), ``None`` as ``null``."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def envelope_digest(fields: Mapping[str, Any]) -> str:
    """The hash of an envelope given its hashed fields by name (:data:`HASHED_FIELDS`):
    lowercase hex SHA-256 of the UTF-8 bytes of :func:`canonical_json` of the list of their
    values in that order. KeyError for a missing field."""
    payload = canonical_json([fields[name] for name in HASHED_FIELDS])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def is_stub(item: Envelope | EnvelopeStub | Mapping[str, Any]) -> bool:
    """Whether ``item`` (an SDK model or an API dict) is the stub of a hidden envelope."""
    if isinstance(item, EnvelopeStub):
        return True
    if isinstance(item, Envelope):
        return False
    return item.get("stub") is True


def hash_input(item: Envelope | Mapping[str, Any]) -> dict[str, Any]:
    """The hashed fields (:data:`HASHED_FIELDS`) of a whole envelope, as the API renders it
    (a dict) or as the SDK parsed it (:class:`Envelope`): ``sender_kind``/``sender_id``/
    ``sender_org_id`` from ``sender``, the idempotency key as stored
    (``stored_idempotency_key``; a server that does not send it: ``idempotency_key``) and
    ``created_at`` as sent. ValueError when a field is missing or has the wrong type."""
    if isinstance(item, Envelope):
        stored_key = (
            item.stored_idempotency_key
            if "stored_idempotency_key" in item.model_fields_set
            else item.idempotency_key
        )
        return {
            "thread_id": item.thread_id,
            "seq": item.seq,
            "id": item.id,
            "type": item.type,
            "data": item.data,
            "sender_kind": item.sender.kind,
            "sender_id": item.sender.id,
            "sender_org_id": item.sender.org_id,
            "audience": item.audience,
            "causation_id": item.causation_id,
            "idempotency_key": stored_key,
            "created_at": item.wire_created_at,
            "prev_hash": item.prev_hash,
        }
    try:
        sender = item["sender"]
        fields = {
            "thread_id": item["thread_id"],
            "seq": item["seq"],
            "id": item["id"],
            "type": item["type"],
            "data": item["data"],
            "sender_kind": sender["kind"],
            "sender_id": sender["id"],
            "sender_org_id": sender["org_id"],
            "audience": item["audience"],
            "causation_id": item["causation_id"],
            "idempotency_key": item.get("stored_idempotency_key", item.get("idempotency_key")),
            "created_at": item["created_at"],
            "prev_hash": item["prev_hash"],
        }
    except (KeyError, TypeError) as exc:
        raise _Malformed(f"lacks the hashed field {exc}") from None
    return fields


def _check_shape(fields: Mapping[str, Any]) -> None:
    strings = ("thread_id", "id", "type", "sender_kind", "sender_id", "sender_org_id")
    for name in (*strings, "created_at", "prev_hash"):
        if not isinstance(fields[name], str):
            raise _Malformed(f"{name} is not a string")
    if not isinstance(fields["data"], dict):
        raise _Malformed("data is not an object")
    audience = fields["audience"]
    if audience is not None and not (
        isinstance(audience, list) and all(isinstance(a, str) for a in audience)
    ):
        raise _Malformed("audience is neither null nor a list of strings")
    for name in ("causation_id", "idempotency_key"):
        if fields[name] is not None and not isinstance(fields[name], str):
            raise _Malformed(f"{name} is neither null nor a string")


def _link(item: Envelope | EnvelopeStub | Mapping[str, Any]) -> tuple[str, int, str, str]:
    """``(thread_id, seq, hash, prev_hash)`` of any item; ValueError when one is missing."""
    if isinstance(item, EnvelopeStub):
        return item.thread_id, item.seq, item.hash, item.prev_hash
    if isinstance(item, Envelope):
        if item.hash is None or item.prev_hash is None:
            raise _Malformed("has no hash or prev_hash")
        return item.thread_id, item.seq, item.hash, item.prev_hash
    try:
        link = (item["thread_id"], item["seq"], item["hash"], item["prev_hash"])
    except KeyError as exc:
        raise _Malformed(f"lacks the field {exc}") from None
    thread_id, seq, digest, prev = link
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise _Malformed("seq is not an integer")
    if not all(isinstance(v, str) for v in (thread_id, digest, prev)):
        raise _Malformed("thread_id, hash or prev_hash is not a string")
    return thread_id, seq, digest, prev


def verify_chain(
    envelopes: Iterable[Envelope | EnvelopeStub | Mapping[str, Any]],
    *,
    after: int = 0,
    prev_hash: str = GENESIS_HASH,
) -> ChainReport:
    """Check the hash chain of one thread's envelopes, in the order given, locally.

    ``envelopes``: SDK :class:`Envelope`/:class:`EnvelopeStub` models or the API's dicts (REST
    page items, WebSocket ``envelope`` frames' ``envelope``), e.g. from
    ``client.threads.chain(thread_id)`` or :meth:`Room.entries`. By default they must start at
    seq 1 with ``prev_hash`` 64 zeros; to check a continuation give the seq (``after``) and the
    hash (``prev_hash``) of the last envelope already verified.

    Checks, for each item: it belongs to the same thread as the first; its seq is the next one
    (no gap, no repeat, no reordering); its ``prev_hash`` is the previous item's ``hash``; and,
    for a whole envelope, that recomputing its hash from its fields
    (:func:`hash_input`, :func:`envelope_digest`) gives its ``hash``. A stub's own hash cannot
    be recomputed: the next item's ``prev_hash`` still has to match it.

    Returns a :class:`ChainReport`: ``ok`` with the count checked, or the first bad seq and
    the reason (a malformed item is a break too, not an exception). TypeError for an item that
    is neither a model nor a mapping.
    """
    expected_prev = prev_hash
    thread_id: str | None = None
    checked = stubs = 0
    seq = after

    def broken(at: int, reason: str) -> ChainReport:
        return ChainReport(
            False, checked, stubs, at, reason, expected_prev if checked else None, thread_id
        )

    for item in envelopes:
        if not isinstance(item, Envelope | EnvelopeStub | Mapping):
            raise TypeError(f"verify_chain takes envelopes or dicts, not {type(item).__name__}")
        expected = seq + 1
        try:
            tid, got_seq, digest, prev = _link(item)
        except _Malformed as exc:
            return broken(expected, f"the envelope after seq {seq} {exc}")
        if thread_id is None:
            thread_id = tid
        elif tid != thread_id:
            return broken(expected, f"seq {got_seq} belongs to thread {tid}, not {thread_id}")
        if got_seq != expected:
            return broken(expected, f"expected seq {expected}, found seq {got_seq}")
        if prev != expected_prev:
            return broken(
                expected,
                f"prev_hash of seq {expected} is {prev}, but the hash before it is {expected_prev}",
            )
        if is_stub(item):
            stubs += 1
        else:
            assert not isinstance(item, EnvelopeStub)
            try:
                fields = hash_input(item)
                _check_shape(fields)
            except _Malformed as exc:
                return broken(expected, f"seq {expected} {exc}")
            recomputed = envelope_digest(fields)
            if recomputed != digest:
                return broken(
                    expected,
                    f"seq {expected}: its fields hash to {recomputed}, but its hash is {digest}",
                )
        checked += 1
        seq = expected
        expected_prev = digest
    return ChainReport(
        True, checked, stubs, None, None, expected_prev if checked else None, thread_id
    )


__all__ = [
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "ChainReport",
    "canonical_json",
    "envelope_digest",
    "hash_input",
    "is_stub",
    "verify_chain",
]
