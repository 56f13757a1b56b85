"""Database engine: URL handling, durable SQLite settings, schema upgrade on start.

The embedded default is one SQLite file (``sqlite+aiosqlite:///path``) opened in WAL mode with
``synchronous=FULL``, so a commit that returned is on disk (survives ``kill -9`` and power loss
as far as the OS honours fsync). PostgreSQL (``postgresql://...``, asyncpg) runs every connection
with ``synchronous_commit=on`` (or a durable level the URL names), so there too acknowledged
means committed. Everything dialect-specific lives in this package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from agent_network.errors import AgentNetworkError

_MIGRATIONS = Path(__file__).parent / "migrations"

DURABLE_COMMIT_LEVELS = ("on", "remote_apply", "remote_write", "local")
"""``synchronous_commit`` levels a PostgreSQL URL may ask for (``?synchronous_commit=...``):
each returns from COMMIT only once the commit is flushed to the primary's WAL on disk (and, for
the ``remote_*`` ones, also reached synchronous standbys). ``off`` is refused: a commit could be
acknowledged and then lost in a crash."""


class DatabaseUrlError(AgentNetworkError):
    """The database URL asks for a setting the store refuses (a configuration problem)."""

    code = "database_url_invalid"
    status = 500


def database_url(value: str | os.PathLike[str]) -> str:
    """Turn a path or URL into an async SQLAlchemy URL.

    A plain path (``data/an.db``) becomes ``sqlite+aiosqlite:///data/an.db``; ``sqlite:///`` and
    ``postgresql://`` URLs get their async driver. Returns the URL as a string.
    """
    text = os.fspath(value)
    if "://" not in text:
        return f"sqlite+aiosqlite:///{Path(text).expanduser()}"
    if text.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + text[len("sqlite://") :]
    if text.startswith("postgresql://") or text.startswith("postgres://"):
        return "postgresql+asyncpg://" + text.split("://", 1)[1]
    return text


def is_sqlite(engine: AsyncEngine) -> bool:
    """True when the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # aiosqlite's adapter exposes a DB-API connection; pysqlite's implicit transaction handling is
    # disabled so that SQLAlchemy's BEGIN is the one that counts.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """Create the async engine for ``url`` (already normalised by :func:`database_url`).

    SQLite files get their parent directory created, WAL mode, ``synchronous=FULL``, foreign keys
    and a 10 s busy timeout on every connection. PostgreSQL connections get
    ``synchronous_commit=on`` (see :func:`_postgres_engine`; DatabaseUrlError for ``off``).
    """
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=echo, pool_size=8, max_overflow=8)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    return _postgres_engine(url, echo=echo)


def _postgres_engine(url: str, *, echo: bool) -> AsyncEngine:
    """The engine for a PostgreSQL (or other server) ``url``. PostgreSQL connections get
    ``synchronous_commit`` set per connection (``on``, or the URL's ``synchronous_commit`` query
    parameter, one of :data:`DURABLE_COMMIT_LEVELS`), whatever the server's or the database's
    default is. Raises :class:`DatabaseUrlError` for any other level."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return create_async_engine(url, echo=echo, pool_size=10, max_overflow=20)
    asked = parsed.query.get("synchronous_commit", "on")
    level = (asked[-1] if isinstance(asked, tuple) else asked).strip().lower()
    if level not in DURABLE_COMMIT_LEVELS:
        raise DatabaseUrlError(
            f"synchronous_commit={level!r} in the database URL: a post must be durable when it "
            f"is acknowledged, so use one of {', '.join(DURABLE_COMMIT_LEVELS)} (default on)"
        )
    parsed = parsed.difference_update_query(["synchronous_commit"])
    return create_async_engine(
        parsed,
        echo=echo,
        pool_size=10,
        max_overflow=20,
        connect_args={"server_settings": {"synchronous_commit": level}},
    )


def alembic_config() -> Config:
    """Alembic configuration pointing at the bundled migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def _upgrade(sync_conn: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


async def upgrade_schema(engine: AsyncEngine) -> None:
    """Apply every pending Alembic migration to ``engine``'s database (idempotent). On
    PostgreSQL a transaction-scoped advisory lock makes servers starting together migrate one
    after the other."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended('an_schema', 0))")
            )
        await conn.run_sync(_upgrade)


@contextlib.asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """``engine.begin()`` shielded from cancellation: the block commits (or rolls back on an
    error) even when the task running it is cancelled meanwhile; the cancellation takes effect
    right after. Use it for every write. A task cancelled while an aiosqlite call of a write
    transaction was in flight could leave that connection inside its transaction, holding
    SQLite's write lock, so every other writer waited out its 10 s busy timeout (measured: a
    server stop took 10-30 s under load). The blocks are short database work, so finishing them
    delays a stop by milliseconds."""
    with anyio.CancelScope(shield=True):
        async with engine.begin() as conn:
            yield conn
