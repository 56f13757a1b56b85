"""Knowledge of an org or of one of its agents: attach documents, list, delete, search."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import func, select

from agent_network.errors import InvalidRequestError, NotFoundError
from agent_network.knowledge.chunking import chunk_text, search_terms
from agent_network.model.ids import new_id, now_iso
from agent_network.services.base import ServiceContext, record
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import Principal
from agent_network.services.scope import own_agent, require_org
from agent_network.store.engine import write_transaction
from agent_network.store.knowledge import delete_document, insert_document, search_chunks
from agent_network.store.tables import knowledge_chunks, knowledge_documents

MAX_DOCUMENT = 2_000_000  # characters
MAX_DOCUMENTS_PER_CALL = 200


def content_sha256(content: str) -> str:
    """The hex SHA-256 of a document's ``content`` encoded as UTF-8."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


class KnowledgeService:
    """Knowledge is private to its org: no call reads another org's documents."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def add(
        self, principal: Principal, documents: list[dict[str, str]], *, agent_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Attach text/markdown ``documents`` (``{"name", "content"}``) to the org or to an agent.

        All documents are stored in one transaction (all or nothing). Returns each document's
        id, name and number of chunks. InvalidRequestError for empty or oversized input, or text
        holding U+0000.
        """
        org_id = require_org(principal)
        if not documents or len(documents) > MAX_DOCUMENTS_PER_CALL:
            raise InvalidRequestError(
                f"send between 1 and {MAX_DOCUMENTS_PER_CALL} documents per call"
            )
        prepared = []
        for doc in documents:
            name, content = doc.get("name", "").strip(), doc.get("content", "")
            if not name:
                raise InvalidRequestError("every document needs a name")
            if "\x00" in content or "\x00" in name:
                raise InvalidRequestError(
                    f"document {name!r} holds the NUL character (U+0000): is it a binary file? "
                    "Send text or markdown"
                )
            if len(content) > MAX_DOCUMENT:
                raise InvalidRequestError(f"document {name!r} exceeds {MAX_DOCUMENT} characters")
            chunks = chunk_text(content)
            if not chunks:
                raise InvalidRequestError(f"document {name!r} has no text")
            prepared.append((name, content, chunks))
        out = []
        async with write_transaction(self.ctx.engine) as conn:
            if agent_id is not None:
                await own_agent(conn, principal, agent_id)
            for name, content, chunks in prepared:
                row = {
                    "id": new_id("doc"),
                    "org_id": org_id,
                    "agent_id": agent_id,
                    "name": name,
                    "content": content,
                    "created_at": now_iso(),
                }
                await insert_document(conn, row, chunks)
                await record(conn, principal, "knowledge.add", "knowledge", row["id"])
                out.append(
                    {
                        "id": row["id"],
                        "name": name,
                        "agent_id": agent_id,
                        "chunks": len(chunks),
                        "created_at": row["created_at"],
                        "sha256": content_sha256(content),
                    }
                )
        return out

    async def list_documents(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The org's documents (org-wide when ``agent_id`` is None, else that agent's), oldest
        first, each with ``sha256``, the hex SHA-256 of its content as UTF-8 (a client skips
        uploading a file whose content is there already); a keyset page by ``(created_at,
        id)`` with ``after``/``limit``."""
        org_id = require_org(principal)
        async with self.ctx.engine.connect() as conn:
            if agent_id is not None:
                await own_agent(conn, principal, agent_id)
            n = (
                select(func.count())
                .where(knowledge_chunks.c.document_id == knowledge_documents.c.id)
                .scalar_subquery()
            )
            q = select(
                knowledge_documents.c.id,
                knowledge_documents.c.name,
                knowledge_documents.c.agent_id,
                knowledge_documents.c.created_at,
                n.label("chunks"),
                knowledge_documents.c.content,
            ).where(knowledge_documents.c.org_id == org_id)
            q = q.where(
                knowledge_documents.c.agent_id.is_(None)
                if agent_id is None
                else knowledge_documents.c.agent_id == agent_id
            )
            q = keyset(
                q, (knowledge_documents.c.created_at, knowledge_documents.c.id), after, limit
            )
            rows = [dict(r) for r in (await conn.execute(q)).mappings()]
        for row in rows:
            row["sha256"] = content_sha256(row.pop("content"))
        return rows

    async def delete(self, principal: Principal, document_id: str) -> None:
        """Delete one of the org's documents."""
        org_id = require_org(principal)
        async with write_transaction(self.ctx.engine) as conn:
            row = (
                await conn.execute(
                    select(knowledge_documents.c.id).where(
                        knowledge_documents.c.id == document_id,
                        knowledge_documents.c.org_id == org_id,
                    )
                )
            ).first()
            if row is None:
                raise NotFoundError("document", document_id)
            await delete_document(conn, document_id)
            await record(conn, principal, "knowledge.delete", "knowledge", document_id)

    async def search(
        self, principal: Principal, query: str, *, agent_id: str | None = None, limit: int = 5
    ) -> list[dict[str, Any]]:
        """Best-matching chunks of the caller's own knowledge for free-text ``query``.

        The same contract on SQLite (FTS5) and PostgreSQL (tsvector): chunks holding at least one
        of the query's non-stop words (stemmed), best first, ties in document order
        (:mod:`agent_network.store.knowledge`). Returns at most ``limit`` dicts with
        ``document_id``, ``document``, ``text``, ``score`` (lower is better).
        InvalidRequestError for a ``limit`` outside 1..50; NotFoundError for an agent outside
        the caller's org."""
        org_id = require_org(principal)
        if not 1 <= limit <= 50:
            raise InvalidRequestError("limit must be between 1 and 50")
        async with self.ctx.engine.connect() as conn:
            if agent_id is not None:
                await own_agent(conn, principal, agent_id)
        return await self.retrieve(org_id, agent_id, query, limit)

    async def retrieve(
        self, org_id: str, agent_id: str | None, query: str, limit: int
    ) -> list[dict[str, Any]]:
        """Internal (runner): chunks of ``org_id``'s knowledge for ``query``; no principal check."""
        async with self.ctx.engine.connect() as conn:
            return await search_chunks(
                conn, org_id=org_id, agent_id=agent_id, terms=search_terms(query), limit=limit
            )
