"""Storage of agent secrets (ciphertext only)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.store.tables import agent_secrets


async def upsert_secret(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Insert the secret row or replace the ciphertext (and fingerprints) of the agent's secret of
    that name."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = ins(agent_secrets).values(**row)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["agent_id", "name"],
            set_={
                "ciphertext": row["ciphertext"],
                "fingerprints": row.get("fingerprints"),
                "updated_at": row["updated_at"],
            },
        )
    )
