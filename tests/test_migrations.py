"""Alembic migrations: head matches the table definitions; upgrades keep existing data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from agent_network.services.principal import hash_secret
from agent_network.store.engine import alembic_config
from agent_network.store.tables import metadata
from conftest import LiveServer


def _upgrade_sync(db: Path, revision: str) -> None:
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def test_head_matches_the_table_definitions(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _upgrade_sync(db, "head")
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    # the FTS5 index is created by the migration on purpose and has no Table definition
    unexpected = [d for d in diff if not (d[0] == "remove_table" and "knowledge_fts" in d[1].name)]
    assert unexpected == []


def test_upgrade_keeps_org_keys_working(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _upgrade_sync(db, "0001")
    secret = "an_org_" + "k" * 43
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org_old', 'Old', 't')")
        conn.execute(
            "INSERT INTO org_keys (id, org_id, key_hash, created_at) VALUES (?, ?, ?, ?)",
            ("key_old", "org_old", hash_secret(secret), "t"),
        )
    server = LiveServer(db)  # upgrades to head, like `serve` does
    server.start()
    try:
        with server.client(secret) as http:
            r = http.get("/orgs/me")
            assert r.status_code == 200 and r.json()["name"] == "Old", r.text
            creds = http.get("/credentials").json()
            assert [(c["id"], c["kind"], c["scopes"]) for c in creds] == [
                ("key_old", "org_key", ["read", "write"])
            ]
    finally:
        server.stop()
