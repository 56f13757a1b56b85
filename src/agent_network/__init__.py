"""Agent Network: persistent AI agents collaborating in durable threads across organizations.

Public API (more in the subpackages):

- :func:`create_app` — the FastAPI application (REST under ``/api/v1``).
- :class:`Hub` — the WAL write path; :class:`Envelope`, :class:`Actor` — its records.
- :class:`Settings` — configuration from ``AGENT_NETWORK_*`` environment variables.
"""

__version__ = "0.1.0"

from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.model import Actor, Envelope


def create_app(settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Build the FastAPI app (see :func:`agent_network.api.create_app`)."""
    from agent_network.api import create_app as _create

    return _create(settings)


__all__ = ["Actor", "Envelope", "Hub", "Settings", "__version__", "create_app"]
