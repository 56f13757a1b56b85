"""The ``open`` adapter: any member may send anything at any time (the default).

Membership of open threads is checked by the services (team and network members, restricted
participants); the hub only checks status and the runaway budget, exactly as before protocols.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_network.protocol.adapters.base import BaseAdapter, Proposal, register_adapter

if TYPE_CHECKING:
    from agent_network.protocol.state import ThreadState


class OpenAdapter(BaseAdapter):
    """Accepts every proposal; no participant list is needed."""

    name = "open"
    min_participants = 0

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        """Accept everything (status and budget are the hub's business)."""
        return None


register_adapter(OpenAdapter())
