"""Serving the app: a uvicorn server that shuts realtime connections down cleanly."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from agent_network.services.realtime import RealtimeService


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown first runs :meth:`RealtimeService.shutdown` of the app
    (``config.app`` must be an app built by ``create_app``), so WebSocket clients get
    ``disconnect`` ``shutdown`` with their ``resume`` positions and close code 1001 *before*
    uvicorn closes the sockets itself (plain uvicorn closes open WebSockets with 1012 before the
    app's lifespan shutdown runs)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the realtime connections, then shut down as uvicorn does."""
        state = getattr(self.config.app, "state", None)
        services = getattr(state, "services", None)
        realtime = getattr(services, "realtime", None)
        if isinstance(realtime, RealtimeService):
            await realtime.shutdown()
        await super().shutdown(sockets)


def serve(app: FastAPI, *, host: str, port: int, log_level: str = "warning") -> None:
    """Run ``app`` on ``host``:``port`` until SIGINT/SIGTERM (blocking), with a graceful
    realtime shutdown."""
    GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
