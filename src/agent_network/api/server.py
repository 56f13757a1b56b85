"""Serving the app: a uvicorn server that shuts realtime connections down cleanly."""

from __future__ import annotations

import gc
import socket

import uvicorn
from fastapi import FastAPI

from agent_network.api.realtime import RealtimeProtocol


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown first runs :meth:`RealtimeProtocol.shutdown` of the app
    (``config.app`` must be an app built by ``create_app``), so WebSocket clients get
    ``disconnect`` ``shutdown`` with their ``resume`` positions and close code 1001 *before*
    uvicorn closes the sockets itself (plain uvicorn closes open WebSockets with 1012 before the
    app's lifespan shutdown runs).

    ``freeze_gc`` (for a process that runs one server, such as ``agent-network serve``): once
    startup is done, collect and then :func:`gc.freeze` everything allocated so far (modules,
    the app, the schema, caches), so the collector's oldest generation no longer walks those
    objects. Without it a full collection of the startup heap stalls the event loop for tens of
    milliseconds at unpredictable moments (measured: ~60-100 ms pauses at 1,000 appends/s, the
    p99 latency of every post in flight). Leave it off where many servers start in one process
    (tests): frozen objects are never collected.

    The event loop and HTTP parser are uvicorn's ``"auto"`` choices: uvloop and httptools, both
    in the project's dependencies (asyncio and h11 where they are missing, e.g. uvloop on
    Windows).
    """

    def __init__(self, config: uvicorn.Config, *, freeze_gc: bool = False) -> None:
        super().__init__(config)
        self.freeze_gc = freeze_gc

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does; then freeze the startup heap when ``freeze_gc`` is set."""
        await super().startup(sockets)
        if self.freeze_gc:
            gc.collect()
            gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the realtime connections, then shut down as uvicorn does."""
        state = getattr(self.config.app, "state", None)
        realtime = getattr(state, "realtime", None)
        if isinstance(realtime, RealtimeProtocol):
            await realtime.shutdown()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (``port`` 0: any free port; read the chosen
    one with ``sock.getsockname()[1]``), for :func:`serve`'s ``sock``, so a caller can bind
    first and announce the server only once the address is really its own.

    Raises ``ValueError`` for a port outside 0-65535 and ``OSError`` (e.g. ``EADDRINUSE``)
    when the address cannot be bound; nothing is left open then.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(
    app: FastAPI,
    *,
    host: str,
    port: int,
    log_level: str = "warning",
    ws_max_size: int = 1_048_576,
    sock: socket.socket | None = None,
) -> None:
    """Run ``app`` on ``host``:``port`` until SIGINT/SIGTERM (blocking), with a graceful
    realtime shutdown and the startup heap frozen (``GracefulServer(freeze_gc=True)``).
    ``ws_max_size`` is the largest WebSocket message accepted, in bytes (a larger one closes
    the connection with 1009, before it is buffered whole). ``sock``: an already listening
    socket (:func:`bind`) to serve on instead of binding ``host``:``port`` here.
    ``log_level``: uvicorn's level (``debug``, ``info``: with the access log, ``warning``...)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=ws_max_size,
        log_config=None,
    )
    GracefulServer(config, freeze_gc=True).run(sockets=[sock] if sock is not None else None)
