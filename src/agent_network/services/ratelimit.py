"""A small keyed sliding-window rate limiter, and the typed error it raises.

:class:`SlidingWindowLimiter` remembers, per key, the monotonic times of the attempts it admitted
during the last ``window`` seconds (a sliding log, so there is no burst at a fixed-window
boundary). An attempt names one or more keys — for example the client address *and* the org —
and is admitted only if every key is below the limit; it is then counted against all of them at
once. A refused attempt is not counted, so retrying while refused does not push the window
further out; the caller still never gets more than ``limit`` attempts per ``window``.

Scope and caveats:

- **Per process.** State lives in this object's memory. Several API processes behind a load
  balancer each keep their own windows (the effective limit is multiplied by the number of
  processes), and a restart forgets everything. A shared store (e.g. PostgreSQL or Redis) would be
  needed for a cluster-wide limit.
- **Thread safety.** :meth:`~SlidingWindowLimiter.acquire` never awaits, so it is atomic with
  respect to other coroutines on the same event loop; a :class:`threading.Lock` additionally makes
  it safe to call from several threads.
- **Clock.** Time comes from :func:`time.monotonic` (or an injected clock for tests), so wall-clock
  jumps neither unblock nor block anybody.
- **Memory.** One small deque per key seen in the last window; keys whose window has emptied are
  swept once the table grows past ``sweep_at`` entries.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from agent_network.errors import AgentNetworkError


class RateLimitedError(AgentNetworkError):
    """Too many attempts in the current window; ``details["retry_after"]`` is in seconds."""

    code = "rate_limited"
    status = 429


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
            seconds = max(1, math.ceil(wait))
            raise RateLimitedError(
                f"too many {what}; retry in {seconds} s",
                details={"retry_after": seconds},
            )

    def reset(self) -> None:
        """Forget every recorded attempt."""
        with self._lock:
            self._hits.clear()

    def _sweep(self, horizon: float) -> None:
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= horizon]:
            del self._hits[key]
