"""Alembic migrations: head matches the table definitions; upgrades keep existing data."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from agent_network.services.principal import hash_secret
from agent_network.store.engine import alembic_config
from agent_network.store.tables import metadata
from conftest import LiveServer, TestDb, sqlite_only, sync_url

_SEEDED_WITH_SQLITE3 = (
    "seeds rows at an old revision through sqlite3; on PostgreSQL every test database is "
    "migrated from empty to head (pg_template)"
)


def _upgrade_sync(db: Path, revision: str) -> None:
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


@pytest.mark.engines("sqlite", "postgresql")
def test_head_matches_the_table_definitions(db: TestDb) -> None:
    """``db`` is migrated to head by the project's own upgrade (``upgrade_schema``)."""
    engine = create_engine(sync_url(db))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    # the full-text index is created by the migration on purpose and has no Table definition:
    # SQLite's FTS5 table knowledge_fts, PostgreSQL's tsv column of knowledge_chunks and its index
    unexpected = [
        d
        for d in diff
        if not (d[0] == "remove_table" and "knowledge_fts" in d[1].name)
        and not (d[0] == "remove_column" and d[2] == "knowledge_chunks" and d[3].name == "tsv")
        and not (d[0] == "remove_index" and d[1].name == "ix_knowledge_chunks_tsv")
    ]
    assert unexpected == []


@sqlite_only(_SEEDED_WITH_SQLITE3)
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


# ------------------------------------------------------------- 0009: rules name principals by id


def _rules_world(db: Path, *, second_acme: bool = False) -> None:
    """A database at 0008 with rules written the old way (names and ``org:<name>``).

    Carrier hosts network Net with its agent Desk and person Cora; guest orgs Acme and Globex
    joined with their persons Alex and Gus. Carrier also has a person called Gus (its own
    org is looked at first). ``second_acme``: another org called "Acme" joins too."""
    _upgrade_sync(db, "0008")
    t = "2026-01-01T00:00:00.000000+00:00"
    orgs = [("org_c", "Carrier"), ("org_a", "Acme"), ("org_g", "Globex"), ("org_x", "Outside")]
    if second_acme:
        orgs.append(("org_a2", "Acme"))
    users = [
        ("usr_cora", "org_c", "Cora"),
        ("usr_cgus", "org_c", "Gus"),
        ("usr_alex", "org_a", "Alex"),
        ("usr_gus", "org_g", "Gus"),
        ("usr_stan", "org_x", "Stan"),
    ]
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)", [(*o, t) for o in orgs]
        )
        conn.executemany(
            "INSERT INTO users (id, org_id, name, auto_ack, created_at) VALUES (?, ?, ?, 0, ?)",
            [(*u, t) for u in users],
        )
        conn.execute(
            "INSERT INTO teams (id, org_id, kind, name, description, status, created_at) "
            "VALUES ('net_1', 'org_c', 'network', 'Net', '', 'open', ?)",
            (t,),
        )
        guests = ["org_a", "org_g"] + (["org_a2"] if second_acme else [])
        conn.executemany(
            "INSERT INTO visas (id, network_id, org_id, created_at) VALUES (?, 'net_1', ?, ?)",
            [(f"visa_{o}", o, t) for o in guests],
        )
        members = [("agent", "agt_desk", "org_c"), ("user", "usr_cora", "org_c")]
        members += [("user", "usr_alex", "org_a"), ("user", "usr_gus", "org_g")]
        conn.executemany(
            "INSERT INTO members (team_id, member_kind, member_id, org_id, role, created_at) "
            "VALUES ('net_1', ?, ?, ?, 'member', ?)",
            [(*m, t) for m in members],
        )

        def agent(agent_id: str, name: str, rule: object, deleted: bool = False) -> None:
            conn.execute(
                "INSERT INTO agents (id, org_id, name, lookup_key, identity, metadata, rule, "
                "created_at, updated_at, deleted_at) "
                "VALUES (?, 'org_c', ?, ?, '', '{}', ?, ?, ?, ?)",
                (agent_id, name, agent_id, json.dumps(rule), t, t, t if deleted else None),
            )

        agent(
            "agt_desk",
            "Desk",
            {
                "inbound_from": ["org:acme", "gus", "CORA", "*", "Cora"],
                "outbound_to": ["org:Carrier", "org:Globex", "Alex"],
                "rate": {"messages": 5, "per_seconds": 60},
            },
        )
        agent("agt_open", "Open", {"inbound_from": ["*"], "outbound_to": ["*"]})
        agent("agt_free", "Free", None)
        agent("agt_gone", "Gone", {"inbound_from": ["Nobody*"]}, deleted=True)
        if second_acme:
            agent("agt_picky", "Picky", {"inbound_from": ["org:Acme", "Stan", "A*"]})


def _rules(db: Path) -> dict[str, object]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, rule FROM agents ORDER BY id").fetchall()
    return {agent_id: json.loads(rule) if rule is not None else None for agent_id, rule in rows}


def _version(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


@sqlite_only(_SEEDED_WITH_SQLITE3)
def test_0009_converts_names_in_rules_to_ids(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    _rules_world(db)
    before = _rules(db)
    _upgrade_sync(db, "0009")
    assert _version(db) == "0009"
    after = _rules(db)
    assert after["agt_desk"] == {
        # own org first: "gus" is Carrier's own Gus, not Globex's; duplicates collapse
        "inbound_from": ["org_a", "usr_cgus", "usr_cora", "*"],
        "outbound_to": ["org_c", "org_g", "usr_alex"],
        "rate": {"messages": 5, "per_seconds": 60},
    }
    # "*", no rule, and a deleted agent's rule stay as they were
    for agent_id in ("agt_open", "agt_free", "agt_gone"):
        assert after[agent_id] == before[agent_id]
    # downgrading writes names back
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
    engine.dispose()
    assert _rules(db)["agt_desk"] == {
        "inbound_from": ["org:Acme", "Gus", "Cora", "*"],
        "outbound_to": ["org:Carrier", "org:Globex", "Alex"],
        "rate": {"messages": 5, "per_seconds": 60},
    }


@sqlite_only(_SEEDED_WITH_SQLITE3)
def test_0009_refuses_rules_it_cannot_resolve_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    _rules_world(db, second_acme=True)
    before = _rules(db)
    with pytest.raises(Exception) as caught:
        _upgrade_sync(db, "0009")
    assert type(caught.value).__name__ == "RuleMigrationError"
    report = str(caught.value)
    # every entry it cannot convert is listed with the agent, the field and why
    assert "4 rule entries" in report, report
    for line in (
        "agent agt_desk ('Desk') inbound_from 'org:acme': ambiguous",
        "agent agt_picky ('Picky') inbound_from 'org:Acme': ambiguous",
        "agent agt_picky ('Picky') inbound_from 'Stan': no agent or user called 'Stan'",
        "agent agt_picky ('Picky') inbound_from 'A*': a pattern",
    ):
        assert line in report, report
    assert "org_a, org_a2" in report
    # the database is still at 0008, with every rule as it was (Desk's convertible one too)
    assert _version(db) == "0008"
    assert _rules(db) == before


# ------------------------------------------------------ 0011: one cursor table for every consumer


def _cursor_rows(db: Path, table: str) -> set[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return set(conn.execute(f"SELECT * FROM {table}").fetchall())


@sqlite_only(_SEEDED_WITH_SQLITE3)
def test_0011_merges_runner_and_delivery_cursors_and_downgrades_back(tmp_path: Path) -> None:
    db = tmp_path / "cursors.db"
    _upgrade_sync(db, "0010")
    t = "2026-01-01T00:00:00.000000+00:00"
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO orgs (id, name, created_at) VALUES ('org_c', 'Carrier', ?)", (t,))
        conn.execute(
            "INSERT INTO agents (id, org_id, name, lookup_key, identity, metadata, "
            "created_at, updated_at) VALUES ('agt_bot', 'org_c', 'Bot', 'bot', '', '{}', ?, ?)",
            (t, t),
        )
        conn.executemany(
            "INSERT INTO runner_cursors (agent_id, thread_id, seq) VALUES (?, ?, ?)",
            [("agt_bot", "thr_1", 5), ("agt_bot", "thr_2", 7)],
        )
        conn.executemany(
            "INSERT INTO delivery_cursors (subscriber_id, name, thread_id, seq, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                ("usr_ann", "worker", "thr_1", 3, t),
                ("agt_bot", "hubclient", "thr_1", 4, t),
                ("org_c", "inbox", "thr_2", 2, t),
                ("agt_bot", "runner", "thr_1", 9, t),  # a consumer that chose the runner's name
            ],
        )
    _upgrade_sync(db, "0011")
    assert _version(db) == "0011"
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "runner_cursors" not in tables and "delivery_cursors" not in tables
    rows = {r[:4] for r in _cursor_rows(db, "cursors")}
    assert rows == {
        ("usr_ann", "worker", "thr_1", 3),
        ("agt_bot", "hubclient", "thr_1", 4),
        ("org_c", "inbox", "thr_2", 2),
        ("agt_bot", "runner", "thr_1", 9),  # merged at the higher seq
        ("agt_bot", "runner", "thr_2", 7),
    }
    assert all(r[4] for r in _cursor_rows(db, "cursors"))  # every row has a time

    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010")
    engine.dispose()
    assert _cursor_rows(db, "runner_cursors") == {("agt_bot", "thr_1", 9), ("agt_bot", "thr_2", 7)}
    assert {r[:4] for r in _cursor_rows(db, "delivery_cursors")} == {
        ("usr_ann", "worker", "thr_1", 3),
        ("agt_bot", "hubclient", "thr_1", 4),
        ("org_c", "inbox", "thr_2", 2),
    }
