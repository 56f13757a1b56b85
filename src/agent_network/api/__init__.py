"""HTTP API (FastAPI)."""

from agent_network.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
