"""State shared by several server processes on one PostgreSQL database.

Two app instances (two live uvicorn servers, or two engines with their own services) over ONE
``pg_db`` stand for two server processes behind a load balancer:

- rate limits hold across them (the join limit, an agent's rule rate, the limiter itself under
  concurrent attempts);
- a grant revoked through one is refused by the other within the post-decision cache's bound
  (``DECISION_TTL``), and nothing revoked is served past it;
- runner claims raced from two connections give every trigger to exactly one runner, with no
  deadlock, and leases are honoured.

PostgreSQL only: on SQLite one process keeps these in memory (tests/test_networks_trust.py,
tests/test_post_cache.py cover that engine).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from agent_network.services.cache import DECISION_TTL, DecisionCache
from agent_network.services.networks import JOIN_LIMIT
from agent_network.services.ratelimit import (
    SharedWindowLimiter,
    SlidingWindowLimiter,
    rate_limiter,
)
from agent_network.store.claims import complete_claim, stored_claim, try_claim
from agent_network.store.engine import create_engine, database_url, write_transaction
from agent_network.store.tables import rate_hits, runner_claims
from conftest import LiveServer, Org, assert_error, open_network


@pytest.fixture
def two_servers(pg_db: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two live servers ("processes") over one PostgreSQL database, sharing the secret key."""
    key = Fernet.generate_key().decode()
    first, second = LiveServer(pg_db, secret_key=key), LiveServer(pg_db, secret_key=key)
    first.start()
    second.start()
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def as_org_on(srv: LiveServer, org: Org) -> Any:
    """A client of ``org`` talking to ``srv`` (the same org, another process)."""
    return srv.client(org.key)


# ----------------------------------------------------------------------------- rate limits


def test_concurrent_attempts_on_two_engines_admit_exactly_the_limit(pg_db: str) -> None:
    """40 attempts at once through two limiters on two engines: exactly ``limit`` admitted; an
    attempt naming two keys counts against both or neither."""

    async def run() -> tuple[int, int, float, int, int]:
        engines = [create_engine(database_url(pg_db)) for _ in range(2)]
        try:
            limiters = [SharedWindowLimiter(e, "test", 7, 60.0) for e in engines]
            waits: list[float] = []

            async def attempt(i: int) -> None:
                waits.append(await limiters[i % 2].wait_for(("org", "o1")))

            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(attempt, i)
            admitted = sum(1 for w in waits if w == 0)
            refused_wait = max(waits)
            # two keys: "c1" is full after 2, so the third attempt naming c1 and c2 is refused
            # and c2 is not counted
            pair = SharedWindowLimiter(engines[0], "pair", 2, 60.0)
            assert await pair.wait_for("c1") == 0 and await pair.wait_for("c1") == 0
            assert await pair.wait_for("c1", "c2") > 0
            c2 = await limiters[1].count("c2") + await pair.count("c2")
            async with engines[1].connect() as conn:
                rows = (
                    await conn.execute(select(func.count()).where(rate_hits.c.scope == "test"))
                ).scalar_one()
            return admitted, len(waits), refused_wait, c2, int(rows)
        finally:
            for e in engines:
                await e.dispose()

    admitted, attempts, refused_wait, c2, rows = anyio.run(run)
    assert attempts == 40 and admitted == 7 and rows == 7
    assert 0 < refused_wait <= 60.0
    assert c2 == 0


_steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.99, 2.0, 2.01, 3.0]),  # seconds since last step
        st.sets(st.sampled_from(["a", "b", ("org", "c")]), min_size=1, max_size=3),
        st.integers(min_value=0, max_value=3),  # the limit given to this attempt
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=_steps)
def test_shared_limiter_decides_like_the_in_process_one(
    pg_db: str, steps: list[tuple[float, set[Any], int]]
) -> None:
    """Model check: for any sequence of attempts (times, key sets, per-call limits), the
    PostgreSQL limiter admits, refuses and names the same wait as the in-process sliding log
    (the reference), both on one injected clock; so at most ``limit`` attempts per key are ever
    admitted in any window, all keys of an attempt are counted or none."""

    async def run() -> None:
        engine = create_engine(database_url(pg_db))
        now = [1_000.0]
        try:
            shared = SharedWindowLimiter(
                engine, f"model-{uuid.uuid4().hex}", 2, 2.0, clock=lambda: now[0]
            )
            model = SlidingWindowLimiter(2, 2.0, clock=lambda: now[0])
            for dt, keys, cap in steps:
                now[0] += dt
                expected = model.acquire(*keys, limit=cap)
                got = await shared.wait_for(*keys, limit=cap)
                assert got == pytest.approx(expected, abs=1e-9), (dt, keys, cap)
        finally:
            await engine.dispose()

    anyio.run(run)


def test_rate_limiter_picks_the_shared_one_on_postgresql(pg_db: str, db: Any) -> None:
    async def kinds() -> tuple[str, str]:
        pg, lite = create_engine(database_url(pg_db)), create_engine(database_url(db))
        try:
            return (
                type(rate_limiter(pg, "x", 1, 1.0)).__name__,
                type(rate_limiter(lite, "x", 1, 1.0)).__name__,
            )
        finally:
            await pg.dispose()
            await lite.dispose()

    assert anyio.run(kinds) == ("SharedWindowLimiter", "SlidingWindowLimiter")


def test_join_attempts_through_two_servers_share_one_limit(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    """Wrong join codes sent alternately to two servers: ``JOIN_LIMIT`` get an answer about the
    code, every further attempt is refused with 429 by whichever server it reaches; a reset
    through one server frees the other too."""
    first, second = two_servers
    org = Org(first, "Guesser")
    clients = [as_org_on(first, org), as_org_on(second, org)]
    try:
        statuses = [
            clients[i % 2].post("/networks/join", json={"code": f"WRONG-{i:04d}"}).status_code
            for i in range(2 * JOIN_LIMIT + 4)
        ]
        # reset() from this (test) thread, through one server's limiter, frees both
        first.app.state.services.teams.join_limiter.reset()
        after = clients[1].post("/networks/join", json={"code": "WRONG-AFTER"}).status_code
    finally:
        for c in clients:
            c.close()
        org.http.close()
    assert statuses.count(429) == JOIN_LIMIT + 4, statuses
    assert 429 not in statuses[:JOIN_LIMIT], statuses
    assert after == 404


def test_an_agents_rate_holds_across_two_servers(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    """An agent whose rule allows 3 messages a minute posts alternately through two servers:
    3 are stored, the rest are refused by the rule, whichever server they reach."""
    first, second = two_servers
    org = Org(first, "Rated")
    scout = org.agent("scout", "scout-rate")
    team = org.team("team", ("agent", scout["id"]))
    thread = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
    org.ok("PUT", f"/agents/{scout['id']}/rule", json={"rate": {"messages": 3, "per_seconds": 60}})
    clients = [as_org_on(first, org), as_org_on(second, org)]
    try:
        statuses = [
            clients[i % 2]
            .post(
                f"/threads/{thread}/messages",
                json={"content": f"m{i}", "agent_id": scout["id"]},
            )
            .status_code
            for i in range(8)
        ]
        stored = org.ok("GET", f"/threads/{thread}/messages", params={"limit": 100})["items"]
    finally:
        for c in clients:
            c.close()
        org.http.close()
    assert statuses.count(201) == 3, statuses
    assert [m["content"] for m in stored] == ["m0", "m1", "m2"]


# ----------------------------------------------------------------------------- decision cache


def test_a_cached_decision_expires_ttl_after_its_read_began() -> None:
    """The staleness bound counts from the start of the read (the miss), not from the put: a
    decision whose read took 0.6 s is served for the remaining 0.4 s only."""
    now = [10.0]
    cache: DecisionCache[str] = DecisionCache(ttl=1.0, clock=lambda: now[0])
    assert cache.get("k", (0, 0)) is None  # the read begins
    now[0] += 0.6  # ... a slow read; meanwhile another process commits a revocation
    cache.put("k", "grant", (0, 0))
    now[0] += 0.39
    assert cache.get("k", (0, 0)) == "grant"
    now[0] += 0.02
    assert cache.get("k", (0, 0)) is None  # 1.01 s after the read began
    cache.put("k", "grant", (0, 0))  # no miss before: counts from now
    now[0] += 0.99
    assert cache.get("k", (0, 0)) == "grant"


def test_a_visa_revoked_on_one_server_is_refused_by_the_other_within_the_bound(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    """Bob (org B) posts through server 2 (his grant is now cached there); org A revokes his
    org's visa through server 1. Once ``DECISION_TTL`` has passed since the revocation was
    acknowledged, server 2 refuses him — and every post server 2 accepted is older."""
    first, second = two_servers
    for srv in two_servers:
        srv.app.state.services.teams.join_limit = 1_000_000
    a, b = Org(first, "Host"), Org(first, "Guest")
    alice, bob = a.user("alice"), b.user("bob")
    net = open_network(a, {b: [("user", bob["id"])]}, ("user", alice["id"]))
    thread = a.ok("POST", f"/networks/{net['id']}/threads", json={"title": "t"})["id"]
    bob_on_second = as_org_on(second, b)
    try:
        for i in range(2):
            r = bob_on_second.post(
                f"/threads/{thread}/messages", json={"content": f"b{i}", "user_id": bob["id"]}
            )
            assert r.status_code == 201, r.text
        assert second.app.state.services.threads.grants.hits >= 1  # served from its cache
        (visa,) = [v for v in a.ok("GET", f"/networks/{net['id']}/visas") if v["org_id"] == b.id]
        a.ok("DELETE", f"/networks/{net['id']}/visas/{visa['id']}")  # through server 1
        acknowledged = time.monotonic()
        time.sleep(DECISION_TTL)
        r = bob_on_second.post(
            f"/threads/{thread}/messages", json={"content": "late", "user_id": bob["id"]}
        )
        assert_error(r, 404, "not_found")
        assert time.monotonic() - acknowledged >= DECISION_TTL
        stored = a.ok("GET", f"/threads/{thread}/messages", params={"limit": 100})["items"]
        assert [m["content"] for m in stored if m["sender"]["id"] == bob["id"]] == ["b0", "b1"]
    finally:
        bob_on_second.close()
        a.http.close()
        b.http.close()


# ----------------------------------------------------------------------------- runner claims


def test_two_runners_race_for_many_triggers_on_one_database(pg_db: str) -> None:
    """Two runners, each with its own engine (connections), claim 150 triggers concurrently
    (8 workers each, in opposite orders, every trigger tried by both): each trigger is granted
    to one runner only, no deadlock or error, and each completes only what it holds."""
    triggers = [("agt_x", f"thr_{i % 5}", i) for i in range(150)]

    async def run() -> tuple[dict[tuple[str, str, int], list[str]], list[Any]]:
        engines = [create_engine(database_url(pg_db)) for _ in range(2)]
        granted: dict[tuple[str, str, int], list[str]] = {t: [] for t in triggers}
        refused: list[Any] = []
        try:

            async def worker(engine: Any, runner: str, todo: list[Any]) -> None:
                while todo:
                    agent_id, thread_id, seq = todo.pop()
                    now = time.time()
                    async with write_transaction(engine) as conn:
                        state = await try_claim(
                            conn,
                            agent_id=agent_id,
                            thread_id=thread_id,
                            trigger_seq=seq,
                            runner_id=runner,
                            lease_seconds=60,
                            now=now,
                        )
                    if state.outcome == "granted":
                        granted[(agent_id, thread_id, seq)].append(runner)
                        async with write_transaction(engine) as conn:
                            done = await complete_claim(
                                conn,
                                agent_id=agent_id,
                                thread_id=thread_id,
                                trigger_seq=seq,
                                runner_id=runner,
                                now=time.time(),
                            )
                        assert done.outcome == "done"
                    else:
                        refused.append(state)

            async with anyio.create_task_group() as tg:
                for n, engine in enumerate(engines):
                    runner = f"runner-{n}"
                    order = list(triggers) if n == 0 else list(reversed(triggers))
                    random.Random(n).shuffle(order)
                    for w in range(8):
                        tg.start_soon(worker, engine, runner, order[w::8])
            async with engines[0].connect() as conn:
                stored = (
                    await conn.execute(select(func.count()).where(runner_claims.c.done.is_(True)))
                ).scalar_one()
            assert stored == len(triggers)
            return granted, refused
        finally:
            for e in engines:
                await e.dispose()

    granted, refused = anyio.run(run)
    assert all(len(runners) == 1 for runners in granted.values()), granted
    assert len(refused) == len(triggers)  # every trigger was tried twice: one loss each
    assert all(s.outcome in ("held", "done") for s in refused)


def test_leases_are_honoured_across_connections(pg_db: str) -> None:
    """A live lease refuses another runner; an expired one is taken over; a done trigger is
    never taken again — each step from a different engine."""

    async def run() -> list[str]:
        one, two = create_engine(database_url(pg_db)), create_engine(database_url(pg_db))
        key = {"agent_id": "agt_l", "thread_id": "thr_l", "trigger_seq": 3}
        out = []
        try:
            t0 = 1_000_000.0
            async with write_transaction(one) as conn:
                s = await try_claim(conn, **key, runner_id="r1", lease_seconds=30, now=t0)
                out.append(s.outcome)
            async with write_transaction(two) as conn:
                s = await try_claim(conn, **key, runner_id="r2", lease_seconds=30, now=t0 + 29)
                out.append(f"{s.outcome}:{s.runner_id}")
                s = await complete_claim(conn, **key, runner_id="r2", now=t0 + 29)
                out.append(f"{s.outcome}:{s.runner_id}")
            async with write_transaction(two) as conn:
                s = await try_claim(conn, **key, runner_id="r2", lease_seconds=30, now=t0 + 31)
                out.append(f"{s.outcome}:{s.runner_id}")
            async with write_transaction(one) as conn:
                s = await complete_claim(conn, **key, runner_id="r1", now=t0 + 32)
                out.append(f"{s.outcome}:{s.runner_id}")  # r1 lost its lease to r2
                s = await complete_claim(conn, **key, runner_id="r2", now=t0 + 32)
                out.append(s.outcome)
            async with one.connect() as conn:
                final = await stored_claim(conn, "agt_l", "thr_l", 3)
            async with write_transaction(two) as conn:
                s = await try_claim(conn, **key, runner_id="r3", lease_seconds=30, now=t0 + 99)
                out.append(s.outcome)
            assert final is not None and final.outcome == "done"
            return out
        finally:
            await one.dispose()
            await two.dispose()

    assert anyio.run(run) == [
        "granted",
        "held:r1",
        "held:r1",
        "granted:r2",
        "held:r2",
        "done",
        "done",
    ]
