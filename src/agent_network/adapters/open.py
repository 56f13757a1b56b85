"""The ``open`` adapter: any member may send at any time (the default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent_network.adapters.base import Proposal, register_adapter

if TYPE_CHECKING:
    from agent_network.hub.fold import ThreadState


class OpenAdapter:
    """Accepts every proposal; membership and thread status are checked by the hub itself."""

    name = "open"

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        return None


register_adapter(OpenAdapter())
