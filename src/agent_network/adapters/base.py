"""Adapter protocol and registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent_network.errors import InvalidRequestError
from agent_network.model.envelope import Actor

if TYPE_CHECKING:
    from agent_network.hub.fold import ThreadState


@dataclass(frozen=True, slots=True)
class Proposal:
    """An envelope a client proposes, before the hub stamps it."""

    type: str
    data: dict[str, Any]
    sender: Actor
    audience: list[str] | None = None


class Adapter(Protocol):
    """``validate`` raises an :class:`~agent_network.errors.AgentNetworkError` to refuse."""

    name: str

    def validate(self, state: ThreadState, proposal: Proposal) -> None: ...


_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    """Make ``adapter`` available to threads under ``adapter.name``."""
    _REGISTRY[adapter.name] = adapter


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``; raises InvalidRequestError for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidRequestError(f"unknown adapter {name!r}; known adapters: {known}") from None
