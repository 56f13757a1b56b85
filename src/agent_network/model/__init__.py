"""Records shared by every layer: ids, actors, envelopes."""

from agent_network.model.envelope import (
    GENESIS_HASH,
    Envelope,
    Sender,
    client_key,
    envelope_hash,
    sender_scoped_key,
)
from agent_network.model.ids import new_id, now_iso

__all__ = [
    "GENESIS_HASH",
    "Envelope",
    "Sender",
    "client_key",
    "envelope_hash",
    "new_id",
    "now_iso",
    "sender_scoped_key",
]
