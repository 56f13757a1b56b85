"""Serving the app: a uvicorn server that shuts realtime connections down cleanly, in this
process (:func:`serve`) or in several worker processes sharing one listening socket
(:func:`serve_workers`)."""

from __future__ import annotations

import gc
import os
import signal
import socket

import uvicorn
from fastapi import FastAPI

from agent_network.api.realtime import RealtimeProtocol

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        app: object = getattr(self.config, "loaded_app", None) or self.config.app
        while not hasattr(app, "state") and hasattr(app, "app"):
            app = app.app  # uvicorn's middleware (proxy headers) around an app from a factory
        state = getattr(app, "state", None)
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


def _worker(factory: str, sock: socket.socket, log_level: str, ws_max_size: int) -> None:
    """One worker process of :func:`serve_workers` (the target of a spawned process)."""
    config = uvicorn.Config(
        factory, factory=True, log_level=log_level, ws_max_size=ws_max_size, log_config=None
    )
    GracefulServer(config, freeze_gc=True).run(sockets=[sock])


def serve_workers(
    factory: str,
    *,
    workers: int,
    sock: socket.socket,
    log_level: str = "warning",
    ws_max_size: int = 1_048_576,
) -> None:
    """Run ``workers`` processes, each serving the app made by ``factory`` (an import string
    ``"module:function"`` called with no argument in each process, which reads its settings
    from the environment) on the one listening socket ``sock`` (:func:`bind`): the kernel hands
    each new connection to one of them. Each worker is a :class:`GracefulServer` with
    ``freeze_gc``. Blocks until SIGINT/SIGTERM: SIGTERM is passed on to every worker, SIGINT
    (Ctrl-C) is assumed to have reached them with the parent; each stops gracefully before this
    returns. A worker that dies otherwise is started again within 1 s.

    The processes share nothing but the database, so it must be one several processes can
    write (PostgreSQL); the caller checks that."""
    import multiprocessing
    import threading

    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def start() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(
            target=_worker, args=(factory, sock, log_level, ws_max_size), daemon=False
        )
        proc.start()
        return proc

    received: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        received.append(sig)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    procs = [start() for _ in range(workers)]
    try:
        while not stop.wait(1.0):
            for i, proc in enumerate(procs):
                if not proc.is_alive():
                    procs[i] = start()
    finally:
        if received[:1] == [signal.SIGINT]:
            # Ctrl-C reached the whole process group: the workers are stopping already (a
            # second signal would make uvicorn skip the graceful part)
            for proc in procs:
                proc.join(timeout=30)
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
