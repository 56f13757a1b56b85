"""The hub: append path, fold, subscriptions."""

from agent_network.hub.fold import (
    DEFAULT_AGENT_BUDGET,
    EV_BUDGET_SET,
    EV_MESSAGE,
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_CLOSED,
    EV_THREAD_CREATED,
    EV_VISIBILITY_SET,
    ThreadState,
    fold,
    step,
)
from agent_network.hub.hub import Hub, HubClosedError, Subscription, VerifyReport

__all__ = [
    "DEFAULT_AGENT_BUDGET",
    "EV_BUDGET_SET",
    "EV_MESSAGE",
    "EV_PARTICIPANTS_ADDED",
    "EV_THREAD_CLOSED",
    "EV_THREAD_CREATED",
    "EV_VISIBILITY_SET",
    "Hub",
    "HubClosedError",
    "Subscription",
    "ThreadState",
    "VerifyReport",
    "fold",
    "step",
]
