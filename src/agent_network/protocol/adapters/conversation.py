"""The ``conversation`` adapter: exactly two participants, free turns.

Either side may send a message at any time; the thread ends by an explicit close
(``thread.closing``) or by its TTL (``ttl_expired``).
"""

from __future__ import annotations

from agent_network.protocol.adapters.base import BaseAdapter, register_adapter


class ConversationAdapter(BaseAdapter):
    """Two participants, no turn order (membership is checked by the lifecycle rules)."""

    name = "conversation"
    min_participants = 2
    max_participants: int | None = 2


register_adapter(ConversationAdapter())
