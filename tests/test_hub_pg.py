"""Several hubs on one PostgreSQL database, in one process (each with its own engine, as separate
server processes have): concurrent appends to the same threads keep seqs contiguous and unique,
idempotency keys hold across hubs, subscribers of every hub see every envelope once and in
order, long-polls wake, sweeps fire once, and a lost LISTEN connection is caught up from the WAL.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from agent_network.hub import Hub, Subscription
from agent_network.model.envelope import Envelope, Sender
from agent_network.model.ids import new_id
from agent_network.protocol import thread_created_data
from agent_network.protocol.events import (
    EV_MESSAGE,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_CREATED,
)
from agent_network.protocol.fold import fold
from agent_network.protocol.knobs import epoch
from agent_network.store.engine import create_engine, database_url
from agent_network.store.wal import LISTEN_APP

ORG = "org_hubpg"
SYSTEM = Sender("system", "key_test", ORG)
ALICE = Sender("agent", "agt_alice", ORG)
BOB = Sender("agent", "agt_bob", ORG)
USER = Sender("user", "usr_pg", ORG)


@contextlib.asynccontextmanager
async def hubs(url: str, n: int) -> AsyncIterator[list[Hub]]:
    """``n`` hubs on the database ``url``, each on its own engine (like separate servers)."""
    engines = [create_engine(database_url(url)) for _ in range(n)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(Hub.open(e, sweep_interval=None)) for e in engines
            ]
    finally:
        for e in engines:
            await e.dispose()


async def create_thread(hub: Hub, tid: str | None = None, **knobs: Any) -> tuple[str, Envelope]:
    tid = tid or new_id("thr")
    if knobs:
        data = {
            "title": "t",
            "team_id": "team_x",
            **thread_created_data(
                "conversation", [("agent", ALICE.id), ("agent", BOB.id)], **knobs
            ),
        }
    else:
        data = {"title": "t", "team_id": "team_x", "adapter": "open"}
    return tid, await hub.append(tid, type=EV_THREAD_CREATED, data=data, sender=SYSTEM)


async def say(hub: Hub, tid: str, content: str, key: str | None = None) -> Envelope:
    return await hub.append(
        tid, type=EV_MESSAGE, data={"content": content}, sender=USER, idempotency_key=key
    )


async def drain(sub: Subscription, want: int, seconds: float = 20) -> list[Envelope]:
    """What ``sub`` delivers until ``want`` envelopes arrived (or ``seconds`` passed)."""
    got: list[Envelope] = []
    with anyio.move_on_after(seconds):
        while len(got) < want:
            batch = await sub.receive_batch()
            if not batch:
                break
            got.extend(batch)
    return got


async def drain_to(sub: Subscription, last_seq: int, seconds: float = 20) -> list[Envelope]:
    """What ``sub`` (following one thread) delivers until seq ``last_seq`` arrived."""
    got: list[Envelope] = []
    with anyio.move_on_after(seconds):
        while not got or got[-1].seq < last_seq:
            batch = await sub.receive_batch()
            if not batch:
                break
            got.extend(batch)
    return got


def assert_seen_in_order(got: list[Envelope], stored: dict[str, list[Envelope]]) -> None:
    """``got`` holds every stored envelope exactly once and each thread's in seq order."""
    by_thread: dict[str, list[Envelope]] = {}
    for env in got:
        by_thread.setdefault(env.thread_id, []).append(env)
    assert set(by_thread) == set(stored)
    for tid, envs in stored.items():
        assert [e.seq for e in by_thread[tid]] == [e.seq for e in envs], tid
        assert [e.hash for e in by_thread[tid]] == [e.hash for e in envs], tid


# one op: (hub index, thread index, idempotency key index or None)
OPS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 3))),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_concurrent_appends_from_several_hubs(pg_db: str, ops: list[Any], seed: int) -> None:
    """Random concurrent appends through three hubs to three threads: every thread's seqs are
    1..n without a gap or duplicate, each idempotency key is stored once and every append with
    it got that one envelope back, every chain verifies and every hub's state is the fold."""

    async def run() -> None:
        async with hubs(pg_db, 3) as hs:
            tids = [(await create_thread(hs[i]))[0] for i in range(3)]
            for h in hs:  # every hub caches every thread: the caches go stale below
                for tid in tids:
                    await h.state(tid)
            results: list[tuple[Any, Envelope]] = []
            rnd = random.Random(seed)

            async def one(op: Any) -> None:
                await anyio.sleep(rnd.random() * 0.01)
                h, t, k = op
                key = None if k is None else f"k{k}"
                results.append((op, await say(hs[h], tids[t], f"m{len(results)}", key)))

            async with anyio.create_task_group() as tg:
                for op in ops:
                    tg.start_soon(one, op)
            for t, tid in enumerate(tids):
                stored = await hs[0].read(tid)
                assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
                mine = [(op, env) for op, env in results if op[1] == t]
                keyed: dict[int, set[str]] = {}
                for op, env in mine:
                    assert env in stored
                    if op[2] is not None:
                        keyed.setdefault(op[2], set()).add(env.id)
                assert all(len(ids) == 1 for ids in keyed.values()), keyed
                unkeyed = sum(1 for op, _ in mine if op[2] is None)
                assert len(stored) == 1 + unkeyed + len(keyed)
                for h in hs:
                    assert (await h.verify(tid)).ok
                    assert await h.fresh_state(tid) == fold(tid, stored)

    anyio.run(run)


@pytest.mark.anyio
async def test_a_stale_cache_is_caught_up_and_keys_hold_across_hubs(pg_db: str) -> None:
    async with hubs(pg_db, 2) as (a, b):
        tid, _ = await create_thread(a)
        await b.state(tid)  # b caches seq 1
        first = await say(a, tid, "one", key="same")
        await say(a, tid, "two")
        third = await say(b, tid, "three")  # b's fold was at seq 1: caught up under the lock
        assert third.seq == 4 and third.prev_hash == (await a.read(tid))[2].hash
        again = await say(b, tid, "one again", key="same")  # the key was used on a
        assert again == first
        assert [e.seq for e in await a.read(tid)] == [1, 2, 3, 4]
        assert (await b.verify(tid)).ok


@pytest.mark.anyio
async def test_subscribers_of_every_hub_see_every_envelope_once_in_order(pg_db: str) -> None:
    async with hubs(pg_db, 3) as hs:
        everything = [h.subscribe() for h in hs]
        tids = [(await create_thread(hs[i]))[0] for i in range(2)]
        followers = [h.subscribe({tids[0]}) for h in hs]

        async def post(i: int) -> None:
            for n in range(15):
                await say(hs[(i + n) % 3], tids[n % 2], f"p{i}-{n}")

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(post, i)
        stored = {tid: await hs[0].read(tid) for tid in tids}
        total = sum(len(v) for v in stored.values())
        for sub in everything:
            assert_seen_in_order(await drain(sub, total), stored)
        for sub in followers:
            # subscribed after thread 0 was created: everything after its creation, and on a
            # hub that learnt of the creation only after the subscription, the creation too
            # (a subscription starts when the commit's notification arrives)
            got = await drain_to(sub, len(stored[tids[0]]))
            first = got[0].seq
            assert first in (1, 2)
            assert_seen_in_order(got, {tids[0]: stored[tids[0]][first - 1 :]})
        for h in hs:
            for tid in tids:  # the notified hubs stepped their cached states too
                assert await h.wait_for(tid, len(stored[tid]) - 1, 10)
                assert await h.state(tid) == fold(tid, stored[tid])


@pytest.mark.anyio
async def test_a_long_poll_on_one_hub_wakes_for_a_post_on_another(pg_db: str) -> None:
    async with hubs(pg_db, 2) as (a, b):
        tid, _ = await create_thread(a)
        await b.state(tid)
        woke: list[bool] = []

        async def wait() -> None:
            woke.append(await b.wait_for(tid, 1, 20))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.2)
            await say(a, tid, "wake up")
        assert woke == [True]
        assert (await b.state(tid)).last_seq == 2


@pytest.mark.anyio
async def test_a_deadline_fires_once_when_every_hub_sweeps(pg_db: str) -> None:
    async with hubs(pg_db, 3) as hs:
        expected = [EV_THREAD_CREATED, EV_THREAD_CLOSING, EV_THREAD_CLOSED]
        # one hub sweeps first; the others still hold the open thread in their caches
        tid, created = await create_thread(hs[0], ttl=3600)
        for h in hs:
            await h.state(tid)
        now = epoch(created.created_at) + 3600
        assert [e.type for e in await hs[0].sweep(now)] == expected[1:]
        for h in hs[1:]:
            assert await h.sweep(now) == []  # they see it done: nothing written, nothing returned
        assert [e.type for e in await hs[0].read(tid)] == expected
        # all three sweep at the same moment: still one closing and one closed
        tid, created = await create_thread(hs[1], ttl=3600)
        for h in hs:
            await h.state(tid)
        now = epoch(created.created_at) + 3600
        async with anyio.create_task_group() as tg:
            for h in hs:
                tg.start_soon(h.sweep, now)
        assert [e.type for e in await hs[2].read(tid)] == expected
        for h in hs:
            assert await h.sweep(now + 10) == []


@pytest.mark.anyio
async def test_a_lost_listen_connection_is_caught_up_from_the_wal(pg_db: str) -> None:
    async with hubs(pg_db, 2) as (a, b):
        sub = b.subscribe({tid := new_id("thr")})
        await create_thread(a, tid)
        engine = create_engine(database_url(pg_db))
        try:
            async with engine.connect() as conn:
                killed = (
                    await conn.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = :app AND datname = current_database()"
                        ),
                        {"app": LISTEN_APP},
                    )
                ).scalar_one()
                await conn.commit()
        finally:
            await engine.dispose()
        assert killed == 2
        posted = [await say(a, tid, f"while b is deaf {i}") for i in range(5)]
        got = await drain(sub, 6)
        assert [e.seq for e in got] == [1, *(e.seq for e in posted)]
        assert await b.wait_for(tid, 5, 10)
        assert await b.state(tid) == fold(tid, await a.read(tid))
