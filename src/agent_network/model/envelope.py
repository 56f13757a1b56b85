"""The envelope: the one record of a thread's WAL, and its hash chain.

An envelope is stamped by the hub (``id``, ``seq``, ``created_at``, ``prev_hash``, ``hash``);
clients only propose ``type``, ``data``, ``audience``, ``causation_id`` and ``idempotency_key``.
The hash chain follows the usual construction of an append-only log (each record commits to its
predecessor's digest, as in Certificate Transparency / git): ``hash = sha256(canonical JSON of
every field except hash)``, with ``prev_hash`` of the first envelope = 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

GENESIS_HASH = "0" * 64

SenderKind = Literal["agent", "user", "system"]


@dataclass(frozen=True, slots=True)
class Sender:
    """Who an envelope is from: ``kind`` (agent/user/system), ``id`` and its ``org_id``.

    ``name`` is display-only and never hashed or stored in the envelope.
    """

    kind: SenderKind
    id: str
    org_id: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One hub-stamped event in one thread (see module docstring for the hash)."""

    thread_id: str
    seq: int
    id: str
    type: str
    data: dict[str, Any]
    sender_kind: str
    sender_id: str
    sender_org_id: str
    audience: list[str] | None
    causation_id: str | None
    idempotency_key: str | None
    created_at: str
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-ready)."""
        return asdict(self)


def sender_scoped_key(sender_id: str, key: str) -> str:
    """The stored form of a client's idempotency key: ``<sender_id>:<key>``.

    Client keys are scoped to their sender (as payment APIs scope them to an account), so no
    client can occupy another sender's key nor a key the system uses itself (``reply:…``,
    ``network_closed``): every stored client key starts with an ``agt_``/``usr_`` id.
    """
    return f"{sender_id}:{key}"


def client_key(sender_id: str, stored: str | None) -> str | None:
    """The key as its sender gave it: a client key without its ``<sender_id>:`` scope; a system
    key (``reply:…``) unchanged; None stays None."""
    prefix = f"{sender_id}:"
    if stored is not None and stored.startswith(prefix):
        return stored[len(prefix) :]
    return stored


def envelope_hash(
    *,
    thread_id: str,
    seq: int,
    id: str,
    type: str,
    data: dict[str, Any],
    sender_kind: str,
    sender_id: str,
    sender_org_id: str,
    audience: list[str] | None,
    causation_id: str | None,
    idempotency_key: str | None,
    created_at: str,
    prev_hash: str,
) -> str:
    """SHA-256 hex digest of the canonical JSON array of the envelope's fields (hash excluded)."""
    payload = json.dumps(
        [
            thread_id,
            seq,
            id,
            type,
            data,
            sender_kind,
            sender_id,
            sender_org_id,
            audience,
            causation_id,
            idempotency_key,
            created_at,
            prev_hash,
        ],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
