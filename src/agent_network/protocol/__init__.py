"""The thread protocol, pure: no store, no hub, no clock, no I/O (the ``protocol`` layer of
docs/architecture.md).

- :mod:`~agent_network.protocol.events`: the envelope types (``EV_*``);
- :mod:`~agent_network.protocol.knobs`: statuses, close reasons, marks, expectations, knobs and
  the parsing of ``thread.created`` data;
- :mod:`~agent_network.protocol.state` and :mod:`~agent_network.protocol.fold`: a thread's state
  as a fold of its envelopes;
- :mod:`~agent_network.protocol.lifecycle`: what may be appended (admission, speaking rights);
- :mod:`~agent_network.protocol.turns`: whom an envelope makes take a turn;
- :mod:`~agent_network.protocol.deadlines`: which deadline falls due and what it calls for;
- :mod:`~agent_network.protocol.adapters`: the thread adapters (``open``, ``conversation``,
  ``consulting``, ``discussion``, ``workflow`` with its :class:`TransitionGraph`); add your own
  with :func:`register_adapter`.

This package is the public home of these names (``from agent_network.protocol import
reply_within, tool_call, Handoff, ...``).
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
from agent_network.protocol.adapters.graph import (
    AgentTarget,
    Always,
    Condition,
    ContextEquals,
    Finish,
    FromSpeaker,
    GraphError,
    Handoff,
    RevertToInitiatorTarget,
    RoundRobinTarget,
    StayTarget,
    Target,
    Terminated,
    TerminateTarget,
    ToolCalled,
    ToolSpec,
    Transition,
    TransitionGraph,
    Turn,
    parse_tool_calls,
    register_condition,
    register_target,
    tool_call,
)
from agent_network.protocol.adapters.open import OpenAdapter
from agent_network.protocol.adapters.workflow import WorkflowAdapter, WorkflowState, tools_for
from agent_network.protocol.deadlines import Due, due_now, needs_sweep, next_due
from agent_network.protocol.events import (
    EV_BUDGET_SET,
    EV_CONTEXT_SET,
    EV_EXPECTATION_VIOLATED,
    EV_MESSAGE,
    EV_NOTIFY,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
    EV_THREAD_REJECT,
    EV_VISIBILITY_SET,
)
from agent_network.protocol.fold import fold, step
from agent_network.protocol.knobs import (
    EXPECTATION_KINDS,
    HANDLERS,
    STATUS_ACTIVE,
    STATUS_CLOSED,
    STATUS_CLOSING,
    STATUS_INVITED,
    STATUS_OPEN,
    Expectation,
    Knobs,
    Mark,
    OpenRequest,
    acks_within,
    max_silence,
    reply_within,
    turn_within,
)
from agent_network.protocol.lifecycle import admit, check_created, may_speak, thread_created_data
from agent_network.protocol.state import DEFAULT_AGENT_BUDGET, ThreadState
from agent_network.protocol.turns import turn_takers, visible_to

__all__ = [
    "DEFAULT_AGENT_BUDGET",
    "EV_BUDGET_SET",
    "EV_CONTEXT_SET",
    "EV_EXPECTATION_VIOLATED",
    "EV_MESSAGE",
    "EV_NOTIFY",
    "EV_PARTICIPANTS_ADDED",
    "EV_THREAD_ACK",
    "EV_THREAD_CLOSED",
    "EV_THREAD_CLOSING",
    "EV_THREAD_CREATED",
    "EV_THREAD_REJECT",
    "EV_VISIBILITY_SET",
    "EXPECTATION_KINDS",
    "HANDLERS",
    "STATUS_ACTIVE",
    "STATUS_CLOSED",
    "STATUS_CLOSING",
    "STATUS_INVITED",
    "STATUS_OPEN",
    "Adapter",
    "AgentTarget",
    "Always",
    "BaseAdapter",
    "Condition",
    "ConsultingAdapter",
    "ConsultingState",
    "ContextEquals",
    "ConversationAdapter",
    "DiscussionAdapter",
    "DiscussionState",
    "Due",
    "Expectation",
    "Finish",
    "FromSpeaker",
    "GraphError",
    "Handoff",
    "Knobs",
    "Mark",
    "OpenAdapter",
    "OpenRequest",
    "Proposal",
    "RevertToInitiatorTarget",
    "RoundRobinTarget",
    "StayTarget",
    "Target",
    "TerminateTarget",
    "Terminated",
    "ThreadState",
    "ToolCalled",
    "ToolSpec",
    "Transition",
    "TransitionGraph",
    "Turn",
    "WorkflowAdapter",
    "WorkflowState",
    "acks_within",
    "adapter_names",
    "admit",
    "check_created",
    "due_now",
    "fold",
    "get_adapter",
    "max_silence",
    "may_speak",
    "needs_sweep",
    "next_due",
    "parse_tool_calls",
    "register_adapter",
    "register_condition",
    "register_target",
    "reply_within",
    "step",
    "thread_created_data",
    "tool_call",
    "tools_for",
    "turn_takers",
    "turn_within",
    "visible_to",
]
