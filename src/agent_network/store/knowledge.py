"""Storage of knowledge documents and chunks, and full-text search over them.

SQLite: an external-content FTS5 table ``knowledge_fts`` ranked with bm25. Other dialects fall
back to a LIKE scan until their own index (PostgreSQL tsvector) lands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Float, Integer, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from agent_network.store.tables import knowledge_chunks, knowledge_documents


async def insert_document(
    conn: AsyncConnection, document: dict[str, Any], chunks: Sequence[str]
) -> None:
    """Insert a document row and its chunks, and index the chunks (caller's transaction)."""
    await conn.execute(knowledge_documents.insert().values(**document))
    for i, chunk in enumerate(chunks):
        result = await conn.execute(
            knowledge_chunks.insert().values(
                document_id=document["id"],
                org_id=document["org_id"],
                agent_id=document["agent_id"],
                ordinal=i,
                text=chunk,
            )
        )
        if conn.dialect.name == "sqlite":
            rowid = result.inserted_primary_key[0] if result.inserted_primary_key else None
            await conn.execute(
                text("INSERT INTO knowledge_fts(rowid, text) VALUES (:id, :text)"),
                {"id": rowid, "text": chunk},
            )


async def delete_document(conn: AsyncConnection, document_id: str) -> None:
    """Delete a document, its chunks and their index entries (caller's transaction)."""
    if conn.dialect.name == "sqlite":
        rows = (
            await conn.execute(
                select(knowledge_chunks.c.id, knowledge_chunks.c.text).where(
                    knowledge_chunks.c.document_id == document_id
                )
            )
        ).all()
        for rowid, chunk in rows:
            await conn.execute(
                text(
                    "INSERT INTO knowledge_fts(knowledge_fts, rowid, text) "
                    "VALUES ('delete', :id, :text)"
                ),
                {"id": rowid, "text": chunk},
            )
    await conn.execute(
        knowledge_chunks.delete().where(knowledge_chunks.c.document_id == document_id)
    )
    await conn.execute(knowledge_documents.delete().where(knowledge_documents.c.id == document_id))


async def search_chunks(
    conn: AsyncConnection,
    *,
    org_id: str,
    agent_id: str | None,
    match: str,
    limit: int,
) -> list[dict[str, Any]]:
    """Best chunks for the FTS5 expression ``match`` among ``org_id``'s knowledge only.

    Org-wide knowledge (agent_id NULL) is included; with ``agent_id`` that agent's own knowledge
    too, never another agent's. Returns dicts with document_id, document name, text, score.
    """
    if not match:
        return []
    scope: ColumnElement[bool] = knowledge_chunks.c.agent_id.is_(None)
    if agent_id is not None:
        scope = or_(scope, knowledge_chunks.c.agent_id == agent_id)
    if conn.dialect.name == "sqlite":
        fts = (
            text(
                "SELECT rowid AS id, bm25(knowledge_fts) AS score FROM knowledge_fts "
                "WHERE knowledge_fts MATCH :m"
            )
            .columns(id=Integer, score=Float)
            .subquery("fts")
        )
        q = (
            select(
                knowledge_chunks.c.document_id,
                knowledge_documents.c.name,
                knowledge_chunks.c.text,
                fts.c.score,
            )
            .join(fts, fts.c.id == knowledge_chunks.c.id)
            .join(knowledge_documents, knowledge_documents.c.id == knowledge_chunks.c.document_id)
            .where(knowledge_chunks.c.org_id == org_id, scope)
            .order_by(fts.c.score)
            .limit(limit)
        )
        rows = (await conn.execute(q, {"m": match})).mappings().all()
    else:  # pragma: no cover - PostgreSQL support arrives with its own index
        words = [w.strip('"') for w in match.split(" OR ")]
        q = (
            select(
                knowledge_chunks.c.document_id, knowledge_documents.c.name, knowledge_chunks.c.text
            )
            .join(knowledge_documents, knowledge_documents.c.id == knowledge_chunks.c.document_id)
            .where(
                knowledge_chunks.c.org_id == org_id,
                scope,
                or_(*(knowledge_chunks.c.text.ilike(f"%{w}%") for w in words)),
            )
            .limit(limit)
        )
        rows = (await conn.execute(q)).mappings().all()
    return [
        {
            "document_id": r["document_id"],
            "document": r["name"],
            "text": r["text"],
            "score": float(r.get("score") or 0.0),
        }
        for r in rows
    ]
