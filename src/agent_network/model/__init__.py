"""Records shared by every layer: ids, actors, envelopes."""

from agent_network.model.envelope import GENESIS_HASH, Actor, Envelope, envelope_hash
from agent_network.model.ids import new_id, now_iso

__all__ = ["GENESIS_HASH", "Actor", "Envelope", "envelope_hash", "new_id", "now_iso"]
