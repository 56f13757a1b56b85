"""Cursor pagination of every list route (issue 15, docs/api.md#pagination): ``limit`` and an
opaque ``cursor``; the next page's cursor in ``X-Next-Cursor`` and ``Link: <…>; rel="next"``,
both absent on the last page; keyset order, so every item shows up exactly once.

Against a real server on 127.0.0.1 (SQLite and PostgreSQL), and the keyset query itself against
a real SQLite file with hypothesis-generated keys (ties on ``created_at`` included).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_network.api.pagination import BY_CREATED, decode_cursor, encode_cursor
from agent_network.client import AsyncClient, Client
from agent_network.errors import InvalidRequestError
from agent_network.services.paging import keyset, keyset_in_memory
from conftest import LiveServer, Org, assert_error, open_network

N = 5  # items of each list made; every walk uses limit=2, so 3 pages


def walk(http: httpx.Client, path: str, *, limit: int = 2, **params: Any) -> list[list[Any]]:
    """The pages of ``path`` with ``limit``, following ``X-Next-Cursor``; checks the headers of
    each page (both or neither, the Link URL holds the same cursor and limit)."""
    pages: list[list[Any]] = []
    query: dict[str, Any] = {**params, "limit": limit}
    while True:
        r = http.get(path, params=query)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        body = r.json()
        assert isinstance(body, list)
        assert len(body) <= limit
        pages.append(body)
        cursor = r.headers.get("x-next-cursor")
        link = r.headers.get("link")
        if cursor is None:
            assert link is None, f"{path}: a Link without X-Next-Cursor"
            return pages
        assert len(body) == limit, f"{path}: a short page that is not the last"
        assert link is not None and link.endswith('>; rel="next"'), link
        url = urlsplit(link[1 : link.index(">")])
        assert url.path == f"/api/v1{path}"
        link_query = parse_qs(url.query)
        assert link_query["cursor"] == [cursor] and link_query["limit"] == [str(limit)]
        for key, value in params.items():
            assert link_query[key] == [str(value)]
        query = {**params, "limit": limit, "cursor": cursor}


def ids(items: list[Any], key: str = "id") -> list[Any]:
    return [item[key] for item in items]


@pytest.fixture
def world(server: LiveServer, make_org: Any) -> dict[str, Any]:
    """An org with N of everything listable, and a network it hosts with guests."""
    acme: Org = make_org("Acme")
    guests = [make_org(f"Guest {i}") for i in range(3)]
    agents = [acme.agent(f"Bot {i}", f"bot-{i}") for i in range(N)]
    users = [acme.user(f"Person {i}") for i in range(N)]
    bot = agents[0]
    for i in range(N):
        acme.ok("POST", f"/agents/{bot['id']}/routines", json={"name": f"r{i}"})
        acme.ok("PUT", f"/agents/{bot['id']}/secrets/S{i}", json={"value": f"v{i}"})
        acme.ok(
            "POST",
            "/credentials",
            json={"kind": "user_token", "subject_id": users[i]["id"], "name": f"t{i}"},
        )
    acme.ok(
        "POST",
        "/knowledge",
        json={"documents": [{"name": f"d{i}", "content": f"text {i}"} for i in range(N)]},
    )
    acme.ok(
        "POST",
        f"/agents/{bot['id']}/knowledge",
        json={"documents": [{"name": f"a{i}", "content": f"agent text {i}"} for i in range(N)]},
    )
    teams = [acme.team(f"Team {i}") for i in range(N)]
    team = teams[0]
    for kind, member in [*(("agent", a) for a in agents), *(("user", u) for u in users)]:
        acme.ok("POST", f"/teams/{team['id']}/members", json={f"{kind}_id": member["id"]})
    for i in range(N):
        acme.ok("POST", f"/teams/{team['id']}/threads", json={"title": f"thread {i}"})
    net = open_network(
        acme, {g: [] for g in guests}, *(("agent", a["id"]) for a in agents), name="Net 0"
    )
    for i in range(1, N):
        acme.ok("POST", "/networks", json={"name": f"Net {i}"})
    for _ in range(N - len(guests)):
        acme.ok("POST", f"/networks/{net['id']}/invites", json={})
    return {"acme": acme, "bot": bot, "team": team, "net": net}


@pytest.mark.engines("sqlite", "postgresql")
def test_every_list_pages_with_a_cursor(server: LiveServer, world: dict[str, Any]) -> None:
    acme: Org = world["acme"]
    bot, team, net = world["bot"]["id"], world["team"]["id"], world["net"]["id"]
    lists = [
        "/agents",
        "/users",
        "/teams",
        "/networks",
        "/threads",
        "/credentials",
        "/knowledge",
        f"/agents/{bot}/routines",
        f"/agents/{bot}/secrets",
        f"/agents/{bot}/knowledge",
        f"/teams/{team}/members",
        f"/teams/{team}/threads",
        f"/networks/{net}/members",
        f"/networks/{net}/invites",
        f"/networks/{net}/visas",
        "/audit",
    ]
    for path in lists:
        whole = acme.ok("GET", path, params={"limit": 1000})
        assert len(whole) >= 3, f"{path}: too few items to page ({len(whole)})"
        pages = walk(acme.http, path)
        assert len(pages) == -(-len(whole) // 2), path
        walked = [item for page in pages for item in page]
        assert walked == whole, f"{path}: the pages differ from the whole list"
        key = "name" if path.endswith("/secrets") else "id"
        keys = [(i.get("kind"), i[key]) for i in walked]
        assert len(set(keys)) == len(keys), f"{path}: an item shows up twice"
    # the admin's list of orgs pages the same way
    with server.client(server.admin_key) as admin:
        whole = admin.get("/orgs", params={"limit": 1000}).json()
        walked = [o for page in walk(admin, "/orgs") for o in page]
        assert walked == whole and len(whole) == 4
    # an item created after a page was read shows up on a later page, none twice
    first = acme.http.get("/agents", params={"limit": 2})
    late = acme.agent("Late", "late")
    rest = [a for page in walk(acme.http, "/agents") for a in page]
    assert ids(first.json()) == ids(rest)[:2] and ids(rest)[-1] == late["id"]


def test_audit_pages_by_cursor_and_keeps_after_id(server: LiveServer, make_org: Any) -> None:
    acme: Org = make_org("Acme")
    for i in range(6):
        acme.user(f"P{i}")
    whole = acme.ok("GET", "/audit", params={"limit": 1000})
    # filters stay on every page, and in the Link
    users = [r for page in walk(acme.http, "/audit", action="user.create") for r in page]
    assert ids(users) == [r["id"] for r in whole if r["action"] == "user.create"]
    # after_id (the older style) still pages, and the cursor of its answer continues it
    r = acme.http.get("/audit", params={"after_id": whole[1]["id"], "limit": 2})
    assert ids(r.json()) == ids(whole[2:4])
    link = r.headers["link"]
    assert "after_id" not in link
    nxt = acme.http.get("/audit", params={"cursor": r.headers["x-next-cursor"], "limit": 2})
    assert ids(nxt.json()) == ids(whole[4:6])
    both = acme.http.get("/audit", params={"after_id": 1, "cursor": r.headers["x-next-cursor"]})
    assert_error(both, 422, "invalid_request")


def test_bad_limits_and_cursors_are_422_with_our_error_body(
    server: LiveServer, make_org: Any
) -> None:
    acme: Org = make_org("Acme")
    for path in ("/agents", "/users", "/threads", "/audit", "/teams"):
        for limit in (0, 1001, -1):
            assert_error(acme.http.get(path, params={"limit": limit}), 422, "invalid_request")
        wrong_shape = encode_cursor(["2026", "agt_x"]) if path == "/audit" else encode_cursor([1])
        for cursor in ("not base64!", "e30", wrong_shape, encode_cursor(["a", "b", "c"])):
            error = assert_error(
                acme.http.get(path, params={"cursor": cursor}), 422, "invalid_request"
            )
            assert "cursor" in error["message"]


def test_the_sdk_follows_the_cursor_to_the_last_page(server: LiveServer, make_org: Any) -> None:
    acme: Org = make_org("Acme")
    made = [acme.user(f"P{i}")["id"] for i in range(5)]
    team = acme.team("T", *(("user", u) for u in made))

    async def scenario() -> None:
        async with AsyncClient(server.url, acme.key) as client:
            client.page_limit = 2  # 3 pages of users, 3 of members
            assert [u.id for u in await client.users.list()] == made
            assert sorted(m.id for m in await client.teams.members(team["id"])) == sorted(made)
            raw = await client.request_all("/users", params={"limit": 1})
            assert [u["id"] for u in raw] == made

    anyio.run(scenario)
    with Client(server.url, acme.key) as blocking:  # the blocking client wraps the same calls
        assert [u.id for u in blocking.users.list()] == made


def test_the_sdk_audit_list_follows_the_cursor_and_keeps_after_id(
    server: LiveServer, make_org: Any
) -> None:
    """``client.audit.list`` walks every page (it used to return the first 100 records, one
    request with ``after_id``); ``after_id`` still resumes and ``limit`` caps across pages."""
    acme: Org = make_org("Acme")
    for i in range(101):
        acme.ok("POST", "/users", json={"name": f"P{i}"})
    whole = ids(acme.ok("GET", "/audit", params={"limit": 1000}))
    assert len(whole) > 101
    made = ids(acme.ok("GET", "/audit", params={"limit": 1000, "action": "user.create"}))

    async def scenario() -> None:
        async with AsyncClient(server.url, acme.key) as client:
            assert [r.id for r in await client.audit.list()] == whole
            client.page_limit = 7  # many pages: the cursor, not after_id, after the first
            assert [r.id for r in await client.audit.list(action="user.create")] == made
            assert [r.id for r in await client.audit.list(after_id=whole[1])] == whole[2:]
            capped = await client.audit.list(after_id=whole[1], limit=9)
            assert [r.id for r in capped] == whole[2:11]
            with pytest.raises(ValueError, match="limit"):
                await client.audit.list(limit=0)

    anyio.run(scenario)
    with Client(server.url, acme.key) as blocking:
        assert [r.id for r in blocking.audit.list(after_id=whole[0])] == whole[1:]


# ----------------------------------------------------------------------- the keyset itself

KEYS = st.lists(
    st.tuples(st.sampled_from(["2026-01-01", "2026-01-02", "2026-01-03"]), st.uuids()),
    min_size=0,
    max_size=25,
    unique_by=lambda k: k[1],
)


@contextlib.contextmanager
def _sqlite_rows(keys: list[tuple[str, Any]]) -> Iterator[tuple[sa.Engine, sa.Table]]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{Path(tmp) / 'k.db'}")
        meta = sa.MetaData()
        table = sa.Table(
            "items",
            meta,
            sa.Column("id", sa.String, primary_key=True),
            sa.Column("created_at", sa.String, nullable=False),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            if keys:
                conn.execute(table.insert(), [{"id": str(u), "created_at": c} for c, u in keys])
        try:
            yield engine, table
        finally:
            engine.dispose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=KEYS, limit=st.integers(min_value=1, max_value=6))
def test_keyset_walk_returns_every_row_once_in_order(
    keys: list[tuple[str, Any]], limit: int
) -> None:
    expected = sorted((c, str(u)) for c, u in keys)
    with _sqlite_rows(keys) as (engine, table):
        seen: list[tuple[str, str]] = []
        after: tuple[Any, ...] | None = None
        while True:
            q = keyset(sa.select(table), (table.c.created_at, table.c.id), after, limit)
            with engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(q).mappings()]
            assert len(rows) <= limit + 1
            page = rows[:limit]
            seen += [(r["created_at"], r["id"]) for r in page]
            if len(rows) <= limit:
                break
            # the cursor travels as the API sends it
            after = decode_cursor(encode_cursor(BY_CREATED.of(page[-1])), BY_CREATED)
    assert seen == expected
    # the in-memory variant pages the same way
    items = [{"created_at": c, "id": i} for c, i in expected]
    mem: list[tuple[str, str]] = []
    after = None
    while True:
        rows = keyset_in_memory(items, BY_CREATED.of, after, limit)
        mem += [BY_CREATED.of(r) for r in rows[:limit]]
        if len(rows) <= limit:
            break
        after = BY_CREATED.of(rows[limit - 1])
    assert mem == expected


@given(st.lists(st.text(max_size=30), min_size=2, max_size=2))
def test_a_cursor_round_trips_and_garbage_never_passes(key: list[str]) -> None:
    assert decode_cursor(encode_cursor(key), BY_CREATED) == tuple(key)
    with pytest.raises(InvalidRequestError):
        decode_cursor(encode_cursor([*key, "x"]), BY_CREATED)
    with pytest.raises(InvalidRequestError):
        decode_cursor(encode_cursor([1, 2]), BY_CREATED)
