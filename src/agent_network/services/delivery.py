"""Durable delivery cursors as a service: read and acknowledge a consumer's position in a thread.

The WebSocket protocol keeps the same cursors through its ``join``/``ack`` frames; this service
is the call the embedded link (``api/embedded.py``) makes for hub clients in process, so no
client writes cursor rows itself. Rows live in ``store/cursors.py``.

:class:`Inbox` is what hub clients receive: every envelope of every thread a credential may read,
pushed by the hub's subscription and filtered as the API filters, with acknowledgements in
batches (docs/architecture.md, "Hub clients: push, not poll").
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import InvalidRequestError
from agent_network.hub import Subscription
from agent_network.model.envelope import Envelope
from agent_network.protocol.events import (
    EV_PARTICIPANTS_ADDED,
    EV_THREAD_CLOSED,
    EV_VISIBILITY_SET,
)
from agent_network.services.base import ServiceContext
from agent_network.services.cache import DECISION_TTL
from agent_network.services.principal import Principal
from agent_network.services.rendering import render_envelope, sender_names
from agent_network.services.scope import (
    audience_admits,
    team_visible_to,
    thread_readable,
    visible_thread,
)
from agent_network.store.cursors import advance_cursor, advance_cursors, read_cursor
from agent_network.store.engine import write_transaction
from agent_network.store.tables import cursors, teams, threads

FEED_BATCH = 1000  # envelopes taken from the hub subscription at once
UNSETTLED_RETRY = 0.2  # seconds a new thread waits for its next envelope before it is looked at
UNSETTLED_FOR = 10.0  # seconds after which a thread without a row counts as not readable
KEEP_ENDED = 100_000  # closed threads an inbox remembers as closed
REPLAY_PAGE = 500  # envelopes per store read while an inbox catches a thread up
WIDENING = frozenset({EV_PARTICIPANTS_ADDED, EV_VISIBILITY_SET})  # may make a thread readable


def subscriber_of(principal: Principal) -> str:
    """Who a cursor belongs to: the principal's subject (agent or user), else its org (an org
    key), else its key (an admin key) — the same id the WebSocket protocol uses."""
    return str(principal.subject_id or principal.org_id or principal.key_id)


class DeliveryService:
    """Read and move the durable cursors ``(subscriber, name, thread)`` of ``principal``."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._names: dict[str, tuple[str, str, float]] = {}  # shared by the inboxes

    def inbox(
        self,
        principal: Principal,
        authenticate: Callable[[], Awaitable[Principal]],
        cursor: str,
    ) -> Inbox:
        """An :class:`Inbox` of ``principal`` (authenticated by ``authenticate``, which is also
        how it re-checks the credential) on cursor ``cursor``; enter it with ``async with``."""
        return Inbox(self.ctx, authenticate, principal, cursor, self._names)

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


# ------------------------------------------------------------------------------ inbox

INBOX_BUFFER = 100_000  # envelopes an inbox may fall behind the hub before it resubscribes
NAME_TTL = 30.0  # seconds a sender's display name is reused for rendering
RECHECK_EVERY = DECISION_TTL  # seconds between re-checks of the credential (other processes)
RECHECK_THREADS_EVERY = 10.0  # seconds between re-checks of every delivered thread (idem)


class Inbox:
    """Every envelope of every thread ``principal`` may read, pushed by the hub: what a hub
    client over the embedded link (``api/embedded.py``) receives, with no polling.

    Use as ``async with Inbox(...) as inbox`` then ``await inbox.receive()`` in a loop.

    - **Source.** One hub subscription to every thread (``Hub.subscribe(None)``), opened
      before anything is read from the store. On entry (and again if the hub drops the
      subscription for lagging) every readable thread is caught up from the durable cursor
      ``cursor`` of the principal; a thread seen for the first time later (e.g. its
      ``thread.created``) starts from that cursor too (0 for a new thread). Per thread the
      envelopes come in ``seq`` order without gap or duplicate (a gap is filled from the
      store).
    - **Filter.** Exactly as the API filters for that credential: threads it may read
      (``visible_thread``, cached per thread until an epoch moves) and the audience rule
      (``audience_admits``: an envelope hidden from it is skipped, as a REST stub carries
      nothing).
    - **Access.** The credential is checked once on entry (``authenticate``) and again when the
      access epoch moved, when its known expiry passed and at least every ``RECHECK_EVERY``
      seconds (removals made by another process); AuthenticationError ends the inbox, a thread
      it may no longer read stops being delivered.
    - **Acknowledgements** (:meth:`ack`) move the cursors of many threads in one transaction.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        authenticate: Callable[[], Awaitable[Principal]],
        principal: Principal,
        cursor: str,
        names: dict[str, tuple[str, str, float]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.principal = principal
        self.cursor = cursor
        self._authenticate = authenticate
        self._names = names if names is not None else {}
        self._sub: Subscription | None = None
        self._pos: dict[str, int] = {}  # readable thread -> last seq handed out
        self._denied: set[str] = set()  # threads checked and not readable (until an epoch moves)
        # threads whose thread.closed was handed out (nothing follows it; the most recent
        # KEEP_ENDED are remembered, older ones are left to their cursors)
        self._ended: OrderedDict[str, None] = OrderedDict()
        # threads first seen live by their thread.created: since when, when to look next, and
        # the envelopes held until it is known whether this credential may read them (_offer)
        self._unsettled: dict[str, tuple[float, float, list[Envelope]]] = {}
        self._epochs = (ctx.access_epoch, ctx.config_epoch)
        self._checked_at = self._threads_checked_at = time.monotonic()
        self._ready: list[tuple[Envelope, dict[str, Any]]] = []
        # the feed task moves batches from the subscription to ``_incoming`` (so waiting for
        # them with a timeout never cancels a receive, which could lose the batch handed over)
        self._incoming: list[Envelope] = []
        self._arrived = anyio.Event()
        self._lost = False  # the hub dropped the subscription (lagging)
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._tg = await anyio.create_task_group().__aenter__()
        try:
            self._subscribe()
            await self._catch_up_all()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            self._sub.close()
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    def _subscribe(self) -> None:
        assert self._tg is not None
        self._sub = self.ctx.hub.subscribe(None, buffer=INBOX_BUFFER)
        self._lost = False
        self._tg.start_soon(self._feed, self._sub)

    async def _feed(self, sub: Subscription) -> None:
        while True:
            batch = await sub.receive_batch(FEED_BATCH)
            if not batch:
                self._lost = True
            self._incoming.extend(batch)
            self._arrived.set()
            if not batch:
                return

    @property
    def threads(self) -> frozenset[str]:
        """The readable threads delivered so far (and not closed)."""
        return frozenset(self._pos)

    async def receive(self, limit: int = 1000) -> list[tuple[Envelope, dict[str, Any]]]:
        """The next envelopes for this credential, as ``(envelope, API dict)`` pairs (at least
        one; waits for them). AuthenticationError when the credential no longer authenticates."""
        while not self._ready:
            assert self._tg is not None, "use the inbox as an async context manager"
            if not self._incoming and not self._lost:
                with anyio.move_on_after(UNSETTLED_RETRY if self._unsettled else None):
                    await self._arrived.wait()
                self._arrived = anyio.Event()
            batch, self._incoming = self._incoming, []
            await self._recheck_if_due()
            for env in batch:
                await self._offer(env)
            if self._unsettled:  # new threads without a next envelope: look now
                now = time.monotonic()
                for thread_id in [t for t, (_, at, _) in self._unsettled.items() if at <= now]:
                    await self._settle(thread_id)
            if self._lost and not self._incoming:  # dropped for lagging: again, from the store
                self._subscribe()
                await self._catch_up_all()
        out, self._ready = self._ready[:limit], self._ready[limit:]
        await self._render(out)
        return out

    async def ack(self, positions: Mapping[str, int]) -> None:
        """Move the cursor of each thread in ``positions`` forward to its seq (never backwards),
        all in one transaction. NotFoundError (nothing written) when a thread is not readable,
        InvalidRequestError when a seq is beyond its thread's last seq."""
        todo = {t: s for t, s in positions.items() if s > 0}
        if not todo:
            return
        for thread_id, seq in todo.items():
            if thread_id not in self._pos and thread_id not in self._ended:
                async with self.ctx.engine.connect() as conn:
                    await visible_thread(conn, self.principal, thread_id)
            last_seq = (await self.ctx.hub.state(thread_id)).last_seq
            if seq > last_seq:
                raise InvalidRequestError(
                    f"seq={seq} is beyond the last seq of thread {thread_id!r} ({last_seq})"
                )
        async with write_transaction(self.ctx.engine) as conn:  # one upsert for all threads
            await advance_cursors(conn, subscriber_of(self.principal), self.cursor, todo)

    # ------------------------------------------------------------------ internals

    async def _offer(self, env: Envelope) -> None:
        thread_id = env.thread_id
        if thread_id in self._ended:
            return
        if thread_id in self._denied:
            if env.type not in WIDENING:
                return
            self._denied.discard(thread_id)  # widened: check again
        pos = self._pos.get(thread_id)
        if pos is None:
            # First sight. A brand-new thread's row is written just after its thread.created
            # commits, so a query now could miss it: hold the envelope until the thread's next
            # one (written after the row: an ack, a message) or UNSETTLED_RETRY seconds.
            held = self._unsettled.get(thread_id)
            now = time.monotonic()
            if held is None and env.seq == 1:
                self._unsettled[thread_id] = (now, now + UNSETTLED_RETRY, [env])
                return
            if held is None:
                self._unsettled[thread_id] = held = (now, now, [])
            held[2].append(env)
            await self._settle(thread_id)
            return
        if env.seq <= pos:
            return
        if env.seq > pos + 1:  # a gap (a thread seen late, or a lost feed): read the store
            await self._catch_up(thread_id, upto=env.seq - 1)
        self._hand_out(env)

    async def _settle(self, thread_id: str) -> None:
        """Decide whether this credential may read ``thread_id`` (first seen lately); a thread
        whose row is not written yet is looked at again (its next envelope, or
        ``UNSETTLED_RETRY`` seconds later) for up to ``UNSETTLED_FOR`` seconds. Readable: the
        held envelopes are handed out, from its durable cursor (0 for a brand-new thread)."""
        since, _, held = self._unsettled[thread_id]
        brand_new = bool(held) and held[0].seq == 1
        async with self.ctx.engine.connect() as conn:
            if not await self._readable(conn, thread_id):
                row = await conn.execute(select(threads.c.id).where(threads.c.id == thread_id))
                now = time.monotonic()
                if row.first() is None and now - since <= UNSETTLED_FOR:
                    self._unsettled[thread_id] = (since, now + UNSETTLED_RETRY, held)
                    return  # not written yet: look again later (or at its next envelope)
                # (each read may see a newer commit: check again now the row is there)
                if not await self._readable(conn, thread_id):
                    del self._unsettled[thread_id]
                    self._denied.add(thread_id)
                    return
            pos = (
                0
                if brand_new
                else await read_cursor(conn, subscriber_of(self.principal), self.cursor, thread_id)
            )
        del self._unsettled[thread_id]
        self._pos[thread_id] = pos
        for env in held:
            at = self._pos.get(thread_id)
            if at is None:  # closed meanwhile (handed out from the store)
                return
            if env.seq <= at:
                continue
            if env.seq > at + 1:
                await self._catch_up(thread_id, upto=env.seq - 1)
                if thread_id not in self._pos:
                    return
            self._hand_out(env)
        if not held:
            await self._catch_up(thread_id)

    async def _readable(self, conn: AsyncConnection, thread_id: str) -> bool:
        """Whether this credential may read ``thread_id`` (the conditions of
        ``visible_thread``, in one query)."""
        q = (
            select(threads.c.id)
            .join(teams, teams.c.id == threads.c.team_id)
            .where(
                threads.c.id == thread_id,
                threads.c.deleted_at.is_(None),
                team_visible_to(self.principal),
                thread_readable(self.principal),
            )
        )
        return (await conn.execute(q)).first() is not None

    def _hand_out(self, env: Envelope) -> None:
        self._pos[env.thread_id] = env.seq
        if env.type == EV_THREAD_CLOSED:
            self._pos.pop(env.thread_id, None)
            self._ended[env.thread_id] = None
            if len(self._ended) > KEEP_ENDED:
                self._ended.popitem(last=False)
        if audience_admits(self.principal, env):
            self._ready.append((env, {}))

    async def _catch_up(self, thread_id: str, upto: int | None = None) -> None:
        while True:
            after = self._pos.get(thread_id)
            if after is None or (upto is not None and after >= upto):
                return  # (None: its thread.closed was handed out)
            envs = await self.ctx.hub.read(thread_id, after=after, limit=REPLAY_PAGE)
            for env in envs:
                if upto is not None and env.seq > upto:
                    return
                self._hand_out(env)
            if len(envs) < REPLAY_PAGE:
                return

    async def _catch_up_all(self) -> None:
        """Every readable thread from its cursor (or from where this inbox is)."""
        who = subscriber_of(self.principal)
        async with self.ctx.engine.connect() as conn:
            rows = await conn.execute(
                select(threads.c.id)
                .join(teams, teams.c.id == threads.c.team_id)
                .where(
                    threads.c.deleted_at.is_(None),
                    team_visible_to(self.principal),
                    thread_readable(self.principal),
                )
                .order_by(threads.c.created_at)
            )
            ids = [r[0] for r in rows]
            stored = dict(
                (r[0], int(r[1]))
                for r in await conn.execute(
                    select(cursors.c.thread_id, cursors.c.seq).where(
                        cursors.c.subscriber_id == who, cursors.c.name == self.cursor
                    )
                )
            )
        for thread_id in ids:
            if thread_id in self._ended:
                continue
            self._denied.discard(thread_id)
            self._pos[thread_id] = max(self._pos.get(thread_id, 0), stored.get(thread_id, 0))
            if self._pos[thread_id] < (await self.ctx.hub.state(thread_id)).last_seq:
                await self._catch_up(thread_id)

    async def _recheck_if_due(self) -> None:
        """Re-check the credential and the readable threads when an epoch moved, the known
        expiry passed, or ``RECHECK_EVERY`` seconds went by."""
        ctx = self.ctx
        epochs = (ctx.access_epoch, ctx.config_epoch)
        now = time.monotonic()
        if (
            epochs == self._epochs
            and now - self._checked_at < RECHECK_EVERY
            and not self.principal.expired(time.time())
        ):
            return
        self.principal = await self._authenticate()  # AuthenticationError ends the inbox
        self._denied.clear()  # members added, threads widened: look again
        if epochs[0] != self._epochs[0] or now - self._threads_checked_at >= RECHECK_THREADS_EVERY:
            self._threads_checked_at = now
            async with ctx.engine.connect() as conn:
                for thread_id in list(self._pos):
                    if not await self._readable(conn, thread_id):
                        del self._pos[thread_id]
                        self._denied.add(thread_id)
        self._ready = [
            (e, r) for e, r in self._ready if e.thread_id in self._pos or e.thread_id in self._ended
        ]
        self._epochs, self._checked_at = epochs, now

    async def _render(self, items: list[tuple[Envelope, dict[str, Any]]]) -> None:
        """Fill each item's API dict (sender names from a cache shared by the inboxes of one
        process, one query for those missing)."""
        now = time.monotonic()
        names = self._names
        missing = [e for e, _ in items if (n := names.get(e.sender_id)) is None or n[2] < now]
        if missing:
            async with self.ctx.engine.connect() as conn:
                found = await sender_names(conn, missing)
            if len(names) > 50_000:
                names.clear()
            for sender_id, (name, org_name) in found.items():
                names[sender_id] = (name, org_name, now + NAME_TTL)
        for env, rendered in items:
            name, org_name, _ = names.get(env.sender_id, ("", "", 0.0))
            rendered.update(render_envelope(env, name, org_name))


__all__ = ["DeliveryService", "Inbox", "subscriber_of"]
