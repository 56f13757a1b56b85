"""One WebSocket connection of the realtime protocol: its reader, writer and control tasks,
the frames it handles, and the :class:`Follow` of each thread it joined.

How delivery, replay and access re-checks work: the package docstring (``api/realtime``);
the frames: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from pydantic import ValidationError

from agent_network.api.realtime.frames import (
    CLOSE_IDLE,
    CLOSE_LAGGED,
    CLOSE_PROTOCOL,
    CLOSE_UNAUTHENTICATED,
    FRAME_MODELS,
    HANDLERS,
    IDLE_HEARTBEATS,
    MAX_FOLLOWS,
    PING_TEXT,
    POST_GRACE,
    POSTS_IN_FLIGHT,
    PROTOCOL_VERSION,
    REPLAY_PAGE,
    TYPING_INTERVAL,
    AckFrame,
    AcksFrame,
    AuthFrame,
    JoinFrame,
    LeaveFrame,
    PingFrame,
    PostFrame,
    Transport,
    TransportClosed,
    TypingFrame,
    WatchFrame,
    dumps,
    error_frame,
    internal_error,
    validation_message,
)
from agent_network.api.realtime.outbox import Outbox, wake
from agent_network.errors import (
    AgentNetworkError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from agent_network.json_limits import JsonInputError, parse_json
from agent_network.model.envelope import Envelope
from agent_network.services.delivery import Inbox
from agent_network.services.live_access import credential_expiry, credential_live, typing_sender
from agent_network.services.principal import WRITE, Principal
from agent_network.services.scope import audience_admits, org_member_ids, visible_thread
from agent_network.store.cursors import advance_cursor, read_cursor
from agent_network.store.engine import write_transaction

if TYPE_CHECKING:
    from agent_network.api.realtime.engine import RealtimeProtocol

log = structlog.get_logger(__name__)


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


class Connection:
    """One authenticated WebSocket: a task group of a reader, a writer and (while it has work)
    a control task, plus one task per post in flight in a second task group that closing the
    socket does not cancel. Created by :meth:`RealtimeProtocol.serve`."""

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
        "_watching",
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

    def __init__(self, service: RealtimeProtocol, transport: Transport, principal: Principal):
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
        self._post_frames: asyncio.Queue[PostFrame | None] | None = None  # at the first post
        self._post_workers = 0
        self._idle_post_workers = 0
        self._typing_at: dict[tuple[str, str | None, str | None], float] = {}
        self._typing_senders: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
        self._typing_epoch = self.checked_epoch
        self._watching: Inbox | None = None  # the ``watch`` of this connection, once asked

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
                await self.transport.send(dumps(frame))
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
                except JsonInputError as refused:
                    self.reply_error(refused, None)  # refused; the connection stays
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
                self.reply_error(InvalidRequestError(validation_message(kind, exc)), ref)
                continue
            if isinstance(frame, PostFrame):
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
                self.reply_error(internal_error(), ref)

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
                    at = await credential_expiry(db, self.principal)
        finally:
            self._expiry_checking = False
        if not live:
            self.request_close("expired", CLOSE_UNAUTHENTICATED)
            return False
        self.principal = dataclasses.replace(self.principal, expires_at=at)
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
        if not self.outbox.put_nowait((dumps(frame), None, 0)):
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

    async def _join(self, frame: JoinFrame) -> None:
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

    async def _leave(self, frame: LeaveFrame) -> None:
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

    async def _post(self, frame: PostFrame) -> None:
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
            self.reply_error(internal_error(), frame.ref, frame.thread_id)
        finally:
            self._posts_in_flight -= 1
            wake(self._post_room)

    async def _ack(self, frame: AckFrame) -> None:
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

    async def _watch(self, frame: WatchFrame) -> None:
        """``watch``: every envelope of every thread this credential may read, pushed (a
        services.delivery Inbox on cursor ``frame.cursor``), as ``envelope`` frames marked
        ``"watch": true``; ``watching`` answers once the backlog is being sent."""
        if self._watching is not None:
            raise InvalidRequestError("this connection already watches; one watch per connection")
        assert self._tg is not None
        await self._tg.start(self._run_watch, frame.cursor)
        self.reply({"type": "watching", "ref": frame.ref, "cursor": frame.cursor})

    async def _run_watch(
        self, cursor: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        inbox = Inbox(self.service.ctx, self._live_principal, self.principal, cursor)
        async with inbox:
            self._watching = inbox
            task_status.started()
            try:
                while True:
                    for env, rendered in await inbox.receive():
                        text = dumps(
                            {
                                "type": "envelope",
                                "thread_id": env.thread_id,
                                "envelope": rendered,
                                "watch": True,
                            }
                        )
                        await self.outbox.put_replay((text, None, 0))
            except AuthenticationError:
                self.request_close("revoked", CLOSE_UNAUTHENTICATED)

    async def _live_principal(self) -> Principal:
        """The principal again, if its credential still authenticates (its expiry as now
        stored); AuthenticationError otherwise (the watch's re-check)."""
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots, self.service.ctx.engine.connect() as db:
                live = await credential_live(db, self.principal)
                at = await credential_expiry(db, self.principal) if live else None
        if not live:
            raise AuthenticationError("the credential was revoked or expired; connect again")
        self.principal = dataclasses.replace(self.principal, expires_at=at)
        return self.principal

    async def _acks(self, frame: AcksFrame) -> None:
        """``acks``: move the watch's cursor in each thread of ``positions`` (one transaction);
        answered by ``acked`` with the positions."""
        if self._watching is None:
            raise InvalidRequestError("send 'watch' first: 'acks' moves the watch's cursor")
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots:
                await self._watching.ack(frame.positions)
        self.reply(
            {
                "type": "acked",
                "ref": frame.ref,
                "cursor": self._watching.cursor,
                "positions": frame.positions,
            }
        )

    async def _typing(self, frame: TypingFrame) -> None:
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
        text = dumps({"type": "typing", "thread_id": frame.thread_id, "sender": sender})
        epoch = self.service.ctx.access_epoch
        for f in tuple(self.service._followers.get(frame.thread_id, ())):
            other = f.conn
            if other is not self and f.live and other.checked_epoch == epoch:
                other.outbox.put_nowait((text, None, 0))  # dropped when full

    async def _typing_sender(self, frame: TypingFrame) -> dict[str, Any]:
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
        with anyio.CancelScope(shield=True):  # never interrupt a query
            async with self.service.db_slots, self.service.ctx.engine.connect() as db:
                sender = await typing_sender(
                    db, self.principal, frame.thread_id, frame.agent_id, frame.user_id
                )
        if len(self._typing_senders) > 1000:
            self._typing_senders.clear()
        self._typing_senders[key] = sender
        return sender

    async def _ping(self, frame: PingFrame) -> None:
        self.reply({"type": "pong", "ref": frame.ref})

    async def _pong(self, frame: PingFrame) -> None:
        return None  # any frame counts as a sign of life (``last_heard``)

    async def _auth_again(self, frame: AuthFrame) -> None:
        raise InvalidRequestError("this connection is already authenticated")
