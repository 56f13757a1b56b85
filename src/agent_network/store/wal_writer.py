"""The WAL writer: runs one batch transaction of the hub's committer with as few hops as possible.

The hub hands :meth:`WalWriter.transaction` a *synchronous* function; it runs inside one
transaction with a :class:`WalSession` (idempotency lookups, log reads, inserts) and commits
durably before returning. Two implementations:

- :class:`SqliteWalWriter` (the embedded default): a stdlib ``sqlite3`` connection in a
  dedicated thread, the whole batch (``BEGIN IMMEDIATE`` … ``COMMIT``) in one hand-over to that
  thread. This is what lets a single poster get close to raw SQLite speed.
- :class:`AsyncpgWalWriter` (PostgreSQL through asyncpg): a dedicated asyncpg connection, no
  SQLAlchemy on the commit path; the synchronous function's queries are awaited through
  greenlets (``greenlet_spawn``/``await_only``, as SQLAlchemy's asyncio layer does). Its session
  is *shared* (several server processes append to one database): a transaction-scoped advisory
  lock per thread (:meth:`WalSession.lock_threads`), the threads' heads, then one statement
  writing the envelopes, their audit rows (``org_seq`` numbered per batch: one lock and one MAX
  per org instead of the ``audit_log`` trigger's per row) and a ``NOTIFY`` on
  :data:`WAL_CHANNEL` (delivered at commit) per thread.
- :class:`SqlAlchemyWalWriter` (any other database): the same function through
  ``AsyncConnection.run_sync`` on SQLAlchemy Core (shared, with the same locks and
  notifications, on PostgreSQL through another driver).

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
from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_only, greenlet_spawn

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


WAL_CHANNEL = "an_wal"
"""The PostgreSQL ``NOTIFY`` channel of committed appends; payload ``thread_id:first_seq:last_seq``
(:func:`notify_payload`)."""


def notify_payload(thread_id: str, first: int, last: int) -> str:
    """The ``NOTIFY`` payload saying ``thread_id`` got seqs ``first``..``last`` (inclusive)."""
    return f"{thread_id}:{first}:{last}"


def parse_notify_payload(payload: str) -> tuple[str, int, int] | None:
    """``(thread_id, first, last)`` from a :func:`notify_payload` string; None if malformed."""
    parts = payload.rsplit(":", 2)
    if len(parts) != 3:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


class WalSession(Protocol):
    """Synchronous access to the store inside one writer transaction.

    ``shared`` is True when other processes may append to the same database (PostgreSQL): the
    caller then locks the batch's threads, catches its cached states up from the heads and
    notifies what it appended. On an unshared store (SQLite: one process) those calls are no-ops.
    """

    shared: bool

    def lock_threads(self, thread_ids: Sequence[str], org_ids: Sequence[str] = ()) -> None:
        """Hold a lock on each thread of ``thread_ids`` until the transaction ends (taken in one
        fixed order, so two batches never deadlock); ``org_ids``: the orgs the batch audits
        into, whose audit numbering lock a writer may take in the same go."""
        ...

    def heads(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """The last stored seq of each thread of ``thread_ids`` that has envelopes."""
        ...

    def read_after(self, thread_id: str, after: int) -> list[Envelope]:
        """Envelopes of ``thread_id`` with ``seq > after``, in order."""
        ...

    def notify(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        """Tell other processes, at commit, that each ``(thread_id, first, last)`` was appended."""
        ...

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
    shared = False  # one process owns the file (BEGIN IMMEDIATE serialises its writers)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def lock_threads(self, thread_ids: Sequence[str], org_ids: Sequence[str] = ()) -> None:
        pass

    def heads(self, thread_ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for tid in thread_ids:
            row = self.conn.execute(
                "SELECT max(seq) FROM envelopes WHERE thread_id = ?", (tid,)
            ).fetchone()
            if row is not None and row[0] is not None:
                out[tid] = int(row[0])
        return out

    def read_after(self, thread_id: str, after: int) -> list[Envelope]:
        rows = self.conn.execute(
            f"{_SELECT} WHERE thread_id = ? AND seq > ? ORDER BY seq", (thread_id, after)
        )
        return [_envelope_from_tuple(r) for r in rows]

    def notify(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        pass

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


_LOCK_SQL = text(
    # sorted by lock key in a subquery that is not flattened (OFFSET 0): every batch takes its
    # locks in the same order, so two processes never wait on each other in a cycle
    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT hashtextextended('an_thread:' || t, 0)"
    " AS k FROM unnest(CAST(:ids AS text[])) AS t ORDER BY 1 OFFSET 0) AS s"
)
_NOTIFY_SQL = text("SELECT count(pg_notify(:channel, p)) FROM unnest(CAST(:ps AS text[])) AS p")


class _SqlAlchemySession:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.shared = conn.dialect.name == "postgresql"

    def lock_threads(self, thread_ids: Sequence[str], org_ids: Sequence[str] = ()) -> None:
        # (org_ids: the audit_log trigger numbers and locks per row on this path)
        if self.shared and thread_ids:
            self.conn.execute(_LOCK_SQL, {"ids": list(thread_ids)})

    def heads(self, thread_ids: Sequence[str]) -> dict[str, int]:
        if not thread_ids:
            return {}
        q = (
            select(envelopes.c.thread_id, func.max(envelopes.c.seq))
            .where(envelopes.c.thread_id.in_(list(thread_ids)))
            .group_by(envelopes.c.thread_id)
        )
        return {str(t): int(m) for t, m in self.conn.execute(q).all()}

    def read_after(self, thread_id: str, after: int) -> list[Envelope]:
        q = (
            select(envelopes)
            .where(envelopes.c.thread_id == thread_id, envelopes.c.seq > after)
            .order_by(envelopes.c.seq)
        )
        return [Envelope(**dict(r._mapping)) for r in self.conn.execute(q).all()]

    def notify(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        if self.shared and ranges:
            payloads = [notify_payload(*r) for r in ranges]
            self.conn.execute(_NOTIFY_SQL, {"channel": WAL_CHANNEL, "ps": payloads})

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
            # the fields as they are (no deep copy as dataclasses.asdict makes: the JSON columns
            # serialise them right here)
            rows = [{c: getattr(e, c) for c in ENVELOPE_COLUMNS} for e in batch]
            self.conn.execute(envelopes.insert(), rows)

    def insert_audit(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.conn.execute(audit_log.insert(), list(rows))


class SqlAlchemyWalWriter:
    """The writer for any database SQLAlchemy drives (one dedicated connection, opened again
    from ``engine`` after it broke, e.g. a database restart)."""

    def __init__(self, conn: AsyncConnection, engine: AsyncEngine | None = None) -> None:
        self._conn = conn
        self._engine = engine

    @classmethod
    async def connect(cls, engine: AsyncEngine) -> SqlAlchemyWalWriter:
        """Open the writer's dedicated connection."""
        return cls(await engine.connect(), engine)

    async def transaction(
        self, fn: Callable[[WalSession], T], then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` on the sync facade of the connection inside one transaction, then ``then``.

        Raises what ``fn`` or the database raised (the transaction is rolled back); a broken
        connection is replaced before the next transaction."""
        if self._engine is not None and (self._conn.closed or self._conn.invalidated):
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = await self._engine.connect()
        async with self._conn.begin():
            result = await self._conn.run_sync(lambda c: fn(_SqlAlchemySession(c)))
        if then is not None:
            then(result)
        return result

    async def aclose(self) -> None:
        """Close the connection."""
        await self._conn.close()


# --------------------------------------------------------------------------- PostgreSQL

_PG_COLUMNS = ", ".join(ENVELOPE_COLUMNS)
_PG_SELECT = f"SELECT {_PG_COLUMNS} FROM envelopes"
_PG_TYPES = (
    "text", "int", "text", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "text", "text",
)  # fmt: skip
_AUDIT_TYPES = ("text",) * len(AUDIT_COLUMNS)
_JSON_ENVELOPE = {"data", "audience"}
_PG_WRITE = (
    # one statement, one round trip: the envelopes, their audit rows and the notifications
    "WITH e AS (INSERT INTO envelopes ({ecols}) SELECT {esel} FROM unnest({eargs}) AS x({ecols})),"
    # audit rows numbered per org here (base + row number): the org_seq trigger (migration 0008)
    # would take a lock and a MAX per row; the org locks are held already (_PG_ORG_LOCK)
    " a AS (INSERT INTO audit_log ({acols}, org_seq) SELECT {asel},"
    " b.base + row_number() OVER (PARTITION BY y.org_id ORDER BY y.n)"
    " FROM unnest({aargs}) WITH ORDINALITY AS y({acols}, n) JOIN (SELECT o AS org_id,"
    " COALESCE((SELECT max(org_seq) FROM audit_log WHERE audit_log.org_id = o), 0) AS base"
    " FROM unnest(${orgs}::text[]) AS o) AS b ON b.org_id = y.org_id)"
    " SELECT count(pg_notify('{channel}', p)) FROM unnest(${n}::text[]) AS p"
).format(
    ecols=_PG_COLUMNS,
    esel=", ".join(f"{c}::json" if c in _JSON_ENVELOPE else c for c in ENVELOPE_COLUMNS),
    eargs=", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_PG_TYPES)),
    acols=", ".join(AUDIT_COLUMNS),
    asel=", ".join(f"y.{c}::json" if c == "data" else f"y.{c}" for c in AUDIT_COLUMNS),
    aargs=", ".join(f"${len(_PG_TYPES) + i + 1}::{t}[]" for i, t in enumerate(_AUDIT_TYPES)),
    channel=WAL_CHANNEL,
    n=len(_PG_TYPES) + len(_AUDIT_TYPES) + 1,
    orgs=len(_PG_TYPES) + len(_AUDIT_TYPES) + 2,
)
_PG_LOCK_ALL = (
    # the thread locks and the org_seq locks (as _PG_ORG_LOCK), sorted together by key
    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT k FROM ("
    "SELECT hashtextextended('an_thread:' || t, 0) AS k FROM unnest($1::text[]) AS t"
    " UNION ALL SELECT hashtext('audit_log_org_seq:' || o)::bigint FROM unnest($2::text[]) AS o"
    ") AS u ORDER BY 1 OFFSET 0) AS s"
)
_PG_HEADS = (
    # one backward index probe per thread (a GROUP BY over ANY(...) scanned far more)
    "SELECT t, (SELECT e.seq FROM envelopes AS e WHERE e.thread_id = t ORDER BY e.seq DESC"
    " LIMIT 1) FROM unnest($1::text[]) AS t"
)
_PG_ORG_LOCK = (
    # the lock the org_seq trigger takes (migration 0008) for each org, sorted by key
    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT hashtext('audit_log_org_seq:' || o)"
    "::bigint AS k FROM unnest($1::text[]) AS o ORDER BY 1 OFFSET 0) AS s"
)


def _pg_envelope(r: Any) -> Envelope:
    data = r["data"]
    audience = r["audience"]
    return Envelope(
        thread_id=r["thread_id"],
        seq=r["seq"],
        id=r["id"],
        type=r["type"],
        data=json.loads(data) if isinstance(data, str) else data,
        sender_kind=r["sender_kind"],
        sender_id=r["sender_id"],
        sender_org_id=r["sender_org_id"],
        audience=json.loads(audience) if isinstance(audience, str) else audience,
        causation_id=r["causation_id"],
        idempotency_key=r["idempotency_key"],
        created_at=r["created_at"],
        prev_hash=r["prev_hash"],
        hash=r["hash"],
    )


class _AsyncpgSession:
    """A :class:`WalSession` on an asyncpg connection, called synchronously from inside
    ``greenlet_spawn`` (each query awaits through ``await_only``, as SQLAlchemy's own asyncio
    layer does). Writes are gathered and sent by :meth:`flush` in one statement."""

    shared = True

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._orgs_locked: set[str] = set()
        self.envelopes: list[Envelope] = []
        self.audits: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await_only(self.conn.fetch(sql, *args)))

    def lock_threads(self, thread_ids: Sequence[str], org_ids: Sequence[str] = ()) -> None:
        # threads and orgs in one statement, all keys sorted together (one order for every
        # batch); flush() then has the org locks it needs
        if thread_ids or org_ids:
            self._fetch(_PG_LOCK_ALL, list(thread_ids), list(org_ids))
            self._orgs_locked.update(org_ids)

    def heads(self, thread_ids: Sequence[str]) -> dict[str, int]:
        # a statement of its own: its snapshot is taken after the locks are held
        rows = self._fetch(_PG_HEADS, list(thread_ids))
        return {str(r[0]): int(r[1]) for r in rows if r[1] is not None}

    def read_after(self, thread_id: str, after: int) -> list[Envelope]:
        rows = self._fetch(
            f"{_PG_SELECT} WHERE thread_id = $1 AND seq > $2 ORDER BY seq", thread_id, after
        )
        return [_pg_envelope(r) for r in rows]

    def read_envelopes(self, thread_id: str) -> list[Envelope]:
        return self.read_after(thread_id, 0)

    def find_by_idempotency(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Envelope]:
        if not keys:
            return {}
        rows = self._fetch(
            f"{_PG_SELECT} WHERE (thread_id, idempotency_key) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [t for t, _ in keys],
            [k for _, k in keys],
        )
        found = [_pg_envelope(r) for r in rows]
        return {(e.thread_id, e.idempotency_key or ""): e for e in found}

    def find_envelope(self, thread_id: str, envelope_id: str) -> Envelope | None:
        rows = self._fetch(f"{_PG_SELECT} WHERE id = $1 AND thread_id = $2", envelope_id, thread_id)
        return _pg_envelope(rows[0]) if rows else None

    def insert_envelopes(self, batch: Sequence[Envelope]) -> None:
        self.envelopes.extend(batch)

    def insert_audit(self, rows: Sequence[dict[str, Any]]) -> None:
        self.audits.extend(rows)

    def notify(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        self.notes.extend(notify_payload(*r) for r in ranges)

    async def flush(self) -> None:
        """Send the gathered envelopes, audit rows and notifications (one statement)."""
        if not (self.envelopes or self.audits or self.notes):
            return
        columns: list[list[Any]] = []
        for c in ENVELOPE_COLUMNS:
            values = [getattr(e, c) for e in self.envelopes]
            if c in _JSON_ENVELOPE:
                values = [None if v is None else json.dumps(v) for v in values]
            columns.append(values)
        for c in AUDIT_COLUMNS:
            values = [r[c] for r in self.audits]
            if c == "data":
                values = [None if v is None else json.dumps(v) for v in values]
            columns.append(values)
        orgs = sorted({r["org_id"] for r in self.audits})
        if not self._orgs_locked.issuperset(orgs):
            # a statement of its own: the write's snapshot is taken once they are held
            await self.conn.fetchval(_PG_ORG_LOCK, orgs)
        await self.conn.fetchval(_PG_WRITE, *columns, self.notes, orgs)


class WalConflictError(Exception):
    """A batch hit a unique constraint (``(thread_id, seq)`` or an idempotency key) another
    writer took first; nothing of it was written."""


class AsyncpgWalWriter:
    """The writer for PostgreSQL: one dedicated asyncpg connection, no SQLAlchemy on the commit
    path; each batch is BEGIN, the locks, the heads, one write statement (envelopes, audit rows,
    ``NOTIFY``) and COMMIT. A broken connection is replaced before the next transaction."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Any = None

    async def start(self) -> None:
        """Open the connection (raises what connecting raised)."""
        import asyncpg  # type: ignore[import-untyped]

        self._conn = await asyncpg.connect(self._dsn)

    async def transaction(
        self, fn: Callable[[WalSession], T], then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` (synchronously, its queries awaited through greenlets) in one transaction,
        send its writes, commit, then ``then``. Raises :class:`WalConflictError` on a unique
        violation, else what ``fn`` or the database raised (rolled back)."""
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            await self.start()
        session = _AsyncpgSession(self._conn)
        tr = self._conn.transaction()
        await tr.start()
        try:
            result = await greenlet_spawn(fn, session)
            await session.flush()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await tr.rollback()
            if isinstance(exc, asyncpg.UniqueViolationError):
                raise WalConflictError(str(exc)) from exc
            raise
        await tr.commit()
        if then is not None:
            then(result)
        return result

    async def aclose(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()


async def open_wal_writer(engine: AsyncEngine) -> WalWriter:
    """The fastest writer for ``engine``'s database."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        writer = SqliteWalWriter(url.database)
        await writer.start()
        return writer
    if url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg":
        pg = AsyncpgWalWriter(url.set(drivername="postgresql").render_as_string(False))
        await pg.start()
        return pg
    return await SqlAlchemyWalWriter.connect(engine)
