"""Storage of knowledge documents and chunks, and full-text search over them.

One search contract on both engines (``docs/architecture.md``, "Shared state on PostgreSQL"):

- **Query.** A search is a list of terms (:func:`agent_network.knowledge.search_terms`: the
  query's distinct non-stop words). A term with inner ``'`` or ``-`` is a phrase of its parts.
- **Match set.** A chunk matches when it holds *at least one* term (terms are OR-ed), compared
  after case folding, diacritic removal and English stemming, every run of non-alphanumeric
  characters being a separator.
- **Order.** Best first by the engine's relevance score (more, and rarer on SQLite, occurrences
  of more terms rank higher); equal scores by chunk id, that is by insertion: document, then
  position in the document. ``score`` is returned as "lower is better"; its scale is the
  engine's own and only its order means anything.

SQLite: an external-content FTS5 table ``knowledge_fts`` (tokenizer ``porter unicode61``), each
term a quoted FTS5 string, ranked with ``bm25``. PostgreSQL (migration 0012): the column
``knowledge_chunks.tsv`` = ``to_tsvector('an_english', index_text(text))`` with a GIN index, the
configuration ``an_english`` being Snowball English without stop words; each term a
``phraseto_tsquery``, OR-ed, ranked with ``ts_rank_cd`` normalised by ``1 + log(length)`` (as
bm25, a shorter chunk with the same matches ranks higher; score = minus the rank). Known
differences: Porter (SQLite) and Snowball English (PostgreSQL) stem a few words differently, and
bm25 weighs rare terms higher where ts_rank_cd does not.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Float, Integer, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from agent_network.store.tables import knowledge_chunks, knowledge_documents

__all__ = ["delete_document", "index_text", "insert_document", "search_chunks"]

TS_CONFIG = "an_english"  # PostgreSQL text search configuration (migration 0012)
_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)


def index_text(value: str) -> str:
    """``value`` tokenised as SQLite's ``unicode61`` tokenizer does, for PostgreSQL's parser:
    diacritics removed and every run of characters that are not letters or digits (``_``
    included) turned into one space. Returns the words separated by single spaces."""
    decomposed = unicodedata.normalize("NFD", value)
    bare = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFC", bare)).strip()


async def insert_document(
    conn: AsyncConnection, document: dict[str, Any], chunks: Sequence[str]
) -> None:
    """Insert a document row and its chunks, and index the chunks (caller's transaction).

    ``document`` holds the ``knowledge_documents`` columns; ``chunks`` the texts in order."""
    await conn.execute(knowledge_documents.insert().values(**document))
    if not chunks:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text(
                "INSERT INTO knowledge_chunks (document_id, org_id, agent_id, ordinal, text, tsv) "
                f"VALUES (:document_id, :org_id, :agent_id, :ordinal, :text, "
                f"to_tsvector('{TS_CONFIG}', :indexed))"
            ),
            [
                {
                    "document_id": document["id"],
                    "org_id": document["org_id"],
                    "agent_id": document["agent_id"],
                    "ordinal": i,
                    "text": chunk,
                    "indexed": index_text(chunk),
                }
                for i, chunk in enumerate(chunks)
            ],
        )
        return
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
    terms: Sequence[str],
    limit: int,
) -> list[dict[str, Any]]:
    """The ``limit`` best chunks for ``terms`` among ``org_id``'s knowledge only (the module's
    contract: chunks holding at least one term, best first, ties by chunk id).

    ``terms`` come from :func:`agent_network.knowledge.search_terms`. Org-wide knowledge
    (agent_id NULL) is included; with ``agent_id`` that agent's own knowledge too, never another
    agent's. Returns dicts with ``document_id``, ``document`` (its name), ``text`` and ``score``
    (a float, lower is better). No terms: [].
    """
    words = [w for w in (index_text(t) for t in terms) if w]
    if not words:
        return []
    scope: ColumnElement[bool] = knowledge_chunks.c.agent_id.is_(None)
    if agent_id is not None:
        scope = or_(scope, knowledge_chunks.c.agent_id == agent_id)
    params: dict[str, Any] = {}
    if conn.dialect.name == "sqlite":
        params["m"] = " OR ".join(f'"{w}"' for w in words)
        ranked = text(
            "SELECT rowid AS id, bm25(knowledge_fts) AS score FROM knowledge_fts "
            "WHERE knowledge_fts MATCH :m"
        )
    elif conn.dialect.name == "postgresql":
        query = " || ".join(f"phraseto_tsquery('{TS_CONFIG}', :t{i})" for i in range(len(words)))
        params.update({f"t{i}": w for i, w in enumerate(words)})
        ranked = text(
            # normalisation 1: rank / (1 + log(words)), bm25's preference for short chunks
            f"SELECT c.id AS id, -ts_rank_cd(c.tsv, q.q, 1) AS score "
            f"FROM knowledge_chunks c, ({'SELECT ' + query + ' AS q'}) q WHERE c.tsv @@ q.q"
        )
    else:
        raise NotImplementedError(f"knowledge search on {conn.dialect.name}")
    found = ranked.columns(id=Integer, score=Float).subquery("found")
    q = (
        select(
            knowledge_chunks.c.document_id,
            knowledge_documents.c.name,
            knowledge_chunks.c.text,
            found.c.score,
        )
        .join(found, found.c.id == knowledge_chunks.c.id)
        .join(knowledge_documents, knowledge_documents.c.id == knowledge_chunks.c.document_id)
        .where(knowledge_chunks.c.org_id == org_id, scope)
        .order_by(found.c.score, knowledge_chunks.c.id)
        .limit(limit)
    )
    rows = (await conn.execute(q, params)).mappings().all()
    return [
        {
            "document_id": r["document_id"],
            "document": r["name"],
            "text": r["text"],
            "score": float(r["score"]),
        }
        for r in rows
    ]
