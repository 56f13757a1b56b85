"""The tests' private PostgreSQL cluster: the project's schema migrates and a post is stored."""

from __future__ import annotations

import anyio
import psycopg
import pytest
from sqlalchemy import text

from agent_network.store.engine import DatabaseUrlError, create_engine, database_url
from pgcluster import PgCluster


def test_pg_database_has_the_schema(pg_db: str) -> None:
    async def check() -> list[str]:
        engine = create_engine(database_url(pg_db))
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
                return sorted(r[0] for r in rows)
        finally:
            await engine.dispose()

    tables = anyio.run(check)
    assert {"envelopes", "audit_log", "cursors", "alembic_version"} <= set(tables)


def _synchronous_commit(url: str) -> str:
    async def show() -> str:
        engine = create_engine(database_url(url))
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(text("SHOW synchronous_commit"))).scalar_one())
        finally:
            await engine.dispose()

    return anyio.run(show)


def test_commits_are_synchronous_whatever_the_database_default(
    pg_cluster: PgCluster, pg_db: str
) -> None:
    """Acknowledged means committed: the store sets ``synchronous_commit=on`` per connection,
    so a database (or server) configured with it off does not make acknowledged posts
    losable; a URL may ask for another durable level, never ``off``."""
    name = pg_db.rsplit("/", 1)[1]
    with psycopg.connect(f"{pg_cluster.url}/postgres", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    assert _synchronous_commit(pg_db) == "on"
    assert _synchronous_commit(f"{pg_db}?synchronous_commit=remote_apply") == "remote_apply"
    for level in ("off", "nonsense"):
        with pytest.raises(DatabaseUrlError, match="synchronous_commit") as info:
            create_engine(database_url(f"{pg_db}?synchronous_commit={level}"))
        assert info.value.code == "database_url_invalid"
