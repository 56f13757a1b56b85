"""The blocking facade: :class:`Client`, the same REST methods as :class:`AsyncClient`.

Nothing is written twice: ``Client`` runs one :class:`AsyncClient` on a private event loop thread
(an anyio blocking portal) and forwards every resource method to it, so ``client.threads.post(
...)`` blocks and returns the same pydantic model the async method returns; async iterators
(``audit.export``, ``threads.history``) become plain iterators. Errors are the same classes.

```python
with Client("http://127.0.0.1:8321", org_key) as client:
    agent = client.agents.create("Ada", "ada", model="test")
```

Realtime rooms are async only (use :class:`AsyncClient`).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.from_thread import BlockingPortal

from agent_network.client.models import Health
from agent_network.client.rest import AsyncClient, Params, Resource

GROUPS = (
    "orgs",
    "users",
    "agents",
    "teams",
    "networks",
    "threads",
    "knowledge",
    "credentials",
    "policy",
    "audit",
    "runners",
)


def _iterate(portal: BlockingPortal, agen: AsyncIterator[Any]) -> Iterator[Any]:
    """A blocking iterator over ``agen`` driven through ``portal`` (closed when abandoned)."""
    try:
        while True:
            try:
                yield portal.call(agen.__anext__)  # type: ignore[arg-type]
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):  # the portal may be gone at interpreter exit
                portal.call(aclose)


class SyncGroup:
    """A resource group of :class:`Client`: each attribute is the blocking version of the
    async group's method (results, arguments and errors identical), sub-groups included."""

    def __init__(self, portal: BlockingPortal, group: Resource) -> None:
        self._portal = portal
        self._group = group

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._group, name)
        if isinstance(attr, Resource):
            return SyncGroup(self._portal, attr)
        if name.startswith("_") or not callable(attr):
            return attr
        return self._blocking(attr)

    def _blocking(self, method: Callable[..., Any]) -> Callable[..., Any]:
        portal = self._portal

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = portal.call(functools.partial(method, *args, **kwargs))
            if isinstance(result, AsyncIterator):
                return _iterate(portal, result)
            return result

        return call

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._group)) - {n for n in dir(self._group) if n.startswith("_")})


def _start_loop() -> tuple[BlockingPortal, threading.Thread]:
    """An event loop in a daemon thread (an unclosed client never blocks interpreter exit)
    and the portal into it."""
    handoff: queue.Queue[BlockingPortal | BaseException] = queue.Queue()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            handoff.put(portal)
            await portal.sleep_until_stopped()

    def main() -> None:
        try:
            anyio.run(serve)
        except BaseException as exc:  # pragma: no cover - the loop failed to start
            handoff.put(exc)

    thread = threading.Thread(target=main, name="agent-network-client", daemon=True)
    thread.start()
    got = handoff.get()
    if isinstance(got, BaseException):  # pragma: no cover
        raise got
    return got, thread


class Client:
    """Blocking client of one server: ``Client(base_url, token, timeout=30.0)``.

    Resource groups as on :class:`AsyncClient` (``client.threads.post(thread_id, "hi",
    user_id=...)``) plus :meth:`request` and :meth:`health`. Use as ``with Client(...) as
    client`` or call :meth:`close`; it owns one background (daemon) thread running the event
    loop.
    """

    orgs: Any
    users: Any
    agents: Any
    teams: Any
    networks: Any
    threads: Any
    knowledge: Any
    credentials: Any
    policy: Any
    audit: Any
    runners: Any

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self._portal, self._thread = _start_loop()
        try:
            self._async: AsyncClient = self._portal.call(self._make, base_url, token, timeout)
        except BaseException:
            self._stop()
            raise
        for name in GROUPS:
            setattr(self, name, SyncGroup(self._portal, getattr(self._async, name)))
        self._closed = False

    @staticmethod
    async def _make(base_url: str, token: str, seconds: float) -> AsyncClient:
        return AsyncClient(base_url, token, timeout=seconds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and stop the background loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self._async.aclose)
        finally:
            self._stop()

    def _stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._portal.call(self._portal.stop)
        self._thread.join(timeout=10)

    def request(
        self, method: str, path: str, *, json: Any = None, params: Params | None = None
    ) -> Any:
        """Blocking :meth:`AsyncClient.request`: decoded JSON, ``ApiError`` on error bodies."""
        return self._portal.call(
            functools.partial(self._async.request, method, path, json=json, params=params)
        )

    def health(self) -> Health:
        """Blocking :meth:`AsyncClient.health`."""
        return self._portal.call(self._async.health)


__all__ = ["Client", "SyncGroup"]
