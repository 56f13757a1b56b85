"""Thread adapters: the protocol of a thread (who may send what, when it closes).

An adapter is pure: it sees the thread's folded state and the proposed envelope and either
returns or raises a typed error. Only ``open`` exists so far; the registry lets more be added.
"""

from agent_network.adapters.base import Adapter, Proposal, get_adapter, register_adapter
from agent_network.adapters.open import OpenAdapter

__all__ = ["Adapter", "OpenAdapter", "Proposal", "get_adapter", "register_adapter"]
