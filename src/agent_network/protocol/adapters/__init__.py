"""Thread adapters: the protocol of a thread (who may send what, when it closes).

An adapter is pure: it sees the thread's folded state and the proposed envelope and either
returns or raises a typed error before anything is written; its own state is a fold of the
thread's WAL. Built in: ``open`` (the default), ``conversation``, ``consulting``,
``discussion`` and ``workflow`` (driven by a :class:`~agent_network.protocol.adapters.graph.
TransitionGraph`). Importing this package registers them all. Add your own with
:func:`register_adapter` (see its docstring for an example).
"""

from agent_network.protocol.adapters.base import (
    Adapter,
    BaseAdapter,
    Proposal,
    adapter_names,
    get_adapter,
    register_adapter,
)
from agent_network.protocol.adapters.consulting import ConsultingAdapter, ConsultingState
from agent_network.protocol.adapters.conversation import ConversationAdapter
from agent_network.protocol.adapters.discussion import DiscussionAdapter, DiscussionState
from agent_network.protocol.adapters.open import OpenAdapter
from agent_network.protocol.adapters.workflow import WorkflowAdapter, WorkflowState, tools_for

__all__ = [
    "Adapter",
    "BaseAdapter",
    "ConsultingAdapter",
    "ConsultingState",
    "ConversationAdapter",
    "DiscussionAdapter",
    "DiscussionState",
    "OpenAdapter",
    "Proposal",
    "WorkflowAdapter",
    "WorkflowState",
    "adapter_names",
    "get_adapter",
    "register_adapter",
    "tools_for",
]
