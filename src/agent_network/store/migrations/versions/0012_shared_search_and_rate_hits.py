"""shared state for several servers: knowledge search on PostgreSQL, and rate-limit hits

Both engines: the table ``rate_hits(id, scope, key, at)`` with an index on ``(scope, key, at)``,
one row per attempt admitted by a rate limit shared by the server processes
(services/ratelimit.py, SharedWindowLimiter; on SQLite the table stays empty: one process keeps
its windows in memory).

PostgreSQL only (SQLite keeps its FTS5 table ``knowledge_fts``):

- A text search dictionary ``an_english_stem`` (Snowball English, *no* stop words: SQLite's
  ``porter unicode61`` tokenizer has none either; the query side drops its own stop words) and a
  configuration ``an_english`` (a copy of ``english`` whose word mappings use it).
- ``knowledge_chunks.tsv``: ``to_tsvector('an_english', <text tokenised like unicode61>)``, kept
  by ``store/knowledge.py`` when it inserts a chunk (the tokenising is done in Python: diacritics
  removed, every run of non-alphanumeric characters a separator), and a GIN index over it.
- Existing chunks are backfilled here with the same tokenising.

The downgrade drops ``rate_hits``, and on PostgreSQL the index, the column, the configuration and
the dictionary.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import re
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)
# token types of PostgreSQL's default parser that hold words (hyphens are gone after tokenising,
# but a copy of the parser's mapping keeps the configuration complete)
_WORD_TOKENS = (
    "asciiword, word, numword, asciihword, hword, numhword, "
    "hword_asciipart, hword_part, hword_numpart"
)


def _tokenised(text: str) -> str:
    # frozen copy of store/knowledge.py's index_text at the time of this migration
    decomposed = unicodedata.normalize("NFD", text)
    bare = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFC", bare)).strip()


def upgrade() -> None:
    op.create_table(
        "rate_hits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_hits")),
    )
    op.create_index("ix_rate_hits_scope_key_at", "rate_hits", ["scope", "key", "at"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(
        "CREATE TEXT SEARCH DICTIONARY an_english_stem (TEMPLATE = snowball, LANGUAGE = english)"
    )
    op.execute("CREATE TEXT SEARCH CONFIGURATION an_english (COPY = english)")
    op.execute(
        f"ALTER TEXT SEARCH CONFIGURATION an_english ALTER MAPPING FOR {_WORD_TOKENS} "
        "WITH an_english_stem"
    )
    op.execute("ALTER TABLE knowledge_chunks ADD COLUMN tsv tsvector")
    rows = bind.execute(sa.text("SELECT id, text FROM knowledge_chunks")).all()
    for chunk_id, text in rows:
        bind.execute(
            sa.text(
                "UPDATE knowledge_chunks SET tsv = to_tsvector('an_english', :t) WHERE id = :i"
            ),
            {"t": _tokenised(text), "i": chunk_id},
        )
    op.execute("ALTER TABLE knowledge_chunks ALTER COLUMN tsv SET NOT NULL")
    op.execute("CREATE INDEX ix_knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv)")


def downgrade() -> None:
    op.drop_index("ix_rate_hits_scope_key_at", table_name="rate_hits")
    op.drop_table("rate_hits")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_knowledge_chunks_tsv")
    op.execute("ALTER TABLE knowledge_chunks DROP COLUMN IF EXISTS tsv")
    op.execute("DROP TEXT SEARCH CONFIGURATION IF EXISTS an_english")
    op.execute("DROP TEXT SEARCH DICTIONARY IF EXISTS an_english_stem")
