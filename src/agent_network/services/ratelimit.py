"""Keyed sliding-window rate limiters, in-process or shared through PostgreSQL, and their error.

A limiter admits at most ``limit`` attempts per key in any ``window`` seconds (a sliding log, so
there is no burst at a fixed-window boundary). An attempt names one or more keys — for example
the client address *and* the org — and is admitted only if every key is below the limit; it is
then counted against all of them at once. A refused attempt is not counted, so retrying while
refused does not push the window further out; the caller still never gets more than ``limit``
attempts per ``window``.

Two implementations of that one contract (:class:`RateLimiter`), chosen by
:func:`rate_limiter` from the database engine:

- :class:`SlidingWindowLimiter` (SQLite, one server process): the windows live in this object's
  memory; a restart forgets them. Its :meth:`~SlidingWindowLimiter.acquire` never awaits, so it
  is atomic with respect to other coroutines of one event loop, and a :class:`threading.Lock`
  makes it safe from several threads. Time is :func:`time.monotonic` (or an injected clock), so
  wall-clock jumps neither unblock nor block anybody. Keys whose window has emptied are swept
  once the table grows past ``sweep_at`` entries.
- :class:`SharedWindowLimiter` (PostgreSQL, any number of server processes): one row of
  ``rate_hits`` per admitted attempt and key. An attempt runs one transaction that takes a
  transaction-scoped advisory lock per key (in a fixed order, so two attempts never deadlock),
  counts each key's rows of the last window, and inserts a row per key when all are below the
  limit. Time is the database's clock, the one clock every process shares. Rows older than the
  window are pruned for the keys an attempt touches, and for the whole scope every
  ``PRUNE_EVERY`` attempts.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

import anyio
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from agent_network.errors import AgentNetworkError
from agent_network.store.engine import write_transaction
from agent_network.store.tables import rate_hits

__all__ = [
    "PRUNE_EVERY",
    "RateLimitedError",
    "RateLimiter",
    "SharedWindowLimiter",
    "SlidingWindowLimiter",
    "rate_limiter",
]

PRUNE_EVERY = 1000  # attempts of one SharedWindowLimiter between prunes of its whole scope
_DB_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"  # the clock processes share


class RateLimitedError(AgentNetworkError):
    """Too many attempts in the current window; ``details["retry_after"]`` is in seconds."""

    code = "rate_limited"
    status = 429


def _refused(wait: float, what: str) -> RateLimitedError:
    seconds = max(1, math.ceil(wait))
    return RateLimitedError(
        f"too many {what}; retry in {seconds} s", details={"retry_after": seconds}
    )


class RateLimiter(Protocol):
    """What the services use of a limiter (module docstring: the contract)."""

    limit: int
    window: float

    async def wait_for(self, *keys: Hashable, limit: int | None = None) -> float:
        """Count one attempt against every key if all are below the limit: returns ``0.0``
        (admitted, counted), else the seconds (> 0) until every key has room (not counted)."""
        ...

    async def admit(
        self, *keys: Hashable, limit: int | None = None, what: str = "attempts"
    ) -> None:
        """:meth:`wait_for`, raising :class:`RateLimitedError` (saying when to retry, as
        ``details["retry_after"]`` in whole seconds) when refused."""
        ...

    async def forget(self) -> None:
        """Forget every recorded attempt of this limiter."""
        ...

    def reset(self) -> None:
        """:meth:`forget` from synchronous code (a test thread; not from an event loop)."""
        ...


class SlidingWindowLimiter:
    """At most ``limit`` admitted attempts per key in any ``window`` seconds (in-process only).

    ``limit`` given to :meth:`acquire` overrides the default for that call, so an owner can change
    its limit at run time without rebuilding the limiter (already recorded attempts still count).
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_at: int = 10_000,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if window <= 0:
            raise ValueError("window must be > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sweep_at = sweep_at
        self._hits: dict[Hashable, deque[float]] = {}
        self._lock = threading.Lock()

    def acquire(self, *keys: Hashable, limit: int | None = None) -> float:
        """Count one attempt against every key in ``keys`` if all are below the limit.

        Returns ``0.0`` when the attempt was admitted (and counted), otherwise the number of
        seconds (> 0) until every key has room again (nothing is counted then).
        """
        cap = self.limit if limit is None else limit
        with self._lock:
            now = self._clock()
            horizon = now - self.window
            wait = 0.0
            for key in keys:
                hits = self._hits.get(key)
                if hits is None:
                    if cap <= 0:
                        wait = max(wait, self.window)
                    continue
                while hits and hits[0] <= horizon:
                    hits.popleft()
                if len(hits) >= cap:
                    # room again when the oldest attempt that keeps us at the cap slides out
                    oldest = hits[len(hits) - cap] if cap > 0 else now
                    wait = max(wait, oldest + self.window - now)
            if wait > 0:
                return wait
            for key in keys:
                self._hits.setdefault(key, deque()).append(now)
            if len(self._hits) > self._sweep_at:
                self._sweep(horizon)
            return 0.0

    def check(self, *keys: Hashable, limit: int | None = None, what: str = "attempts") -> None:
        """:meth:`acquire`, raising :class:`RateLimitedError` (saying when to retry) if refused."""
        wait = self.acquire(*keys, limit=limit)
        if wait > 0:
            raise _refused(wait, what)

    async def wait_for(self, *keys: Hashable, limit: int | None = None) -> float:
        """:meth:`acquire` (the :class:`RateLimiter` protocol)."""
        return self.acquire(*keys, limit=limit)

    async def admit(
        self, *keys: Hashable, limit: int | None = None, what: str = "attempts"
    ) -> None:
        """:meth:`check` (the :class:`RateLimiter` protocol)."""
        self.check(*keys, limit=limit, what=what)

    async def forget(self) -> None:
        """:meth:`reset` (the :class:`RateLimiter` protocol)."""
        self.reset()

    def reset(self) -> None:
        """Forget every recorded attempt."""
        with self._lock:
            self._hits.clear()

    def _sweep(self, horizon: float) -> None:
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= horizon]:
            del self._hits[key]


def _key_text(key: Hashable) -> str:
    if isinstance(key, tuple):
        return ":".join(str(part) for part in key)
    return str(key)


class SharedWindowLimiter:
    """At most ``limit`` admitted attempts per key in any ``window`` seconds across every process
    using the same PostgreSQL database (the module docstring says how).

    ``scope`` names the limit (``join``, ``rate:60``...): limiters of one scope share their
    windows, so every process builds its limiter for a purpose with the same scope, limit and
    window. Keys are compared by their text (a tuple's parts joined with ``:``), at most 300
    characters. ``limit`` given to :meth:`wait_for` overrides the default for that call.
    ``clock`` (seconds) replaces the database's clock, for tests only: every process must share
    one clock.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        scope: str,
        limit: int,
        window: float = 60.0,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if window <= 0:
            raise ValueError("window must be > 0")
        if engine.dialect.name != "postgresql":
            raise ValueError("SharedWindowLimiter needs PostgreSQL")
        self.engine = engine
        self.scope = scope
        self.limit = limit
        self.window = window
        self._clock = clock
        self._attempts = 0

    async def _now(self, conn: AsyncConnection) -> float:
        if self._clock is not None:
            return self._clock()
        return float((await conn.execute(text(_DB_NOW))).scalar_one())

    async def wait_for(self, *keys: Hashable, limit: int | None = None) -> float:
        """Count one attempt against every key if all are below the limit, in one transaction:
        returns ``0.0`` (admitted, counted) or the seconds (> 0) until every key has room again
        (nothing counted)."""
        cap = self.limit if limit is None else limit
        names = sorted({_key_text(k) for k in keys})
        self._attempts += 1
        async with write_transaction(self.engine) as conn:
            for name in names:  # one order for every process: no deadlock between attempts
                lock = zlib.crc32(f"{self.scope}\x1f{name}".encode())
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:a, :b)"),
                    {"a": 0x414E5254, "b": lock - 2**31},
                )
            now = await self._now(conn)
            horizon = now - self.window
            wait = 0.0
            for name in names:
                if cap <= 0:
                    wait = self.window
                    break
                # the oldest of the ``cap`` newest hits: once it slides out there is room again
                oldest = (
                    await conn.execute(
                        select(rate_hits.c.at)
                        .where(
                            rate_hits.c.scope == self.scope,
                            rate_hits.c.key == name,
                            rate_hits.c.at > horizon,
                        )
                        .order_by(rate_hits.c.at.desc())
                        .offset(cap - 1)
                        .limit(1)
                    )
                ).scalar()
                if oldest is not None:
                    wait = max(wait, float(oldest) + self.window - now)
            if wait > 0:
                return wait
            await conn.execute(
                delete(rate_hits).where(
                    rate_hits.c.scope == self.scope,
                    rate_hits.c.key.in_(names),
                    rate_hits.c.at <= horizon,
                )
            )
            if names:
                await conn.execute(
                    insert(rate_hits), [{"scope": self.scope, "key": n, "at": now} for n in names]
                )
            if self._attempts % PRUNE_EVERY == 0:
                await conn.execute(
                    delete(rate_hits).where(
                        rate_hits.c.scope == self.scope, rate_hits.c.at <= horizon
                    )
                )
        return 0.0

    async def admit(
        self, *keys: Hashable, limit: int | None = None, what: str = "attempts"
    ) -> None:
        """:meth:`wait_for`, raising :class:`RateLimitedError` (saying when to retry) if refused."""
        wait = await self.wait_for(*keys, limit=limit)
        if wait > 0:
            raise _refused(wait, what)

    async def forget(self) -> None:
        """Forget every recorded attempt of this scope (in every process)."""
        await self._forget(self.engine)

    def reset(self) -> None:
        """:meth:`forget` from synchronous code, any thread, over a connection of its own (the
        limiter's engine belongs to its event loop). RuntimeError inside a running event loop:
        use :meth:`forget` there."""

        async def forget_once() -> None:
            engine = create_async_engine(self.engine.url, poolclass=NullPool)
            try:
                await self._forget(engine)
            finally:
                await engine.dispose()

        anyio.run(forget_once)

    async def _forget(self, engine: AsyncEngine) -> None:
        async with write_transaction(engine) as conn:
            await conn.execute(delete(rate_hits).where(rate_hits.c.scope == self.scope))

    async def count(self, key: Hashable) -> int:
        """How many attempts ``key`` has in the current window (for tests and diagnostics)."""
        async with self.engine.connect() as conn:
            now = await self._now(conn)
            q = select(func.count()).where(
                rate_hits.c.scope == self.scope,
                rate_hits.c.key == _key_text(key),
                rate_hits.c.at > now - self.window,
            )
            return int((await conn.execute(q)).scalar_one())


def rate_limiter(engine: AsyncEngine, scope: str, limit: int, window: float = 60.0) -> RateLimiter:
    """The limiter for ``engine``: a :class:`SharedWindowLimiter` of ``scope`` on PostgreSQL
    (several server processes share one database), a :class:`SlidingWindowLimiter` in this
    process's memory otherwise (SQLite: one process). ValueError for ``limit < 0`` or
    ``window <= 0``."""
    if engine.dialect.name == "postgresql":
        return SharedWindowLimiter(engine, scope, limit, window)
    return SlidingWindowLimiter(limit, window)
