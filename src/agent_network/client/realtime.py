"""Realtime rooms over the WebSocket protocol (``docs/protocol.md``, version 1).

```python
async with client.realtime() as rt:
    room = await rt.join(thread_id)            # replay from seq 1, then live
    async for env in room:                     # every envelope once, in seq order
        ...
        await room.post("thanks", agent_id=agent.id)
```

One connection per :class:`Realtime`. One reader task (owned by the context's task group,
cancelled and awaited on exit) reads every frame: replies are matched to requests by ``ref``;
``envelope`` frames go to their :class:`Room`'s buffer; ``ping`` is answered with ``pong``.
An envelope whose audience excludes the caller arrives as an :class:`EnvelopeStub` (seq, hash,
prev_hash only): iterating a room skips stubs (its seqs may skip numbers), iterating
:meth:`Room.entries` yields them too (the whole chain, for
:func:`agent_network.client.verify_chain`).

:meth:`Realtime.watch` receives every thread the credential may read without joining each (the
``watch`` frame; what hub clients use): see :class:`Watch`.

Delivery: each room remembers the last ``seq`` it received; when the socket drops, the server
sends ``disconnect`` (``lagged``, ``shutdown``...), the server falls silent for
``heartbeat_timeout`` seconds, or the room's own buffer overflows, the room joins again with
``after`` = that seq (reconnecting with exponential backoff first when needed). Envelopes with a
seq already received are dropped, so a consumer sees every envelope exactly once, in order, across
reconnects (at-least-once on the wire, de-duplicated by seq here).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import anyio
from anyio.abc import TaskGroup
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidStatus, WebSocketException

from agent_network.client.errors import (
    ApiError,
    ConnectionClosed,
    PermissionDenied,
    RealtimeError,
    TransportError,
    Unauthenticated,
    error_from_body,
)
from agent_network.client.models import Envelope, EnvelopeStub, Principal, Typing

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_BUFFER = 10_000
RECOVERABLE = (OSError, WebSocketException, TimeoutError, TransportError)

EnvelopeCallback = Callable[[Envelope], Awaitable[None] | None]
TypingCallback = Callable[[Typing], Awaitable[None] | None]


def ws_url(base_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/api/v1/ws`` (``https`` -> ``wss``)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}/api/v1/ws"


def _frame_error(frame: dict[str, Any]) -> ApiError:
    """The :class:`ApiError` of a WebSocket ``error`` frame (``status`` 0: no HTTP status)."""
    return error_from_body(0, {"error": frame.get("error")}, fallback="error frame")


@dataclass(eq=False)
class _Waiter:
    """A request waiting for the frame with its ``ref``."""

    on_reply: Callable[[dict[str, Any]], None] | None = None
    on_error: Callable[[ApiError], None] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: dict[str, Any] | None = None
    error: ApiError | None = None
    lost: bool = False

    def resolve(self, frame: dict[str, Any]) -> None:
        self.reply = frame
        if self.on_reply is not None:
            self.on_reply(frame)
        self.done.set()

    def fail(self, error: ApiError) -> None:
        self.error = error
        if self.on_error is not None:
            self.on_error(error)
        self.done.set()

    def lose(self) -> None:
        self.lost = True
        self.done.set()


@dataclass(eq=False)
class _Conn:
    """One WebSocket connection and the requests sent over it."""

    ws: ClientConnection
    heartbeat: float
    pending: dict[str, _Waiter] = field(default_factory=dict)
    alive: bool = True

    def drop(self) -> None:
        """Mark the connection dead; every request still waiting is lost."""
        self.alive = False
        for waiter in self.pending.values():
            waiter.lose()
        self.pending.clear()


class Room:
    """One followed thread. Iterate it (``async for env in room``) for its envelopes.

    ``thread_id``; ``cursor`` (the durable consumer name given to :meth:`Realtime.join`, used
    by :meth:`ack`); ``last_seq`` (the last seq handed to the consumer); ``last_joined``
    (``last_seq`` of the thread as the server reported it at the latest join).
    """

    def __init__(
        self,
        rt: Realtime,
        thread_id: str,
        *,
        after: int | None,
        cursor: str | None,
        buffer: int,
    ) -> None:
        self._rt = rt
        self.thread_id = thread_id
        self.cursor = cursor
        self.last_seq = 0  # last seq yielded to the consumer
        self.last_joined: int | None = None
        self._received = after or 0  # last seq accepted into the buffer
        self._known = after is not None  # _received is meaningful (else: the cursor decides)
        self._buffer: deque[Envelope | EnvelopeStub] = deque()
        self._max_buffer = buffer
        self._accepting = False  # between our join and its `joined`, frames are dropped
        self._stale = False  # the buffer overflowed: join again with after=_received
        self._joined = anyio.Event()
        self._wakeup = anyio.Event()
        self._left = False
        self._error: BaseException | None = None
        self._typing: list[TypingCallback] = []
        self._has_pump = False
        self.rejoins = 0

    # -- frames from the reader ---------------------------------------------------------------

    def _join_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "thread_id": self.thread_id}
        if self._known:
            frame["after"] = self._received
        if self.cursor is not None:
            frame["cursor"] = self.cursor
        return frame

    def _on_joined(self, frame: dict[str, Any]) -> None:
        after = frame.get("after")
        if isinstance(after, int) and (not self._known or after > self._received):
            # a cursor join starts where the durable cursor is
            self._received = after
            self.last_seq = max(self.last_seq, after)
        self._known = True
        last = frame.get("last_seq")
        self.last_joined = last if isinstance(last, int) else None
        self._accepting = True
        self._stale = False
        self._joined.set()
        self._wake()

    def _on_join_error(self, error: ApiError) -> None:
        self._fail(error)

    def _feed(self, env: Envelope | EnvelopeStub) -> None:
        # Envelopes whose audience excludes the caller arrive as stubs (older servers: never).
        if not self._accepting or env.seq <= self._received:
            return  # a frame of an older join, or a duplicate after a rejoin
        if len(self._buffer) >= self._max_buffer:
            log.info("room %s: buffer full; joining again once drained", self.thread_id)
            self._accepting = False
            self._stale = True
            self._wake()
            return
        self._buffer.append(env)
        self._received = env.seq
        self._wake()

    def _on_typing(self, event: Typing) -> None:
        for callback in self._typing:
            self._rt._call_soon(callback, event)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._accepting = False
        self._joined.set()
        self._wake()

    @property
    def buffered(self) -> int:
        """Envelopes received and not yet handed to the consumer."""
        return len(self._buffer)

    @property
    def stale(self) -> bool:
        """True after the buffer overflowed: the room joins again once the consumer drained it."""
        return self._stale

    def _close(self) -> None:
        self._left = True
        self._accepting = False
        self._joined.set()
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    # -- the consumer side --------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope:
        """The next envelope (seq order, each once; stubs of envelopes hidden from the caller
        are skipped). StopAsyncIteration once the room is left or the connection closed for
        good (after the buffered envelopes); the room's error (e.g. :class:`NotFound` when
        access to the thread was lost) is raised instead."""
        while True:
            item = await self._next_item()
            if isinstance(item, Envelope):
                return item

    async def entries(self) -> AsyncIterator[Envelope | EnvelopeStub]:
        """Iterate the room's whole chain: every envelope as :meth:`__anext__` yields it, and
        an :class:`EnvelopeStub` for each one whose audience hides it from the caller. Use
        either this or plain iteration of the room, not both."""
        while True:
            try:
                item = await self._next_item()
            except StopAsyncIteration:
                return
            yield item

    async def _next_item(self) -> Envelope | EnvelopeStub:
        while True:
            while self._buffer:
                env = self._buffer.popleft()
                if env.seq > self.last_seq:
                    self.last_seq = env.seq
                    return env
            if self._error is not None:
                raise self._error
            if self._left:
                raise StopAsyncIteration
            if self._stale and self._rt.connected:
                await self._rt._rejoin(self)
                continue
            self._wakeup = anyio.Event()
            await self._wakeup.wait()

    async def post(
        self,
        content: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        audience: list[str] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Envelope:
        """Post a message into the thread (same rules as ``POST /threads/{id}/messages``;
        ``causation_id``: the envelope it answers; ``audience``: ids of the participants who
        may see it, None = everyone; ``tool_calls``: workflow tool calls, ``[{"name", "args",
        "result"}]``); returns the committed envelope.

        Without ``idempotency_key`` a random one is used, so a post whose reply was lost with
        the connection is sent again after reconnecting without ever appending twice. Raises
        the :class:`ApiError` of a refusal, TimeoutError after the request timeout.
        """
        frame: dict[str, Any] = {
            "type": "post",
            "thread_id": self.thread_id,
            "content": content,
            "idempotency_key": idempotency_key or f"rt-{uuid.uuid4().hex}",
        }
        for name, value in (
            ("agent_id", agent_id),
            ("user_id", user_id),
            ("causation_id", causation_id),
            ("audience", audience),
            ("tool_calls", tool_calls),
        ):
            if value is not None:
                frame[name] = value
        reply = await self._rt._request(frame, expect="posted", retry=True)
        return Envelope.model_validate(reply["envelope"])

    async def ack(self, seq: int | None = None, *, cursor: str | None = None) -> int:
        """Move the durable cursor (``cursor``, default the join's) forward to ``seq``
        (default: the last seq yielded). Returns the acknowledged seq. ValueError without a
        cursor name."""
        name = cursor or self.cursor
        if name is None:
            raise ValueError("ack needs a cursor name: join with cursor=... or pass cursor=")
        target = self.last_seq if seq is None else seq
        frame = {"type": "ack", "thread_id": self.thread_id, "seq": target, "cursor": name}
        reply = await self._rt._request(frame, expect="acked", retry=True)
        acked = reply.get("seq")
        return acked if isinstance(acked, int) else target

    async def typing(self, *, agent_id: str | None = None, user_id: str | None = None) -> None:
        """Send an ephemeral typing indicator (dropped when not connected; no reply)."""
        frame: dict[str, Any] = {"type": "typing", "thread_id": self.thread_id}
        if agent_id is not None:
            frame["agent_id"] = agent_id
        if user_id is not None:
            frame["user_id"] = user_id
        await self._rt._send_nowait(frame)

    async def leave(self) -> None:
        """Stop following the thread; iteration ends after the envelopes already buffered."""
        if self._left:
            return
        self._left = True
        self._rt._rooms.pop(self.thread_id, None)
        with contextlib.suppress(TransportError, ConnectionClosed, ApiError, TimeoutError):
            await self._rt._request(
                {"type": "leave", "thread_id": self.thread_id}, expect="left", retry=False
            )
        self._close()

    def on(
        self,
        event: Literal["envelope", "typing"],
        callback: EnvelopeCallback | TypingCallback,
    ) -> None:
        """Push style: call ``callback`` (sync or async) for each envelope or typing event.

        An ``envelope`` callback consumes the room (do not also iterate it) from a task owned
        by the realtime context; an exception it raises ends the context. ValueError for a
        second envelope callback or an unknown event.
        """
        if event == "typing":
            self._typing.append(callback)  # type: ignore[arg-type]
        elif event == "envelope":
            if self._has_pump:
                raise ValueError("this room already has an envelope callback")
            self._has_pump = True
            self._rt._start_pump(self, callback)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown event {event!r}: use 'envelope' or 'typing'")


class Watch:
    """Every envelope of every thread the credential may read, pushed by the server (the
    ``watch`` frame, docs/protocol.md): made by :meth:`Realtime.watch`.

    Each thread resumes after the durable ``cursor`` (threads the credential is given access
    to later included, from their start); :meth:`receive` returns what arrived (in seq order
    per thread; after a reconnect the server resends from the cursor, so a consumer
    de-duplicates by seq), :meth:`ack` moves the cursor in many threads at once. Envelopes
    hidden from the credential by their audience are not sent at all.
    """

    def __init__(self, rt: Realtime, cursor: str) -> None:
        self._rt = rt
        self.cursor = cursor
        self._items: list[Envelope] = []
        self._arrived = anyio.Event()
        self._error: BaseException | None = None

    def _feed(self, env: Envelope) -> None:
        self._items.append(env)
        self._arrived.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._arrived.set()

    async def receive(self) -> list[Envelope]:
        """The envelopes received since the last call (at least one; waits). Raises the
        connection's end (``Unauthenticated`` once the credential was revoked,
        ``ConnectionClosed`` when the connection closed for good)."""
        while not self._items:
            if self._error is not None:
                raise self._error
            await self._arrived.wait()
            self._arrived = anyio.Event()
        out, self._items = self._items, []
        return out

    async def ack(self, positions: Mapping[str, int]) -> None:
        """Move the cursor of each thread to its seq (never backwards), in one ``acks`` frame
        and one transaction on the server. NotFound or InvalidRequest (nothing written) as
        the server answers; TimeoutError after ``request_timeout``."""
        await self._rt._request(
            {"type": "acks", "positions": dict(positions)}, expect="acked", retry=True
        )


class Realtime:
    """A realtime connection to ``/api/v1/ws`` (use as ``async with``).

    ``base_url`` and ``token`` as for the REST client (``Authorization: Bearer`` on the
    upgrade). ``heartbeat_timeout``: seconds without any frame from the server after which the
    connection counts as dead and is replaced (default: 3 x the server's heartbeat + 1);
    ``reconnect``: reconnect and re-join after a drop (else rooms end with
    :class:`ConnectionClosed`); ``max_backoff``: cap of the exponential reconnect delay
    (seconds); ``open_timeout``: seconds for the upgrade plus the ``welcome``;
    ``request_timeout``: seconds a join/post/ack/leave waits for its reply, across reconnects.

    Entering raises :class:`Unauthenticated` for a refused credential and
    :class:`TransportError` when the server cannot be reached. After entering, ``principal``
    and ``heartbeat`` describe the session; ``reconnects`` counts reconnections and
    ``last_disconnect`` keeps the server's last ``disconnect`` frame.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        heartbeat_timeout: float | None = None,
        reconnect: bool = True,
        max_backoff: float = 10.0,
        open_timeout: float = 10.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.url = ws_url(base_url)
        self._token = token
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.principal: Principal | None = None
        self.heartbeat: float | None = None
        self.reconnects = 0
        self.last_disconnect: dict[str, Any] | None = None
        self._rooms: dict[str, Room] = {}
        self._watch: Watch | None = None
        self._conn: _Conn | None = None
        self._changed = anyio.Event()  # set (and replaced) whenever _conn or _closed changes
        self._closed = False
        self._close_error: BaseException | None = None
        self._refs = itertools.count(1)
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        conn = await self._connect()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._shutdown)  # runs after the task group ended
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._install(conn)
            self._tg.start_soon(self._run, conn, name="agent-network realtime connection")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None and self._tg is not None
        self._closed = True
        self._tg.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        try:
            await stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return  # only the body's own exception: let it propagate unwrapped
            raise

    async def _shutdown(self) -> None:
        """Runs after the task group ended: close the socket, end every room and request."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.drop()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await conn.ws.close()
        for room in list(self._rooms.values()):
            room._close()
        self._rooms.clear()
        if self._watch is not None:
            self._watch._fail(ConnectionClosed("the realtime connection is closed"))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _connect(self) -> _Conn:
        """Open one connection and read its ``welcome``. Raises Unauthenticated, ApiError
        (an ``error`` frame or an HTTP refusal of the upgrade), TransportError, RealtimeError
        (the first frame is not a welcome)."""
        try:
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                open_timeout=self.open_timeout,
                ping_interval=None,  # the protocol's own heartbeat frames are used
                max_size=2**24,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            try:
                body: Any = json.loads(exc.response.body or b"null")
            except ValueError:
                body = None
            raise error_from_body(status, body, fallback=f"upgrade refused: HTTP {status}") from exc
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise TransportError(f"cannot open {self.url}: {exc!r}") from exc
        welcomed = False
        try:
            with anyio.fail_after(self.open_timeout):
                raw = await ws.recv()
            frame = json.loads(raw)
            if not isinstance(frame, dict) or frame.get("type") != "welcome":
                if isinstance(frame, dict) and frame.get("type") == "error":
                    raise _frame_error(frame)
                raise RealtimeError(f"expected a welcome frame, got {str(raw)[:200]!r}")
            welcomed = True
        except WsConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                raise Unauthenticated(0, "unauthenticated", "credential refused") from exc
            raise TransportError(f"closed before the welcome: {exc}") from exc
        except TimeoutError as exc:
            raise TransportError(f"no welcome within {self.open_timeout} s") from exc
        except ValueError as exc:
            raise RealtimeError("the first frame is not JSON") from exc
        finally:
            if not welcomed:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await ws.close()
        self.principal = Principal.model_validate(frame.get("principal") or {"kind": "unknown"})
        heartbeat = frame.get("heartbeat")
        self.heartbeat = float(heartbeat) if isinstance(heartbeat, int | float) else 30.0
        return _Conn(ws, self.heartbeat)

    def _install(self, conn: _Conn) -> None:
        self._conn = conn
        self._notify()

    async def _run(self, conn: _Conn) -> None:
        """Own the connection: read it; when it drops, reconnect with backoff and re-join."""
        while True:
            try:
                await self._read(conn)
            finally:
                conn.drop()
                if self._conn is conn:
                    self._conn = None
                    self._notify()
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.ws.close()
            if self._closed:
                return  # the context is exiting
            if not self.reconnect:
                self._end(ConnectionClosed("the realtime connection closed (reconnect=False)"))
                return
            try:
                conn = await self._reconnect()
            except ApiError as exc:  # refused credential: reconnecting cannot help
                self._end(exc)
                return
            # join every room again before anyone else may send on the new connection
            for room in list(self._rooms.values()):
                await self._send_or_drop(conn, self._join_request(conn, room))
            if self._watch is not None:  # (its reply is not awaited; an error is logged)
                await self._send_or_drop(conn, {"type": "watch", "cursor": self._watch.cursor})
            self._install(conn)

    def _end(self, error: BaseException) -> None:
        self._closed = True
        self._close_error = error
        for room in list(self._rooms.values()):
            room._fail(error)
        if self._watch is not None:
            self._watch._fail(error)
        self._notify()

    async def _reconnect(self) -> _Conn:
        attempt = 0
        while True:
            delay = 0.0 if attempt == 0 else min(self.max_backoff, 0.1 * 2 ** (attempt - 1))
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                conn = await self._connect()
            except (Unauthenticated, PermissionDenied):
                raise  # a refused credential: trying again cannot help
            except (*RECOVERABLE, RealtimeError, ApiError) as exc:
                log.info("realtime reconnect attempt %d failed: %r", attempt + 1, exc)
                attempt += 1
                continue
            self.reconnects += 1
            return conn

    async def _read(self, conn: _Conn) -> None:
        timeout = self.heartbeat_timeout or 3 * conn.heartbeat + 1
        while True:
            with anyio.move_on_after(timeout) as scope:
                try:
                    raw = await conn.ws.recv()
                except WsConnectionClosed as exc:
                    log.info("realtime connection closed: %s", exc)
                    return
            if scope.cancelled_caught:
                log.warning("no frame from the server for %.1f s; reconnecting", timeout)
                return
            try:
                frame = json.loads(raw)
            except ValueError:
                log.warning("ignoring a frame that is not JSON: %.200r", raw)
                continue
            if isinstance(frame, dict):
                try:
                    await self._dispatch(conn, frame)
                except (ValidationError, KeyError, TypeError, ValueError) as exc:
                    log.warning("ignoring a malformed %r frame: %r", frame.get("type"), exc)

    async def _dispatch(self, conn: _Conn, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        if kind == "envelope":
            room = self._rooms.get(str(frame.get("thread_id")))
            if frame.get("watch") is True:
                if self._watch is not None:
                    self._watch._feed(Envelope.model_validate(frame["envelope"]))
            elif room is not None:
                body = frame["envelope"]
                stub = isinstance(body, dict) and body.get("stub") is True
                room._feed(
                    EnvelopeStub.model_validate(body) if stub else Envelope.model_validate(body)
                )
        elif kind == "ping":
            with contextlib.suppress(WsConnectionClosed):
                await conn.ws.send(json.dumps({"type": "pong"}))
        elif isinstance(ref, str) and ref in conn.pending:
            waiter = conn.pending.pop(ref)
            if kind == "error":
                waiter.fail(_frame_error(frame))
            else:
                waiter.resolve(frame)
        elif kind == "typing":
            room = self._rooms.get(str(frame.get("thread_id")))
            if room is not None:
                room._on_typing(Typing.model_validate(frame))
        elif kind == "disconnect":
            self.last_disconnect = frame
            log.info("server disconnects: %s", frame.get("reason"))
        elif kind == "error":
            error = _frame_error(frame)
            room = self._rooms.get(str(frame.get("thread_id")))
            if ref is None and room is not None:  # the server stopped the thread (access lost)
                self._rooms.pop(room.thread_id, None)
                room._fail(error)
            else:  # e.g. the late answer to a request that timed out
                log.warning("realtime error frame: %s", error)
        # pong and unknown frame types are ignored (forward compatibility)

    # -- requests -----------------------------------------------------------------------------

    async def _connected(self, dead: _Conn | None = None) -> _Conn:
        while True:
            if self._closed:
                raise ConnectionClosed("the realtime connection is closed") from self._close_error
            conn = self._conn
            if conn is not None and conn.alive and conn is not dead:
                return conn
            await self._changed.wait()

    async def _request(self, frame: dict[str, Any], *, expect: str, retry: bool) -> dict[str, Any]:
        """Send ``frame`` with a fresh ``ref`` and return the reply of type ``expect``.

        With ``retry`` a request whose connection dropped before the reply is sent again on
        the next connection (only for idempotent frames). Raises the ApiError of an ``error``
        reply, TimeoutError after ``request_timeout``, TransportError (connection lost, no
        retry), ConnectionClosed once the context is closed.
        """
        dead: _Conn | None = None
        with anyio.fail_after(self.request_timeout):
            while True:
                conn = await self._connected(dead)
                ref = str(next(self._refs))
                waiter = _Waiter()
                conn.pending[ref] = waiter
                try:
                    await conn.ws.send(json.dumps({**frame, "ref": ref}))
                except WsConnectionClosed:
                    self._mark_dead(conn)
                    waiter.lose()
                await waiter.done.wait()
                conn.pending.pop(ref, None)
                if waiter.error is not None:
                    raise waiter.error
                if waiter.reply is not None:
                    if waiter.reply.get("type") != expect:
                        raise RealtimeError(
                            f"expected {expect!r} for {frame['type']!r}, got {waiter.reply!r}"
                        )
                    return waiter.reply
                if not retry:
                    raise TransportError(f"connection lost before the reply to {frame['type']}")
                dead = conn

    async def _send_nowait(self, frame: dict[str, Any]) -> None:
        conn = self._conn
        if conn is None or not conn.alive:
            return
        await self._send_or_drop(conn, frame)

    def _mark_dead(self, conn: _Conn) -> None:
        """A send failed: the reader will notice the close and reconnect."""
        conn.alive = False
        self._notify()

    def _join_request(self, conn: _Conn, room: Room) -> dict[str, Any]:
        """Register a ``join`` for ``room`` on ``conn`` and return the frame to send; the reader
        applies the reply (``joined`` opens the room's intake, an error fails the room). Wakes
        whoever waits for the previous join so that they wait for this one."""
        room._accepting = False
        previous, room._joined = room._joined, anyio.Event()
        previous.set()
        ref = str(next(self._refs))
        conn.pending[ref] = _Waiter(on_reply=room._on_joined, on_error=room._on_join_error)
        return {**room._join_frame(), "ref": ref}

    async def _send_or_drop(self, conn: _Conn, frame: dict[str, Any]) -> None:
        """Send ``frame`` on ``conn``; a closed socket only marks it dead (no error)."""
        try:
            await conn.ws.send(json.dumps(frame))
        except WsConnectionClosed:
            self._mark_dead(conn)

    async def join(
        self,
        thread_id: str,
        *,
        after: int | None = None,
        cursor: str | None = None,
        buffer: int = DEFAULT_BUFFER,
    ) -> Room:
        """Follow ``thread_id``: envelopes with ``seq > after`` (replayed, then live).

        ``after`` None with a ``cursor`` name resumes from that durable cursor (0 if new);
        neither means ``after=0``. ``buffer``: envelopes held for a slow consumer before the
        room stops taking more and joins again once drained. Raises the ApiError of a
        refusal (NotFound for a thread outside the caller's scope), ValueError when the thread
        is already joined on this connection, TimeoutError after ``request_timeout``.
        """
        if thread_id in self._rooms:
            raise ValueError(f"thread {thread_id!r} is already joined on this connection")
        if after is None and cursor is None:
            after = 0
        room = Room(self, thread_id, after=after, cursor=cursor, buffer=max(1, buffer))
        self._rooms[thread_id] = room
        try:
            with anyio.fail_after(self.request_timeout):
                conn = await self._connected()
                await self._send_or_drop(conn, self._join_request(conn, room))
                while True:
                    joined = room._joined
                    await joined.wait()
                    if room._error is not None:
                        raise room._error
                    if room._accepting or room._left:
                        break
        except BaseException:
            if self._rooms.get(thread_id) is room:
                del self._rooms[thread_id]
            raise
        if room._left:
            raise ConnectionClosed("the realtime connection closed during join")
        return room

    async def _rejoin(self, room: Room) -> None:
        """Leave and join ``room`` again from the last seq it received (after an overflow
        of its buffer or a gap)."""
        room.rejoins += 1
        room._accepting = False
        try:
            await self._request(
                {"type": "leave", "thread_id": room.thread_id}, expect="left", retry=False
            )
        except TransportError:
            return  # the reconnect joins every room again anyway
        except ApiError as exc:
            room._fail(exc)
            return
        if room._left or room._accepting:
            return  # left meanwhile, or a reconnect joined it again already
        conn = await self._connected()
        await self._send_or_drop(conn, self._join_request(conn, room))
        with anyio.fail_after(self.request_timeout):
            while not (room._accepting or room._left or room._error is not None):
                await room._joined.wait()

    # -- callbacks ----------------------------------------------------------------------------

    def _call_soon(self, callback: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
        result = callback(arg)
        if inspect.isawaitable(result):
            assert self._tg is not None

            async def finish(awaitable: Awaitable[None] = result) -> None:
                await awaitable

            self._tg.start_soon(finish)

    def _start_pump(self, room: Room, callback: EnvelopeCallback) -> None:
        async def pump() -> None:
            async for env in room:
                result = callback(env)
                if inspect.isawaitable(result):
                    await result

        assert self._tg is not None
        self._tg.start_soon(pump, name=f"room {room.thread_id} callback")

    async def watch(self, cursor: str) -> Watch:
        """Receive every thread this credential may read, resuming each after the durable
        ``cursor`` (see :class:`Watch`); one watch per connection (the same one is returned
        for the same ``cursor``; ValueError for another). Sent again after a reconnect.
        Raises the ApiError of a refusal, TimeoutError after ``request_timeout``."""
        if self._watch is not None:
            if self._watch.cursor != cursor:
                raise ValueError("this connection already watches with another cursor")
            return self._watch
        watch = self._watch = Watch(self, cursor)
        try:
            await self._request({"type": "watch", "cursor": cursor}, expect="watching", retry=True)
        except BaseException:
            self._watch = None
            raise
        return watch

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms currently joined, by thread id (a copy)."""
        return dict(self._rooms)

    @property
    def connected(self) -> bool:
        """True while a connection is open (False while reconnecting)."""
        return self._conn is not None and self._conn.alive

    async def wait_connected(self) -> None:
        """Wait until a connection is open (ConnectionClosed when the context closed for
        good); bound it with ``anyio.fail_after``."""
        await self._connected()


__all__ = ["PROTOCOL_VERSION", "Realtime", "Room", "Watch", "ws_url"]
