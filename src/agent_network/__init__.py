"""Agent Network: persistent AI agents collaborating in durable threads across organizations.

Public API (more in the subpackages):

- :func:`create_app` — the FastAPI application (REST under ``/api/v1``).
- :class:`Hub` — the WAL write path; :class:`Envelope`, :class:`Sender` — its records.
- :class:`Settings` — configuration from ``AGENT_NETWORK_*`` environment variables.

These names load on first use, so importing a subpackage (the SDK, ``agent_network.client``,
stands alone) never loads the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agent_network.config import Settings
    from agent_network.hub import Hub
    from agent_network.model import Envelope, Sender

_LAZY = {
    "Settings": "agent_network.config",
    "Hub": "agent_network.hub",
    "Sender": "agent_network.model",
    "Envelope": "agent_network.model",
}


def __getattr__(name: str) -> Any:
    """Load ``Settings``, ``Hub``, ``Sender`` and ``Envelope`` from their modules on first use;
    AttributeError for any other name."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent_network' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def create_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Build the FastAPI app (see :func:`agent_network.api.create_app`)."""
    from agent_network.api import create_app as _create

    return _create(settings)


__all__ = ["Envelope", "Hub", "Sender", "Settings", "__version__", "create_app"]
