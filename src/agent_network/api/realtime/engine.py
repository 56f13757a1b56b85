"""The realtime protocol engine of one server process: accepts authenticated connections,
fans committed envelopes out from one hub subscription to every following connection, sends
heartbeats and shuts connections down cleanly.

How it works: the package docstring (``api/realtime``); the frames: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from agent_network.api.realtime.connection import Connection, Follow
from agent_network.api.realtime.frames import (
    AUTH_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_UNAUTHENTICATED,
    DB_SLOTS,
    FRAME_CACHE_MAX,
    HUB_BUFFER,
    NAME_CACHE_MAX,
    NAME_TTL,
    Transport,
    TransportClosed,
    dumps,
    error_frame,
)
from agent_network.api.realtime.tickets import TICKET_PREFIX, TicketBook
from agent_network.errors import AuthenticationError
from agent_network.hub import Subscription
from agent_network.json_limits import JsonTooDeepError, parse_json
from agent_network.model.envelope import Envelope
from agent_network.services.base import ServiceContext
from agent_network.services.orgs import OrgService
from agent_network.services.principal import Principal
from agent_network.services.rendering import render_envelope, render_stub, sender_names
from agent_network.services.threads import ThreadService

log = structlog.get_logger(__name__)


class RealtimeProtocol:
    """The realtime protocol of one server process (see the package docstring).

    Start :meth:`run` in a task group that outlives every connection (the app's lifespan);
    hand each accepted socket to :meth:`serve`; call :meth:`shutdown` before the server stops.
    ``heartbeat`` (seconds) and ``buffer`` (frames per connection) default to the settings
    ``ws_heartbeat`` and ``ws_buffer``; ``lag_close_timeout`` bounds how long a lagged
    connection is given to take its ``disconnect`` frame.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        threads: ThreadService,
        orgs: OrgService,
        heartbeat: float | None = None,
        buffer: int | None = None,
        lag_close_timeout: float = 10.0,
    ) -> None:
        self.ctx = ctx
        self.threads = threads
        self.orgs = orgs
        self.heartbeat = heartbeat if heartbeat is not None else ctx.settings.ws_heartbeat
        self.buffer = buffer if buffer is not None else ctx.settings.ws_buffer
        self.lag_close_timeout = lag_close_timeout
        self.db_slots = anyio.CapacityLimiter(DB_SLOTS)
        self.connections: set[Connection] = set()
        self.lagged_connections = 0  # connections closed for lagging (for tests, benchmarks)
        self.feed_resubscribes = 0  # times the hub dropped the fan-out's subscription
        self._followers: dict[str, set[Follow]] = {}
        self._sub: Subscription | None = None
        self._names: dict[str, tuple[str, str, float]] = {}
        self._frames: dict[tuple[str, int], tuple[str, float, str]] = {}
        self._stubs: dict[tuple[str, int], tuple[str, str]] = {}
        self._closing = False
        self._empty = asyncio.Event()
        self._empty.set()
        self.tickets = TicketBook()  # single-use tickets for browsers (api/realtime/tickets.py)

    # ------------------------------------------------------------------ connections

    async def serve(self, transport: Transport, token: str | None) -> None:
        """Run one accepted socket to its end: authenticate it (``token`` from the
        ``Authorization`` header, else the first frame ``auth`` within 10 s), then serve it.
        A missing or wrong credential gets an ``unauthenticated`` error and close 4401."""
        if self._closing:
            await transport.close(CLOSE_GOING_AWAY, "shutdown")
            return
        try:
            principal = await self._authenticate(transport, token)
        except AuthenticationError as err:
            try:
                await transport.send(dumps(error_frame(err)))
            except TransportClosed:
                return
            await transport.close(CLOSE_UNAUTHENTICATED, "unauthenticated")
            return
        except TransportClosed:
            return
        conn = Connection(self, transport, principal)
        self.connections.add(conn)
        self._empty.clear()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._empty.set()

    async def _authenticate(self, transport: Transport, token: str | None) -> Principal:
        if token is None:
            raw: str | bytes | None = None
            with anyio.move_on_after(AUTH_TIMEOUT):
                raw = await transport.receive()
            if raw is None:
                raise AuthenticationError(
                    "send 'Authorization: Bearer <key>' on the upgrade, or the frame "
                    '{"type": "auth", "token": "<key>"} first, within 10 seconds'
                )
            frame: Any = None
            if isinstance(raw, str):
                try:
                    frame = parse_json(raw)
                except (ValueError, JsonTooDeepError):  # not an auth frame
                    frame = None
            if not (
                isinstance(frame, dict)
                and frame.get("type") == "auth"
                and isinstance(frame.get("token"), str)
            ):
                raise AuthenticationError(
                    'the first frame must be {"type": "auth", "token": "<key>"} when no '
                    "Authorization header was sent"
                )
            token = frame["token"]
        if not token:
            raise AuthenticationError("the credential is empty")
        if token.startswith(TICKET_PREFIX):
            token = self.tickets.redeem(token)  # then authenticated like the credential itself
        return await self.orgs.authenticate(token)

    async def shutdown(self, grace: float = 3.0) -> None:
        """Refuse new sockets, send every connection ``disconnect`` ``shutdown`` (with its
        ``resume``) and close it with 1001; wait up to ``grace`` seconds for them to end."""
        self._closing = True
        for conn in list(self.connections):
            conn.request_close("shutdown", CLOSE_GOING_AWAY)
        with anyio.move_on_after(grace):
            await self._empty.wait()

    # ------------------------------------------------------------------ fan-out

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The engine's own tasks, until cancelled: the fan-out (committed batches from the hub
        to every following connection) and the heartbeat (one ``ping`` per connection every
        ``heartbeat`` seconds, closing clients silent for 3 heartbeats)."""
        hub = self.ctx.hub
        self._sub = hub.subscribe(set(self._followers), buffer=HUB_BUFFER)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeats)
                task_status.started()
                await self._fan_out_forever()
        finally:
            self._sub.close()
            self._sub = None

    async def _heartbeats(self) -> None:
        """Every ``heartbeat`` seconds, one :meth:`Connection.beat` per connection."""
        while True:
            await anyio.sleep(self.heartbeat)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.beat(now)

    async def _fan_out_forever(self) -> None:
        hub = self.ctx.hub
        while True:
            assert self._sub is not None
            envs = await self._sub.receive_batch(1000)
            if envs:
                await self._fan_out(envs)
                continue
            # the hub dropped the subscription (it lagged): subscribe again, then send
            # every follow back to catching up from the WAL (nothing is lost there)
            self.feed_resubscribes += 1
            log.warning("realtime.feed_lagged", followed_threads=len(self._followers))
            self._sub = hub.subscribe(set(self._followers), buffer=HUB_BUFFER)
            for follows in self._followers.values():
                for f in follows:
                    f.live = False
                    f.pending.clear()
                    f.overflow = True
                    f.conn.schedule_catchup(f)

    async def _fan_out(self, envs: list[Envelope]) -> None:
        followers = self._followers
        wanted = [e for e in envs if e.thread_id in followers]
        if not wanted:
            return
        texts = await self.render_frames(wanted)
        for env, text in zip(wanted, texts, strict=True):
            follows = followers.get(env.thread_id)
            if follows:
                for f in tuple(follows):
                    f.conn.offer(f, env, text)

    async def render_frames(self, envs: list[Envelope]) -> list[str]:
        """The ``envelope`` frame text of each envelope, rendered exactly like the REST items.

        Texts of recent envelopes are cached (the live fan-out renders each envelope once, and
        replays of recent history, such as a reconnect storm, reuse those texts); sender names
        come from a cache too (one query for the missing ones, if any). Both caches expire
        after ``NAME_TTL`` seconds, so a renamed sender shows its new name by then.
        """
        now = time.monotonic()
        frames, names = self._frames, self._names
        out: list[str | None] = []
        todo: list[Envelope] = []
        for e in envs:
            hit = frames.get((e.thread_id, e.seq))
            text = hit[0] if hit is not None and hit[1] > now and hit[2] == e.id else None
            out.append(text)
            if text is None:
                todo.append(e)
        if not todo:
            return [t for t in out if t is not None]
        missing = [e for e in todo if (known := names.get(e.sender_id)) is None or known[2] < now]
        if missing:
            with anyio.CancelScope(shield=True):  # never interrupt a query
                async with self.db_slots, self.ctx.engine.connect() as db:
                    found = await sender_names(db, missing)
            if len(names) + len(found) > NAME_CACHE_MAX:
                names.clear()
            for sender_id, (name, org_name) in found.items():
                names[sender_id] = (name, org_name, now + NAME_TTL)
        rendered = iter(todo)
        for i, text in enumerate(out):
            if text is not None:
                continue
            e = next(rendered)
            name, org_name, _ = names.get(e.sender_id, ("", "", 0.0))
            text = dumps(
                {
                    "type": "envelope",
                    "thread_id": e.thread_id,
                    "envelope": render_envelope(e, name, org_name),
                }
            )
            out[i] = text
            frames[(e.thread_id, e.seq)] = (text, now + NAME_TTL, e.id)
        while len(frames) > FRAME_CACHE_MAX:  # drop the oldest (dicts keep insertion order)
            del frames[next(iter(frames))]
        return [t for t in out if t is not None]

    def stub_frame(self, env: Envelope) -> str:
        """The ``envelope`` frame text of ``env``'s stub (for a reader its audience excludes:
        seq, hash, prev_hash, ``"stub": true``); texts of recent stubs are cached."""
        key = (env.thread_id, env.seq)
        hit = self._stubs.get(key)
        if hit is not None and hit[1] == env.id:
            return hit[0]
        text = dumps({"type": "envelope", "thread_id": env.thread_id, "envelope": render_stub(env)})
        self._stubs[key] = (text, env.id)
        while len(self._stubs) > FRAME_CACHE_MAX:  # drop the oldest (dicts keep insertion order)
            del self._stubs[next(iter(self._stubs))]
        return text

    def _index(self, f: Follow) -> None:
        follows = self._followers.get(f.thread_id)
        if follows is None:
            follows = self._followers[f.thread_id] = set()
            if self._sub is not None:
                self._sub.add_thread(f.thread_id)
        follows.add(f)

    def _unindex(self, f: Follow) -> None:
        follows = self._followers.get(f.thread_id)
        if follows is None or f not in follows:
            return
        follows.discard(f)
        if not follows:
            del self._followers[f.thread_id]
            if self._sub is not None:
                self._sub.discard_thread(f.thread_id)
