"""Per-process caches of *positive* decisions, tagged with the context's epochs and bounded in age.

A cached decision is only ever a permission that was checked against the database ("this
principal may post in this thread as this sender"); a refusal is never cached, so every refused
request takes the full, exact path again.

Invalidation (see :class:`agent_network.services.base.ServiceContext`):

- ``access_epoch`` is bumped by every service method that *removes* access (visa revoked,
  network left, member removed, team deleted, user or agent deleted, credential revoked or
  rotated); ``config_epoch`` by the ones that change what a decision is made of without removing
  access (an agent's rule, an org's egress policy, an agent or user row, team or network
  membership added, a thread's visibility or participants). An entry is served only while both
  epochs are the ones it was read under — the epochs are taken *before* the database read, so a
  change that commits during the read makes the entry stale at once.
- Every entry also expires :data:`DECISION_TTL` seconds after its database read *began*: the
  read is taken to begin at the earliest :meth:`DecisionCache.get` that missed the key less
  than ``DECISION_TTL`` ago (every caller misses, reads, then puts), or at the put when none
  did. That is the staleness bound for changes made by *another* process on the same database
  (several API processes on one PostgreSQL): their epoch bumps are not seen here, but a removal
  committed there at time T is seen by every read that begins after T, and every entry read
  from before T expires by T + ``DECISION_TTL`` — so no process acts on a revoked grant past
  that bound. (Counting from the put instead would stretch the bound by the read's duration.)
- The cache is a bounded LRU (:data:`DECISION_MAX` entries per cache).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

DECISION_TTL = 1.0  # seconds a positive decision may be reused
DECISION_MAX = 10_000  # entries per cache

V = TypeVar("V")
Epoch = tuple[int, int]  # (access_epoch, config_epoch)


class DecisionCache(Generic[V]):
    """A bounded LRU of positive decisions, each valid for one epoch and ``ttl`` seconds.

    ``get(key, epoch)`` returns the value stored under ``key`` for exactly ``epoch`` and not yet
    expired, else None (a stale entry is dropped). ``put(key, value, epoch)`` stores it with the
    epoch the caller read the database under (taken before the read). ``clock`` returns seconds
    (monotonic); it is injectable for tests. Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        *,
        max_entries: int = DECISION_MAX,
        ttl: float = DECISION_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl < 0:
            raise ValueError("max_entries must be >= 1 and ttl >= 0")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[V, Epoch, float]] = OrderedDict()
        # when a get() last missed each key: the start of the read whose put() follows
        self._missed_at: OrderedDict[Hashable, float] = OrderedDict()
        self.hits = 0  # get() answered from the cache
        self.misses = 0  # get() found nothing valid
        self.stores = 0  # put() calls: decisions made (read from the database)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, epoch: Epoch) -> V | None:
        """The value for ``key`` if it was stored under ``epoch`` and has not expired."""
        entry = self._entries.get(key)
        if entry is not None:
            value, stored_epoch, expires = entry
            if stored_epoch == epoch and self._clock() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            del self._entries[key]
        self.misses += 1
        now = self._clock()
        first = self._missed_at.get(key)
        if first is None or now - first >= self.ttl:
            # keep the earliest miss of a read still going on (several callers may wait for the
            # same read): an entry then expires early at worst, never late
            self._missed_at[key] = now
        self._missed_at.move_to_end(key)
        while len(self._missed_at) > self.max_entries:
            self._missed_at.popitem(last=False)  # a refused key is never put: keep this bounded
        return None

    def put(self, key: Hashable, value: V, epoch: Epoch) -> None:
        """Store ``value`` (a positive decision read under ``epoch``), valid until ``ttl`` seconds
        after the :meth:`get` that missed ``key`` (the start of its read; now if none);
        evicts the least recently used entry past ``max_entries``."""
        self.stores += 1
        read_at = self._missed_at.pop(key, None)
        now = self._clock()
        started = now if read_at is None else min(read_at, now)
        self._entries[key] = (value, epoch, started + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._missed_at.clear()
