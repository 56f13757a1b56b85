"""A connection's bounded outbox of frames (realtime protocol): the fan-out puts without
waiting, replays wait for room, one writer drains it to the socket."""

from __future__ import annotations

import asyncio
from collections import deque

# (frame text, thread id or None, seq or 0): the writer records the last seq sent per thread.
OutItem = tuple[str, str | None, int]


class Outbox:
    """A connection's bounded queue of frames waiting for its writer.

    ``put_nowait`` never waits (the fan-out uses it; False means full); ``put_replay`` waits
    while the box is at least half full, so a replay always leaves room for live frames and
    replies. Single consumer (``get``) and, at a time, a single ``put_replay`` caller (the
    connection's control task). Waiters are futures created only while someone waits, so an
    idle connection's outbox is one empty deque.
    """

    __slots__ = ("_getter", "_items", "_putter", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[OutItem] = deque()
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def free(self) -> int:
        """How many more frames fit now."""
        return self.capacity - len(self._items)

    def put_nowait(self, item: OutItem) -> bool:
        """Queue ``item``; False (nothing queued) when the box is full."""
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        wake(self._getter)
        return True

    async def put_replay(self, item: OutItem) -> None:
        """Queue ``item`` once the box is less than half full."""
        while len(self._items) >= self.capacity // 2:
            self._putter = asyncio.get_running_loop().create_future()
            try:
                await self._putter
            finally:
                self._putter = None
        self._items.append(item)
        wake(self._getter)

    async def get(self) -> OutItem:
        """The oldest frame, waiting for one if the box is empty."""
        while not self._items:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item = self._items.popleft()
        if self._putter is not None and len(self._items) < self.capacity // 2:
            wake(self._putter)
        return item

    def clear(self) -> None:
        """Drop every queued frame."""
        self._items.clear()
        wake(self._putter)


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Resolve ``waiter`` if someone waits on it."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
