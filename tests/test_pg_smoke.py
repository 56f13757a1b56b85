"""The tests' private PostgreSQL cluster: the project's schema migrates and a post is stored."""

from __future__ import annotations

import anyio
from sqlalchemy import text

from agent_network.store.engine import create_engine, database_url


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
