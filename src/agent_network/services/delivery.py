"""Durable delivery cursors as a service: read and acknowledge a consumer's position in a thread.

The WebSocket protocol keeps the same cursors through its ``join``/``ack`` frames
(``services/realtime.py``); this service is the call the embedded link (``api/embedded.py``)
makes for hub clients in process, so no client writes cursor rows itself. Rows live in
``store/delivery.py``.
"""

from __future__ import annotations

from agent_network.errors import InvalidRequestError
from agent_network.services.base import ServiceContext
from agent_network.services.principal import Principal
from agent_network.services.scope import visible_thread
from agent_network.store.delivery import advance_cursor, read_cursor
from agent_network.store.engine import write_transaction


def subscriber_of(principal: Principal) -> str:
    """Who a cursor belongs to: the principal's subject (agent or user), else its org (an org
    key), else its key (an admin key) — the same id the WebSocket protocol uses."""
    return str(principal.subject_id or principal.org_id or principal.key_id)


class DeliveryService:
    """Read and move the durable cursors ``(subscriber, name, thread)`` of ``principal``."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def cursor(self, principal: Principal, thread_id: str, name: str) -> int:
        """The seq acknowledged on cursor ``name`` of ``thread_id`` (0 if never acknowledged).
        NotFoundError when ``principal`` may not see the thread."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
            return await read_cursor(conn, subscriber_of(principal), name, thread_id)

    async def ack(self, principal: Principal, thread_id: str, seq: int, name: str) -> int:
        """Move cursor ``name`` of ``thread_id`` forward to ``seq`` (never backwards) and return
        its seq afterwards. NotFoundError when ``principal`` may not see the thread;
        InvalidRequestError when ``seq`` is beyond the thread's last seq (nothing written)."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        last_seq = (await self.ctx.hub.state(thread_id)).last_seq
        if seq > last_seq:
            raise InvalidRequestError(
                f"seq={seq} is beyond the last seq of thread {thread_id!r} ({last_seq})"
            )
        async with write_transaction(self.ctx.engine) as conn:
            return await advance_cursor(conn, subscriber_of(principal), name, thread_id, seq)


__all__ = ["DeliveryService", "subscriber_of"]
