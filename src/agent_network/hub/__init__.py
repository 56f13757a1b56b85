"""The hub: append path, subscriptions, deadline sweeper (the pure thread protocol it applies
is :mod:`agent_network.protocol`)."""

from agent_network.hub.hub import (
    AccessChangedError,
    Hub,
    HubClosedError,
    Subscription,
    VerifyReport,
)
from agent_network.hub.sweeper import HUB_SENDER_ID, Sweeper, SweptHub

__all__ = [
    "HUB_SENDER_ID",
    "AccessChangedError",
    "Hub",
    "HubClosedError",
    "Subscription",
    "Sweeper",
    "SweptHub",
    "VerifyReport",
]
