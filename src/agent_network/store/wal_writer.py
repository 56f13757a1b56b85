"""The WAL writer: runs one batch transaction of the hub's committer with as few hops as possible.

The hub hands :meth:`WalWriter.transaction` a *synchronous* function; it runs inside one
transaction with a :class:`WalSession` (idempotency lookups, log reads, inserts) and commits
durably before returning. Two implementations:

- :class:`SqliteWalWriter` (the embedded default): a stdlib ``sqlite3`` connection in a
  dedicated thread, the whole batch (``BEGIN IMMEDIATE`` … ``COMMIT``) in one hand-over to that
  thread. This is what lets a single poster get close to raw SQLite speed.
- :class:`SqlAlchemyWalWriter` (any other database): the same function through
  ``AsyncConnection.run_sync`` on SQLAlchemy Core.

Both store the same rows (JSON columns as ``json.dumps`` text, as SQLAlchemy's JSON type does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import anyio
from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agent_network.model.envelope import Envelope
from agent_network.store.tables import audit_log, envelopes

T = TypeVar("T")

ENVELOPE_COLUMNS = (
    "thread_id",
    "seq",
    "id",
    "type",
    "data",
    "sender_kind",
    "sender_id",
    "sender_org_id",
    "audience",
    "causation_id",
    "idempotency_key",
    "created_at",
    "prev_hash",
    "hash",
)
AUDIT_COLUMNS = (
    "org_id",
    "principal_kind",
    "principal_id",
    "action",
    "resource_kind",
    "resource_id",
    "outcome",
    "reason",
    "data",
    "created_at",
)


class WalSession(Protocol):
    """Synchronous access to the store inside one writer transaction."""

    def find_by_idempotency(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Envelope]: ...

    def read_envelopes(self, thread_id: str) -> list[Envelope]: ...

    def find_envelope(self, thread_id: str, envelope_id: str) -> Envelope | None:
        """The envelope ``envelope_id`` of ``thread_id``, or None."""
        ...

    def insert_envelopes(self, batch: Sequence[Envelope]) -> None: ...

    def insert_audit(self, rows: Sequence[dict[str, Any]]) -> None: ...


class WalWriter(Protocol):
    """Runs ``fn(session)`` in one durable transaction; rolls back if ``fn`` raises.

    ``then`` (optional) is called on the event loop with ``fn``'s result right after the commit,
    before the awaiting coroutine resumes (one loop iteration sooner than code after the await).
    """

    async def transaction(
        self, fn: Callable[[WalSession], T], then: Callable[[T], None] | None = None
    ) -> T: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------- SQLite


def _envelope_from_tuple(r: Sequence[Any]) -> Envelope:
    return Envelope(
        thread_id=r[0],
        seq=r[1],
        id=r[2],
        type=r[3],
        data=json.loads(r[4]),
        sender_kind=r[5],
        sender_id=r[6],
        sender_org_id=r[7],
        audience=json.loads(r[8]) if r[8] else None,
        causation_id=r[9],
        idempotency_key=r[10],
        created_at=r[11],
        prev_hash=r[12],
        hash=r[13],
    )


_SELECT = f"SELECT {', '.join(ENVELOPE_COLUMNS)} FROM envelopes"
_INSERT = (
    f"INSERT INTO envelopes ({', '.join(ENVELOPE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(ENVELOPE_COLUMNS))})"
)
_INSERT_AUDIT = (
    f"INSERT INTO audit_log ({', '.join(AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})"
)


class _SqliteSession:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def find_by_idempotency(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Envelope]:
        out: dict[tuple[str, str], Envelope] = {}
        for thread_id, key in keys:
            row = self.conn.execute(
                f"{_SELECT} WHERE thread_id = ? AND idempotency_key = ?", (thread_id, key)
            ).fetchone()
            if row is not None:
                out[(thread_id, key)] = _envelope_from_tuple(row)
        return out

    def read_envelopes(self, thread_id: str) -> list[Envelope]:
        rows = self.conn.execute(f"{_SELECT} WHERE thread_id = ? ORDER BY seq", (thread_id,))
        return [_envelope_from_tuple(r) for r in rows]

    def find_envelope(self, thread_id: str, envelope_id: str) -> Envelope | None:
        row = self.conn.execute(
            f"{_SELECT} WHERE id = ? AND thread_id = ?", (envelope_id, thread_id)
        ).fetchone()
        return None if row is None else _envelope_from_tuple(row)

    def insert_envelopes(self, batch: Sequence[Envelope]) -> None:
        self.conn.executemany(
            _INSERT,
            [
                (
                    e.thread_id,
                    e.seq,
                    e.id,
                    e.type,
                    json.dumps(e.data),
                    e.sender_kind,
                    e.sender_id,
                    e.sender_org_id,
                    None if e.audience is None else json.dumps(e.audience),
                    e.causation_id,
                    e.idempotency_key,
                    e.created_at,
                    e.prev_hash,
                    e.hash,
                )
                for e in batch
            ],
        )

    def insert_audit(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        self.conn.executemany(
            _INSERT_AUDIT,
            [
                tuple(
                    json.dumps(r[c]) if c == "data" and r[c] is not None else r[c]
                    for c in AUDIT_COLUMNS
                )
                for r in rows
            ],
        )


CHECKPOINT_EVERY = 200
"""Commits between two WAL checkpoints of :class:`SqliteWalWriter` (a hub commit writes about
five pages, so ~1,000 pages: SQLite's own ``wal_autocheckpoint`` default)."""
_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000")


class SqliteWalWriter:
    """One stdlib ``sqlite3`` connection (WAL mode, ``synchronous=FULL``) owned by one dedicated
    thread; each transaction costs one hand-over to that thread and one wake-up of the event loop.

    Checkpoints (copying the WAL back into the database file) stay off the commit path: the
    writer's connection has ``wal_autocheckpoint=0``, and every :data:`CHECKPOINT_EVERY`
    commits a second thread with its own connection runs ``PRAGMA wal_checkpoint(PASSIVE)``,
    which copies the bulk concurrently with the writer
    (https://www.sqlite.org/wal.html#checkpointing). The frames committed during that pass are
    then copied by the writer itself, right after its next commit has been acknowledged: with
    no concurrent writer that small pass completes, so the next commit restarts the WAL from
    its beginning and the file stops growing (a restart needs every frame copied when a write
    transaction starts). SQLite's automatic checkpoint would instead run
    inside the ``COMMIT`` of every ~200th transaction, copying ~4 MiB and fsyncing the database
    file while every append queued behind it waits. ``checkpoints`` counts the passes of the
    checkpointer thread, ``wal_frames`` is the WAL size (frames) seen by the last one.

    Both threads are started by :meth:`start` and stopped by :meth:`aclose`, which joins them.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[WalSession], Any], Callable[[Any], None] | None, asyncio.Future[Any]]
            | None
        ]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="wal-writer", daemon=True)
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="wal-checkpointer", daemon=True
        )
        self._due = threading.Event()  # set by the writer: a checkpoint is due
        self._stopping = False
        self._finish = False  # set by the checkpointer: the writer copies the last frames
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.checkpoints = 0
        self.wal_frames = 0

    async def start(self) -> None:
        """Open the connection in the writer thread; raises what opening raised."""
        self._thread.start()
        await anyio.to_thread.run_sync(self._ready.wait)
        if self._error is not None:
            raise self._error
        self._checkpointer.start()

    def _serve(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            for pragma in (*_PRAGMAS, "wal_autocheckpoint=0"):
                conn.execute(f"PRAGMA {pragma}")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        session = _SqliteSession(conn)
        commits = 0
        try:
            while (job := self._jobs.get()) is not None:
                fn, then, fut = job
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(session)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                except BaseException as exc:  # handed to the awaiting coroutine
                    fut.get_loop().call_soon_threadsafe(_settle, fut, None, exc, None)
                else:
                    fut.get_loop().call_soon_threadsafe(_settle, fut, result, None, then)
                    commits += 1
                    if commits >= CHECKPOINT_EVERY:
                        commits = 0
                        self._due.set()
                    if self._finish:
                        # the checkpointer copied the bulk; copy the rest (the frames committed
                        # during its pass) here, between two transactions: with no concurrent
                        # writer this pass completes, and the next commit restarts the WAL from
                        # its beginning instead of growing the file
                        self._finish = False
                        with contextlib.suppress(sqlite3.Error):  # a later one catches up
                            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()

    def _checkpoint_loop(self) -> None:
        """The checkpointer thread: a passive checkpoint each time one is due, until stopped."""
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the writer still works; SQLite checkpoints when the last connection closes
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            while not self._stopping:
                self._due.wait()
                self._due.clear()
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    continue  # busy or I/O trouble: try again at the next due checkpoint
                self.checkpoints += 1
                self.wal_frames = frames
                # commits made during this pass are not copied yet: the writer copies them
                # after its next commit, when nothing else writes, so the WAL restarts
                self._finish = True
        finally:
            conn.close()

    async def transaction(
        self, fn: Callable[[WalSession], T], then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` and commit in the writer thread; returns ``fn``'s result (``then``: see
        :class:`WalWriter`).

        Cancelling the caller does not stop a transaction already handed over; callers that must
        know its outcome shield the await (the hub does).
        """
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, then, fut))
        return await fut

    async def aclose(self) -> None:
        """Stop the writer after the transaction in progress, run a last checkpoint, close both
        connections and join both threads."""
        self._jobs.put(None)
        if self._thread.is_alive():
            await anyio.to_thread.run_sync(self._thread.join)
        self._stopping = True
        self._due.set()
        if self._checkpointer.is_alive():
            await anyio.to_thread.run_sync(self._checkpointer.join)


def _settle(
    fut: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
    then: Callable[[Any], None] | None,
) -> None:
    if exc is None and then is not None:
        try:
            then(result)
        except BaseException as err:  # reported to the awaiting coroutine
            exc = err
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


# --------------------------------------------------------------------------- generic


class _SqlAlchemySession:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def find_by_idempotency(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Envelope]:
        if not keys:
            return {}
        cond = or_(
            *(and_(envelopes.c.thread_id == t, envelopes.c.idempotency_key == k) for t, k in keys)
        )
        rows = self.conn.execute(select(envelopes).where(cond)).all()
        found = [Envelope(**dict(r._mapping)) for r in rows]
        return {(e.thread_id, e.idempotency_key or ""): e for e in found}

    def read_envelopes(self, thread_id: str) -> list[Envelope]:
        q = select(envelopes).where(envelopes.c.thread_id == thread_id).order_by(envelopes.c.seq)
        return [Envelope(**dict(r._mapping)) for r in self.conn.execute(q).all()]

    def find_envelope(self, thread_id: str, envelope_id: str) -> Envelope | None:
        q = select(envelopes).where(
            envelopes.c.id == envelope_id, envelopes.c.thread_id == thread_id
        )
        row = self.conn.execute(q).first()
        return None if row is None else Envelope(**dict(row._mapping))

    def insert_envelopes(self, batch: Sequence[Envelope]) -> None:
        if batch:
            self.conn.execute(envelopes.insert(), [e.as_dict() for e in batch])

    def insert_audit(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.conn.execute(audit_log.insert(), list(rows))


class SqlAlchemyWalWriter:
    """The writer for any database SQLAlchemy drives (one dedicated connection)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, engine: AsyncEngine) -> SqlAlchemyWalWriter:
        """Open the writer's dedicated connection."""
        return cls(await engine.connect())

    async def transaction(
        self, fn: Callable[[WalSession], T], then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` on the sync facade of the connection inside one transaction, then ``then``."""
        async with self._conn.begin():
            result = await self._conn.run_sync(lambda c: fn(_SqlAlchemySession(c)))
        if then is not None:
            then(result)
        return result

    async def aclose(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_wal_writer(engine: AsyncEngine) -> WalWriter:
    """The fastest writer for ``engine``'s database."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        writer = SqliteWalWriter(url.database)
        await writer.start()
        return writer
    return await SqlAlchemyWalWriter.connect(engine)
