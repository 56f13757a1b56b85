"""Realtime delivery: the WebSocket protocol v1 (``docs/protocol.md``) independent of the socket.

The API layer (``api/routes/realtime.py``) only moves text frames; everything else is here:
authentication, join (replay then live), leave, post, ack, typing, heartbeats, access re-checks,
slow consumers and shutdown.

How one envelope reaches the sockets
------------------------------------
The service owns ONE hub :class:`~agent_network.hub.Subscription` whose thread set is the union
of the threads some connection follows (the hub indexes subscriptions by thread, so the hub's
cost per batch does not grow with the number of connections or of unrelated threads). One
fan-out task (:meth:`RealtimeService.run`) takes every committed batch, renders each envelope
once (the REST shape, sender names from a small TTL cache, so no query per envelope), serialises
the ``envelope`` frame once, and hands the same text to every following connection whose
audience check passes (a connection whose audience check fails gets the envelope's stub
instead, :func:`~agent_network.services.threads.render_stub`, also serialised once), by a
non-blocking put into the connection's bounded outbox. One writer task per connection drains
its outbox to the socket; the fan-out never awaits a socket.

Replay then live, without gap or duplicate
------------------------------------------
A join registers its :class:`Follow` (and the thread in the hub subscription) *before* reading
the store. While the follow is catching up, live frames for it are kept aside (``pending``); the
connection's control task reads the WAL in pages from ``after`` (waiting for room in the outbox:
a replay never overflows it), and when a read comes back short it appends the kept frames with a
higher seq and switches the follow to live, in one step with no await in between. Live frames
with ``seq <=`` the last one handled are dropped; a gap (which cannot happen unless the feed was
lost) sends the follow back to catching up from the store. If the hub drops the service's
subscription for lagging, it subscribes again and sends every follow back to catching up.

Access while connected
----------------------
``ServiceContext.access_epoch`` is bumped by every service method that removes access. Before a
connection is handed the next frame of a thread, the fan-out compares its ``checked_epoch``:
when it is stale, the frame is kept aside and the connection's control task re-checks the
credential (revoked or its subject deleted: ``disconnect`` ``revoked``, close 4401) and every
followed thread (``visible_thread``; lost ones get an ``error`` ``not_found`` and are dropped)
before anything else is sent. A credential with an expiry is re-read once that time has passed
— at the next heartbeat, before the next client frame is handled, and at any access re-check —
and the connection ends with ``disconnect`` ``expired`` (close 4401) unless the credential was
renewed meanwhile. (Not per delivered frame: that is the hot path; delivery may thus go on for
up to one heartbeat interval past the expiry.)

Slow consumers
--------------
A put into a full outbox marks the connection lagged: its follows leave the fan-out at once,
its tasks are cancelled, and it is sent (best effort, for at most ``lag_close_timeout`` seconds)
``disconnect`` ``lagged`` with ``resume`` = the last seq written to the socket per thread, then
closed with 4008. Nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import TaskStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    AgentNetworkError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from agent_network.hub import Subscription
from agent_network.json_limits import JsonTooDeepError, parse_json
from agent_network.model.envelope import Envelope
from agent_network.services.base import ServiceContext
from agent_network.services.orgs import OrgService
from agent_network.services.principal import WRITE, Principal, epoch_of, not_expired
from agent_network.services.scope import (
    audience_admits,
    org_member_ids,
    own_agent,
    own_user,
    visible_thread,
)
from agent_network.services.threads import (
    ThreadService,
    _sender_for,
    render_envelope,
    render_stub,
    sender_names,
)
from agent_network.store.delivery import advance_cursor, read_cursor
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    agents,
    credentials,
    members,
    platform_keys,
    thread_participants,
    users,
)

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = 1
AUTH_TIMEOUT = 10.0  # seconds to send the ``auth`` frame when no Authorization header was sent
MAX_FOLLOWS = 1000  # threads one connection may follow at once
REPLAY_PAGE = 500  # envelopes per WAL read while catching up
POSTS_IN_FLIGHT = 64  # posts of one connection processed concurrently (group commit)
POST_GRACE = 10.0  # seconds posts in flight may take to finish after their socket closed
TYPING_INTERVAL = 1.0  # seconds: at most one typing frame per (connection, thread, sender)
NAME_TTL = 30.0  # seconds a sender's display name is cached for rendering
NAME_CACHE_MAX = 50_000
FRAME_CACHE_MAX = 10_000  # rendered envelope frames kept for replays of recent history
HUB_BUFFER = 100_000  # envelopes the fan-out task may fall behind the hub before resubscribing
DB_SLOTS = 6  # concurrent database uses by realtime work (joins, replays, re-checks)
IDLE_HEARTBEATS = 3  # heartbeats of client silence before the connection is closed

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 4000
CLOSE_UNAUTHENTICATED = 4401
CLOSE_LAGGED = 4008
CLOSE_IDLE = 4009


class TransportClosed(Exception):
    """The socket is gone (the peer closed it or the server is tearing it down)."""


class Transport(Protocol):
    """What the service needs from a socket: text frames in and out, and closing it."""

    async def send(self, text: str) -> None:
        """Write one text frame; raise :class:`TransportClosed` when the socket is gone."""

    async def receive(self) -> str | bytes | None:
        """The next frame (``bytes`` for a binary frame), or None once the peer closed."""

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket with ``code`` (no error if it is already closed)."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


PING_TEXT = _dumps({"type": "ping"})

# ------------------------------------------------------------------------------ client frames


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    ref: str | int | None = None


class _AuthFrame(_Frame):
    token: str


class _JoinFrame(_Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    after: int | None = Field(default=None, ge=0)
    cursor: str | None = Field(default=None, min_length=1, max_length=100)


class _LeaveFrame(_Frame):
    thread_id: str = Field(min_length=1, max_length=100)


class _PostFrame(_Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    content: str
    agent_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None
    causation_id: str | None = Field(default=None, min_length=1, max_length=40)
    audience: list[str] | None = Field(default=None, min_length=1, max_length=200)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=50)


class _AckFrame(_Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    seq: int = Field(ge=0)
    cursor: str = Field(min_length=1, max_length=100)


class _TypingFrame(_Frame):
    thread_id: str = Field(min_length=1, max_length=100)
    agent_id: str | None = None
    user_id: str | None = None


class _PingFrame(_Frame):
    pass


FRAME_MODELS: dict[str, type[_Frame]] = {
    "auth": _AuthFrame,
    "join": _JoinFrame,
    "leave": _LeaveFrame,
    "post": _PostFrame,
    "ack": _AckFrame,
    "typing": _TypingFrame,
    "ping": _PingFrame,
    "pong": _PingFrame,
}


# frame type -> name of the Connection method handling it (``post`` runs as its own task)
HANDLERS = {
    "join": "_join",
    "leave": "_leave",
    "ack": "_ack",
    "typing": "_typing",
    "ping": "_ping",
    "pong": "_pong",
    "auth": "_auth_again",
}


def _validation_message(kind: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or '(frame)'}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return f"invalid {kind!r} frame: {problems}"


def error_frame(
    err: AgentNetworkError, ref: str | int | None = None, thread_id: str | None = None
) -> dict[str, Any]:
    """The ``error`` frame for ``err`` (REST code and message; ``details`` when it has some)."""
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details:
        body["details"] = err.details
    frame: dict[str, Any] = {"type": "error", "ref": ref, "error": body}
    if thread_id is not None:
        frame["thread_id"] = thread_id
    return frame


# ------------------------------------------------------------------------------ outbox


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
        _wake(self._getter)
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
        _wake(self._getter)

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
            _wake(self._putter)
        return item

    def clear(self) -> None:
        """Drop every queued frame."""
        self._items.clear()
        _wake(self._putter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


# ------------------------------------------------------------------------------ follows


@dataclass(eq=False, slots=True)
class Follow:
    """One connection following one thread since its join.

    ``after`` is where the join started; ``seq`` the last envelope handled (sent whole, or as
    a stub when the audience rule hides it). While ``live`` is False the control task is
    catching up from the WAL and the fan-out keeps frames aside in ``pending`` (``(seq, text)``);
    ``overflow`` means some were dropped and the store must be read again.
    """

    conn: Connection
    thread_id: str
    after: int
    seq: int
    live: bool = False
    pending: list[tuple[int, str]] = field(default_factory=list)
    overflow: bool = False


# ------------------------------------------------------------------------------ connection


class Connection:
    """One authenticated WebSocket: a task group of a reader, a writer and (while it has work)
    a control task, plus one task per post in flight in a second task group that closing the
    socket does not cancel. Created by :meth:`RealtimeService.serve`."""

    __slots__ = (
        "_catchup",
        "_control_running",
        "_expiry_checking",
        "_idle_post_workers",
        "_post_frames",
        "_post_room",
        "_post_workers",
        "_posts_in_flight",
        "_scope",
        "_tg",
        "_typing_at",
        "_typing_epoch",
        "_typing_senders",
        "acts_for",
        "checked_epoch",
        "close_frame",
        "close_request",
        "closed",
        "follows",
        "last_heard",
        "outbox",
        "principal",
        "sent",
        "service",
        "subscriber_id",
        "transport",
    )

    def __init__(self, service: RealtimeService, transport: Transport, principal: Principal):
        self.service = service
        self.transport = transport
        self.principal = principal
        self.subscriber_id = principal.subject_id or principal.org_id or principal.key_id
        self.outbox = Outbox(service.buffer)
        self.follows: dict[str, Follow] = {}
        self.sent: dict[str, int] = {}
        self.checked_epoch = service.ctx.access_epoch
        self._expiry_checking = False  # a heartbeat's check_expiry is running
        self.acts_for: frozenset[str] = frozenset()
        self.close_request: tuple[str, int] | None = None
        self.close_frame: dict[str, Any] | None = None
        self.closed = False  # the socket's tasks have ended (posts may still be finishing)
        self.last_heard = time.monotonic()
        self._scope: anyio.CancelScope | None = None
        self._catchup: dict[str, Follow] = {}
        self._control_running = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._posts_in_flight = 0
        self._post_room: asyncio.Future[None] | None = None
        # post frames wait here for a post worker (at most POSTS_IN_FLIGHT workers, started
        # on demand and kept: spawning a task per post cost ~12% of the event loop's CPU)
        self._post_frames: asyncio.Queue[_PostFrame | None] | None = None  # at the first post
        self._post_workers = 0
        self._idle_post_workers = 0
        self._typing_at: dict[tuple[str, str | None, str | None], float] = {}
        self._typing_senders: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
        self._typing_epoch = self.checked_epoch

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until the peer leaves or the server closes it, then send the
        closing frames (if the server closes it) and close the socket."""
        self.reply(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "principal": {
                    "kind": self.principal.kind,
                    "org_id": self.principal.org_id,
                    "subject_id": self.principal.subject_id,
                },
                "heartbeat": self.service.heartbeat,
            }
        )
        if self.principal.kind == "org":
            await self._load_acts_for()
        # Posts run in their own task group: closing the socket does not interrupt them (a
        # cancelled append or query helps nobody); they get POST_GRACE seconds to finish.
        async with anyio.create_task_group() as posts:
            try:
                async with anyio.create_task_group() as tg:
                    self._scope, self._tg = tg.cancel_scope, tg
                    if self.close_request is not None:
                        tg.cancel_scope.cancel()
                    tg.start_soon(self._writer)
                    await self._reader(posts)
                    tg.cancel_scope.cancel()
            finally:
                self.closed = True
                self._tg = None
                for f in self.follows.values():
                    self.service._unindex(f)
                for _ in range(self._post_workers):  # each ends after the frames before it
                    assert self._post_frames is not None
                    self._post_frames.put_nowait(None)
            await self._finish()
            posts.cancel_scope.deadline = anyio.current_time() + POST_GRACE

    def request_close(self, reason: str, code: int, frame: dict[str, Any] | None = None) -> None:
        """Close from the server side: stop following everything now, cancel the tasks, then
        send ``frame`` (default: ``disconnect`` with ``reason`` and ``resume``) and close with
        ``code``. The first request wins; safe to call from any task."""
        if self.close_request is not None:
            return
        self.close_request = (reason, code)
        self.close_frame = frame
        for f in self.follows.values():
            self.service._unindex(f)
        if self._scope is not None:
            self._scope.cancel()

    def resume(self) -> dict[str, int]:
        """Per followed thread, the last seq written to the socket (the join's ``after`` if
        none): where to ``join`` again with ``after``."""
        return {tid: self.sent.get(tid, f.after) for tid, f in self.follows.items()}

    async def _finish(self) -> None:
        if self.close_request is None:
            return  # the peer left
        reason, code = self.close_request
        frame = self.close_frame or {
            "type": "disconnect",
            "reason": reason,
            "resume": self.resume(),
        }
        self.outbox.clear()
        timeout = self.service.lag_close_timeout if code == CLOSE_LAGGED else 2.0
        with anyio.move_on_after(timeout):
            try:
                await self.transport.send(_dumps(frame))
            except TransportClosed:
                return
            await self.transport.close(code, reason)

    # ------------------------------------------------------------------ tasks

    async def _reader(self, posts: anyio.abc.TaskGroup) -> None:
        while True:
            raw = await self.transport.receive()
            if raw is None:
                return
            self.last_heard = time.monotonic()
            if self._expired() and not await self.check_expiry():
                return
            obj: Any = None
            if isinstance(raw, str):
                try:
                    obj = parse_json(raw)
                except JsonTooDeepError as too_deep:
                    self.reply_error(too_deep, None)  # refused; the connection stays
                    continue
                except ValueError:
                    obj = None
            kind = obj.get("type") if isinstance(obj, dict) else None
            if not isinstance(kind, str):
                err = InvalidRequestError(
                    "protocol error: every frame must be a JSON object (text frame) with a "
                    "string 'type'; closing"
                )
                self.request_close("protocol_error", CLOSE_PROTOCOL, error_frame(err))
                return
            assert isinstance(obj, dict)
            ref = obj.get("ref")
            if not isinstance(ref, str | int) or isinstance(ref, bool):
                ref = None
            model = FRAME_MODELS.get(kind)
            if model is None:
                known = ", ".join(sorted(k for k in FRAME_MODELS if k != "auth"))
                self.reply_error(
                    InvalidRequestError(f"unknown frame type {kind!r}; expected one of: {known}"),
                    ref,
                )
                continue
            try:
                frame = model.model_validate(obj)
            except ValidationError as exc:
                self.reply_error(InvalidRequestError(_validation_message(kind, exc)), ref)
                continue
            if isinstance(frame, _PostFrame):
                while self._posts_in_flight >= POSTS_IN_FLIGHT:  # back-pressure on the socket
                    self._post_room = asyncio.get_running_loop().create_future()
                    try:
                        await self._post_room
                    finally:
                        self._post_room = None
                self._posts_in_flight += 1
                if self._post_frames is None:
                    self._post_frames = asyncio.Queue()
                self._post_frames.put_nowait(frame)
                if (
                    self._post_frames.qsize() > self._idle_post_workers
                    and self._post_workers < POSTS_IN_FLIGHT
                ):
                    self._post_workers += 1
                    posts.start_soon(self._post_worker)
                continue
            handler: Callable[[Any], Awaitable[None]] = getattr(self, HANDLERS[kind])
            try:
                await handler(frame)
            except AgentNetworkError as err:
                self.reply_error(err, ref, getattr(frame, "thread_id", None))
            except Exception:
                log.exception("realtime.frame_failed", type=kind)
                self.reply_error(_internal(), ref)

    async def _writer(self) -> None:
        outbox, send, sent = self.outbox, self.transport.send, self.sent
        n = 0
        try:
            while True:
                text, thread_id, seq = await outbox.get()
                await send(text)
                if thread_id is not None:
                    sent[thread_id] = seq
                del text  # an idle connection keeps no copy of its last frame
                n += 1
                if n % 64 == 0:  # a long backlog must not monopolise the event loop
                    await anyio.lowlevel.checkpoint()
        except TransportClosed:
            if self._scope is not None:
                self._scope.cancel()

    def beat(self, now: float) -> None:
        """One heartbeat (called by the service's heartbeat task): close the connection if
        the client was silent for ``IDLE_HEARTBEATS`` heartbeats, else queue a ``ping``; past
        the credential's known expiry, start :meth:`check_expiry`."""
        if now - self.last_heard > IDLE_HEARTBEATS * self.service.heartbeat:
            self.request_close("idle", CLOSE_IDLE)
        elif not self.closed:
            self.outbox.put_nowait((PING_TEXT, None, 0))  # dropped if full: lag shows elsewhere
            if self._expired() and not self._expiry_checking and self._tg is not None:
                self._expiry_checking = True
                self._tg.start_soon(self.check_expiry)

    def _expired(self) -> bool:
        """Past the expiry the credential had when last checked (a renewal may have moved it)."""
        at = self.principal.expires_at
        return at is not None and time.time() >= at

    async def check_expiry(self) -> bool:
        """Re-read the credential once its known expiry has passed: renewed, the connection
        goes on with the new expiry; expired (or revoked, or its subject deleted) it sends
        ``disconnect`` ``expired`` and closes with 4401. Returns whether it goes on."""
        try:
            with anyio.CancelScope(shield=True):  # never interrupt a query
                async with self.service.db_slots, self.service.ctx.engine.connect() as db:
                    live = await credential_live(db, self.principal)
                    at = (
                        await db.execute(
                            select(credentials.c.expires_at).where(
                                credentials.c.id == self.principal.key_id
                            )
                        )
                    ).scalar()
        finally:
            self._expiry_checking = False
        if not live:
            self.request_close("expired", CLOSE_UNAUTHENTICATED)
            return False
        self.principal = dataclasses.replace(self.principal, expires_at=epoch_of(at))
        return True

    async def _control(self) -> None:
        """Catch follows up from the WAL (joins, re-checks, lost feed), one at a time; runs
        only while there is such work (started by :meth:`schedule_catchup`)."""
        try:
            while self._catchup:
                thread_id = next(iter(self._catchup))
                f = self._catchup.pop(thread_id)
                await self._catch_up(f)
        finally:
            self._control_running = False

    # ------------------------------------------------------------------ delivery

    def reply(self, frame: dict[str, Any]) -> None:
        """Queue a reply frame; a full outbox marks the connection lagged. Dropped once the
        connection is closed (a post finishing after the socket went away)."""
        if self.closed:
            return
        if not self.outbox.put_nowait((_dumps(frame), None, 0)):
            self.lagged()

    def reply_error(
        self, err: AgentNetworkError, ref: str | int | None, thread_id: str | None = None
    ) -> None:
        """Queue an ``error`` frame for ``err``."""
        self.reply(error_frame(err, ref, thread_id))

    def lagged(self) -> None:
        """The outbox overflowed: disconnect with ``lagged`` (see module docstring)."""
        if self.close_request is None:
            log.info("realtime.lagged", principal=self.principal.key_id, resume=self.resume())
            self.service.lagged_connections += 1
            self.request_close("lagged", CLOSE_LAGGED)

    def offer(self, f: Follow, env: Envelope, text: str) -> None:
        """The fan-out's hand-off of one live envelope to one follow (never waits)."""
        if self.close_request is not None:
            return
        if not audience_admits(self.principal, env, self.acts_for):
            text = self.service.stub_frame(env)  # its place in the chain, nothing else
        if not f.live:
            if len(f.pending) >= self.outbox.capacity:
                f.overflow = True
                f.pending.clear()
            elif not f.overflow:
                f.pending.append((env.seq, text))
            return
        if env.seq <= f.seq:
            return
        if env.seq != f.seq + 1 or self.checked_epoch != self.service.ctx.access_epoch:
            # access must be re-checked first (or, defensively, a gap): back to catching up
            f.live = False
            f.pending = [(env.seq, text)]
            self.schedule_catchup(f)
            return
        f.seq = env.seq
        if not self.outbox.put_nowait((text, f.thread_id, env.seq)):
            self.lagged()

    def schedule_catchup(self, f: Follow) -> None:
        """Have the control task catch ``f`` up from the WAL (starting the task if needed)."""
        self._catchup[f.thread_id] = f
        if not self._control_running and self._tg is not None and self.close_request is None:
            self._control_running = True
            self._tg.start_soon(self._control)

    def _current(self, f: Follow) -> bool:
        return self.close_request is None and self.follows.get(f.thread_id) is f

    async def _catch_up(self, f: Follow) -> None:
        service = self.service
        while self._current(f) and not f.live:
            if not await self.ensure_access() or not self._current(f):
                return
            with anyio.CancelScope(shield=True):  # never interrupt a query
                async with service.db_slots:
                    envs = await service.ctx.hub.read(f.thread_id, after=f.seq, limit=REPLAY_PAGE)
            texts = await service.render_frames(envs)
            for env, text in zip(envs, texts, strict=True):
                if not self._current(f):
                    return
                if env.seq <= f.seq:
                    continue
                if not audience_admits(self.principal, env, self.acts_for):
                    text = service.stub_frame(env)  # its place in the chain, nothing else
                await self.outbox.put_replay((text, f.thread_id, env.seq))
                if not self._current(f):
                    return
                f.seq = env.seq
            if len(envs) == REPLAY_PAGE:
                continue
            if f.overflow or self.checked_epoch != service.ctx.access_epoch:
                f.overflow = False
                f.pending.clear()
                continue
            ahead = [(seq, kept) for seq, kept in f.pending if seq > f.seq]
            contiguous = all(seq == f.seq + i for i, (seq, _) in enumerate(ahead, start=1))
            if not contiguous or self.outbox.free < len(ahead):
                f.pending.clear()  # read them from the store instead
                continue
            for seq, kept in ahead:
                self.outbox.put_nowait((kept, f.thread_id, seq))
                f.seq = seq
            f.pending.clear()
            f.live = True

    async def ensure_access(self) -> bool:
        """Re-check the credential and every followed thread if the access epoch moved since
        the last check. False when the connection is closing (credential no longer valid).
        Only the control task calls this, so two checks never overlap."""
        ctx = self.service.ctx
        epoch = ctx.access_epoch
        if epoch == self.checked_epoch and not self._expired():
            return self.close_request is None
        if self._expired() and not await self.check_expiry():
            return False
        lost: list[str] = []
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots, ctx.engine.connect() as db:
                live = await credential_live(db, self.principal)
                for thread_id in list(self.follows) if live else ():
                    try:
                        await visible_thread(db, self.principal, thread_id)
                    except NotFoundError:
                        lost.append(thread_id)
                if live and self.principal.kind == "org":
                    self.acts_for = await org_member_ids(db, self.principal)
        if not live:  # (closed outside the database block: closing cancels this task)
            self.request_close("revoked", CLOSE_UNAUTHENTICATED)
            return False
        for thread_id in lost:
            self._drop(thread_id)
            self.reply_error(NotFoundError("thread", thread_id), None, thread_id)
        self.checked_epoch = epoch
        return self.close_request is None

    def _drop(self, thread_id: str) -> None:
        f = self.follows.pop(thread_id, None)
        if f is not None:
            self.service._unindex(f)
            self._catchup.pop(thread_id, None)

    async def _load_acts_for(self) -> None:
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots, self.service.ctx.engine.connect() as db:
                self.acts_for = await org_member_ids(db, self.principal)

    # ------------------------------------------------------------------ frames

    async def _join(self, frame: _JoinFrame) -> None:
        service, thread_id = self.service, frame.thread_id
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with service.db_slots, service.ctx.engine.connect() as db:
                await visible_thread(db, self.principal, thread_id)
                if frame.after is not None:
                    after = frame.after
                elif frame.cursor is not None:
                    after = await read_cursor(db, self.subscriber_id, frame.cursor, thread_id)
                else:
                    after = 0
            last_seq = (await service.ctx.hub.state(thread_id)).last_seq
        if after > last_seq:
            raise InvalidRequestError(
                f"after={after} is beyond the last seq of thread {thread_id!r} ({last_seq})"
            )
        if thread_id not in self.follows and len(self.follows) >= MAX_FOLLOWS:
            raise InvalidRequestError(
                f"a connection follows at most {MAX_FOLLOWS} threads; leave one first"
            )
        if self.close_request is not None:
            return
        self._drop(thread_id)  # joining again restarts from the new position
        self.sent.pop(thread_id, None)
        f = Follow(self, thread_id, after=after, seq=after)
        self.follows[thread_id] = f
        service._index(f)  # subscribe before reading the replay
        self.reply(
            {
                "type": "joined",
                "ref": frame.ref,
                "thread_id": thread_id,
                "after": after,
                "last_seq": last_seq,
            }
        )
        self.schedule_catchup(f)

    async def _leave(self, frame: _LeaveFrame) -> None:
        self._drop(frame.thread_id)
        self.reply({"type": "left", "ref": frame.ref, "thread_id": frame.thread_id})

    async def _post_worker(self) -> None:
        """Run queued post frames one after another until a ``None`` says the reader ended."""
        frames = self._post_frames
        assert frames is not None, "started by the reader after it queued a frame"
        while True:
            self._idle_post_workers += 1
            try:
                frame = await frames.get()
            finally:
                self._idle_post_workers -= 1
            if frame is None:
                return
            await self._post(frame)

    async def _post(self, frame: _PostFrame) -> None:
        try:
            if WRITE not in self.principal.scopes:
                raise PermissionDeniedError("this credential is read-only")
            env = await self.service.threads.post(
                self.principal,
                frame.thread_id,
                frame.content,
                agent_id=frame.agent_id,
                user_id=frame.user_id,
                idempotency_key=frame.idempotency_key,
                causation_id=frame.causation_id,
                audience=frame.audience,
                tool_calls=frame.tool_calls,
            )
            self.reply({"type": "posted", "ref": frame.ref, "envelope": env})
        except AgentNetworkError as err:
            self.reply_error(err, frame.ref, frame.thread_id)
        except Exception:
            log.exception("realtime.post_failed")
            self.reply_error(_internal(), frame.ref, frame.thread_id)
        finally:
            self._posts_in_flight -= 1
            _wake(self._post_room)

    async def _ack(self, frame: _AckFrame) -> None:
        service = self.service
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with service.db_slots, service.ctx.engine.connect() as db:
                await visible_thread(db, self.principal, frame.thread_id)
            last_seq = (await service.ctx.hub.state(frame.thread_id)).last_seq
        if frame.seq > last_seq:
            raise InvalidRequestError(
                f"seq={frame.seq} is beyond the last seq of thread {frame.thread_id!r} ({last_seq})"
            )
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with service.db_slots, write_transaction(service.ctx.engine) as db:
                seq = await advance_cursor(
                    db, self.subscriber_id, frame.cursor, frame.thread_id, frame.seq
                )
        self.reply(
            {
                "type": "acked",
                "ref": frame.ref,
                "thread_id": frame.thread_id,
                "cursor": frame.cursor,
                "seq": seq,
            }
        )

    async def _typing(self, frame: _TypingFrame) -> None:
        if WRITE not in self.principal.scopes:
            raise PermissionDeniedError("this credential is read-only")
        key = (frame.thread_id, frame.agent_id, frame.user_id)
        now = time.monotonic()
        if now - self._typing_at.get(key, -TYPING_INTERVAL) < TYPING_INTERVAL:
            return  # throttled: typing is a hint, not a message
        if len(self._typing_at) > 1000:
            self._typing_at.clear()
        self._typing_at[key] = now
        sender = await self._typing_sender(frame)
        text = _dumps({"type": "typing", "thread_id": frame.thread_id, "sender": sender})
        epoch = self.service.ctx.access_epoch
        for f in tuple(self.service._followers.get(frame.thread_id, ())):
            other = f.conn
            if other is not self and f.live and other.checked_epoch == epoch:
                other.outbox.put_nowait((text, None, 0))  # dropped when full

    async def _typing_sender(self, frame: _TypingFrame) -> dict[str, Any]:
        """The typing sender, checked like a post's sender (own agent/user, member of the
        thread's team, participant of a restricted thread); cached until access changes."""
        epoch = self.service.ctx.access_epoch
        if epoch != self._typing_epoch:
            self._typing_senders.clear()
            self._typing_epoch = epoch
        key = (frame.thread_id, frame.agent_id, frame.user_id)
        cached = self._typing_senders.get(key)
        if cached is not None:
            return cached
        agent_id, user_id = _sender_for(self.principal, frame.agent_id, frame.user_id)
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots, self.service.ctx.engine.connect() as db:
                thread, team = await visible_thread(db, self.principal, frame.thread_id)
                if agent_id is not None:
                    who, kind = await own_agent(db, self.principal, agent_id), "agent"
                else:
                    assert user_id is not None
                    who, kind = await own_user(db, self.principal, user_id), "user"
                member = await db.execute(
                    select(members.c.role).where(
                        members.c.team_id == team["id"],
                        members.c.member_kind == kind,
                        members.c.member_id == who["id"],
                    )
                )
                allowed = member.first() is not None
                if allowed and thread["visibility"] == "restricted":
                    part = await db.execute(
                        select(thread_participants.c.member_id).where(
                            thread_participants.c.thread_id == frame.thread_id,
                            thread_participants.c.member_kind == kind,
                            thread_participants.c.member_id == who["id"],
                        )
                    )
                    allowed = part.first() is not None
        if not allowed:
            raise PermissionDeniedError(f"{kind} {who['name']!r} does not take part in this thread")
        sender = {"kind": kind, "id": who["id"], "org_id": who["org_id"], "name": who["name"]}
        if len(self._typing_senders) > 1000:
            self._typing_senders.clear()
        self._typing_senders[key] = sender
        return sender

    async def _ping(self, frame: _PingFrame) -> None:
        self.reply({"type": "pong", "ref": frame.ref})

    async def _pong(self, frame: _PingFrame) -> None:
        return None  # any frame counts as a sign of life (``last_heard``)

    async def _auth_again(self, frame: _AuthFrame) -> None:
        raise InvalidRequestError("this connection is already authenticated")


def _internal() -> AgentNetworkError:
    err = AgentNetworkError("internal error while handling the frame; it was logged")
    err.code = "internal_error"
    err.status = 500
    return err


async def credential_live(conn: AsyncConnection, principal: Principal) -> bool:
    """Whether the credential behind ``principal`` still authenticates: not revoked, not
    expired, and for a user or agent token, its subject not deleted."""
    if principal.kind == "admin":
        q = select(platform_keys.c.id).where(
            platform_keys.c.id == principal.key_id, platform_keys.c.revoked_at.is_(None)
        )
        return (await conn.execute(q)).first() is not None
    q = select(credentials.c.id).where(
        credentials.c.id == principal.key_id, credentials.c.revoked_at.is_(None), not_expired()
    )
    if (await conn.execute(q)).first() is None:
        return False
    table = {"user": users, "agent": agents}.get(principal.kind)
    if table is None:
        return True
    q = select(table.c.id).where(table.c.id == principal.subject_id, table.c.deleted_at.is_(None))
    return (await conn.execute(q)).first() is not None


# ------------------------------------------------------------------------------ service


class RealtimeService:
    """Realtime delivery for one server process (see the module docstring).

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
                await transport.send(_dumps(error_frame(err)))
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
        """The service's own tasks, until cancelled: the fan-out (committed batches from the hub
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
            text = _dumps(
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
        text = _dumps(
            {"type": "envelope", "thread_id": env.thread_id, "envelope": render_stub(env)}
        )
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
