"""Knowledge search keeps one contract on SQLite (FTS5) and PostgreSQL (tsvector + GIN).

The contract (store/knowledge.py, docs/architecture.md "Shared state on PostgreSQL"): a chunk
matches when it holds at least one of the query's non-stop words (stemmed, case and diacritics
folded, a hyphenated word a phrase of its parts); results are best first; equal scores in
document order; ``score`` is lower-is-better.

Agreement measure, on a labelled set of small documents (each one chunk) and queries with the
chunks a reader would call relevant: on *both* engines, through ``KnowledgeService.search`` (the
public path), (1) the set returned with a limit larger than the corpus is exactly the labelled
relevant set, (2) the top result is the labelled best chunk, hence (3) both engines agree on the
set and on the top-1. Orders below the top are engine-specific (bm25 weighs rare terms, ts_rank_cd
does not) and are not compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.knowledge import search_terms
from agent_network.services import ServiceContext, Services, create_admin_key
from agent_network.services.knowledge import KnowledgeService
from agent_network.services.principal import Principal
from agent_network.store.engine import alembic_config, create_engine, database_url
from agent_network.store.knowledge import index_text
from conftest import sql_execute, sql_rows, sync_url
from pgcluster import PgCluster

# name -> content; every document is short enough to be one chunk
CORPUS: dict[str, str] = {
    # the same single mention of a term in a long chunk and (added later) in a short one: the
    # short one ranks first on both engines (bm25's and ts_rank_cd's length normalisation)
    "widgets_long": "Quarterly planning notes: the roadmap review covers hiring, budgets, "
    "office moves, vendor contracts, travel policy, the holiday calendar, training courses and "
    "finally one line about the widget inventory that nobody reads.",
    "widgets": "Widgets ship on Mondays.",
    "rollback": "# Rollback plan\n\nIf webhook validation fails we roll back to the legacy "
    "platform within two hours. The project lead owns the rollback decision.",
    "cutover": "# Cutover window\n\nThe cutover happens on Thursday between 06:00 and 09:00 UTC.",
    "pager": "# Contacts\n\nEscalate to the duty manager via the pager; the pager rotation is "
    "weekly.",
    "invoices": "Invoices are migrated in batches; each batch of invoices is reconciled nightly.",
    "refunds": "Refunds above 500 EUR need a second approver from finance.",
    "cafe": "The team lunch is at the Café Zürich near the station.",
    "sota": "Our retrieval is state-of-the-art for short documents.",
    "runner": "Runners claim triggers with a lease; a crashed runner's lease expires and another "
    "runner claims the trigger again.",
    "cache": "Post decisions are cached for one second; a revoked visa stops posting within it.",
    "onboarding": "New engineers get a laptop, a badge and an onboarding buddy in week one.",
    "security": "Rotate API keys every ninety days; revoked keys stop working at once.",
    "backups": "Database backups run hourly and are kept for thirty days in cold storage.",
    "dont": "Don't deploy on Fridays after noon.",
    "snake_case": "Settings use snake_case names such as max_body_bytes.",
}

# query -> (the best chunk, every relevant chunk)
LABELS: dict[str, tuple[str, set[str]]] = {
    "rollback legacy platform": ("rollback", {"rollback"}),
    "When is the cutover window?": ("cutover", {"cutover"}),
    "pager escalation": ("pager", {"pager"}),
    "invoice batches": ("invoices", {"invoices"}),
    "cafe zurich": ("cafe", {"cafe"}),
    "state-of-the-art": ("sota", {"sota"}),
    "runner lease expired": ("runner", {"runner"}),
    "revoked keys": ("security", {"security", "cache"}),
    "don't deploy": ("dont", {"dont"}),
    "body bytes": ("snake_case", {"snake_case"}),
    "widget": ("widgets", {"widgets", "widgets_long"}),
    "the of and": ("", set()),
}


@contextlib.asynccontextmanager
async def knowledge_service(url: str) -> AsyncIterator[tuple[KnowledgeService, Principal]]:
    """The knowledge service of a hub over ``url`` and a fresh org's principal."""
    engine = create_engine(database_url(url))
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            ctx = ServiceContext(engine, hub, Settings(database=url, model="test"))
            services = Services.create(ctx)
            admin = await services.orgs.authenticate(await create_admin_key(engine))
            org = await services.orgs.create_org(admin, "Labelled")
            principal = await services.orgs.authenticate(org["secret"])
            yield services.knowledge, principal
    finally:
        await engine.dispose()


async def run_labelled(url: str) -> dict[str, list[str]]:
    """Attach the corpus, run every labelled query; the document names found, best first."""
    async with knowledge_service(url) as (knowledge, principal):
        added = await knowledge.add(
            principal, [{"name": name, "content": body} for name, body in CORPUS.items()]
        )
        assert all(d["chunks"] == 1 for d in added)
        out = {}
        for query in LABELS:
            hits = await knowledge.search(principal, query, limit=50)
            scores = [h["score"] for h in hits]
            assert scores == sorted(scores), (query, hits)  # lower is better, best first
            out[query] = [h["document"] for h in hits]
        return out


def check_labels(found: dict[str, list[str]]) -> None:
    for query, (best, relevant) in LABELS.items():
        assert set(found[query]) == relevant, query
        if best:
            assert found[query][0] == best, (query, found[query])


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("db"))
    return str(request.getfixturevalue("pg_db"))


def test_labelled_set_on_each_engine(engine_url: str) -> None:
    check_labels(anyio.run(run_labelled, engine_url))


def test_both_engines_agree_on_sets_and_top1(db: Path, pg_db: str) -> None:
    lite, pg = anyio.run(run_labelled, str(db)), anyio.run(run_labelled, pg_db)
    for query in LABELS:
        assert set(lite[query]) == set(pg[query]), query
        assert lite[query][:1] == pg[query][:1], query


def test_postgresql_uses_the_gin_index_not_a_scan(pg_db: str) -> None:
    """The search is ``tsv @@ query`` over the GIN index of migration 0012 (no LIKE fallback)."""

    async def plan() -> str:
        engine = create_engine(database_url(pg_db))
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SET enable_seqscan = off"))
                rows = await conn.execute(
                    text(
                        "EXPLAIN SELECT id FROM knowledge_chunks "
                        "WHERE tsv @@ phraseto_tsquery('an_english', 'rollback')"
                    )
                )
                return "\n".join(r[0] for r in rows)
        finally:
            await engine.dispose()

    assert "ix_knowledge_chunks_tsv" in anyio.run(plan)


def test_ties_are_in_document_order(engine_url: str) -> None:
    async def run() -> list[str]:
        async with knowledge_service(engine_url) as (knowledge, principal):
            await knowledge.add(
                principal,
                [{"name": f"same{i}", "content": "identical text about gizmos"} for i in range(5)],
            )
            return [h["document"] for h in await knowledge.search(principal, "gizmos")]

    assert anyio.run(run) == [f"same{i}" for i in range(5)]


_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéü-'_ ", min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_words)
def test_index_text_leaves_only_words(value: str) -> None:
    """Whatever the query, its PostgreSQL form is only letters, digits and single spaces (so no
    tsquery syntax can be injected), and tokenising is idempotent."""
    for term in search_terms(value):
        tokens = index_text(term)
        assert tokens == index_text(tokens)
        assert all(w.isalnum() for w in tokens.split(" ") if tokens)
        assert "  " not in tokens


def test_hostile_query_text_is_only_words(engine_url: str) -> None:
    async def run() -> list[Any]:
        async with knowledge_service(engine_url) as (knowledge, principal):
            await knowledge.add(principal, [{"name": "x", "content": "plain words here"}])
            out = []
            for query in ('"', "a:* | !b & (c", "words' OR 1=1 --", "NEAR(x y)", "\\x00 words"):
                out.append([h["document"] for h in await knowledge.search(principal, query)])
            return out

    assert anyio.run(run) == [[], [], ["x"], [], ["x"]]


def _migrate(url: str, target: str, *, down: bool = False) -> None:
    engine = sqlalchemy.create_engine(sync_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, target)
    finally:
        engine.dispose()


def test_0012_backfills_existing_chunks_and_downgrades(pg_cluster: PgCluster) -> None:
    """Chunks stored before 0012 are indexed by its upgrade (searchable at once); the downgrade
    removes the column, its index, the text search configuration and ``rate_hits``."""
    url = pg_cluster.create_database()
    t = "2026-01-01T00:00:00+00:00"
    try:
        _migrate(url, "0011")
        sql_execute(url, "INSERT INTO orgs (id, name, created_at) VALUES ('org_o', 'O', :t)", t=t)
        sql_execute(
            url,
            "INSERT INTO knowledge_documents (id, org_id, agent_id, name, content, created_at) "
            "VALUES ('doc_old', 'org_o', NULL, 'old.md', 'Älteres Rollback-Verfahren', :t)",
            t=t,
        )
        sql_execute(
            url,
            "INSERT INTO knowledge_chunks (document_id, org_id, agent_id, ordinal, text) "
            "VALUES ('doc_old', 'org_o', NULL, 0, 'Älteres Rollback-Verfahren')",
        )
        _migrate(url, "0012")
        found = sql_rows(
            url,
            "SELECT document_id FROM knowledge_chunks "
            "WHERE tsv @@ (phraseto_tsquery('an_english', :a) "
            "|| phraseto_tsquery('an_english', :b))",
            a=index_text("alteres"),
            b="nothing",
        )
        assert found == [("doc_old",)]
        _migrate(url, "0011", down=True)
        columns = sql_rows(
            url,
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'knowledge_chunks' AND column_name = 'tsv'",
        )
        configs = sql_rows(url, "SELECT cfgname FROM pg_ts_config WHERE cfgname = 'an_english'")
        tables = sql_rows(url, "SELECT tablename FROM pg_tables WHERE tablename = 'rate_hits'")
        assert columns == [] and configs == [] and tables == []
        _migrate(url, "head")  # and up again
    finally:
        pg_cluster.drop_database(url.rsplit("/", 1)[1])
