"""The one cursor table (store/cursors.py): runner and realtime consumers share its rows and its
``advance_cursor``; a cursor only moves forward and never disturbs another one."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_network.store.cursors import (
    RUNNER_CURSOR,
    advance_cursor,
    advance_cursors,
    all_cursors,
    ensure_cursor,
    read_cursor,
)
from agent_network.store.engine import create_engine, database_url, write_transaction
from agent_network.store.tables import cursors
from conftest import TestDb

pytestmark = pytest.mark.engines("sqlite", "postgresql")

SUBSCRIBERS = ["agt_bot", "usr_ann"]
NAMES = [RUNNER_CURSOR, "hubclient"]
THREADS = ["thr_1", "thr_2"]

step = st.tuples(
    st.sampled_from(["advance", "ensure"]),
    st.sampled_from(SUBSCRIBERS),
    st.sampled_from(NAMES),
    st.sampled_from(THREADS),
    st.integers(min_value=0, max_value=20),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=st.lists(step, max_size=25))
def test_cursors_move_forward_only_and_independently(
    plan: list[tuple[str, str, str, str, int]], module_db: TestDb
) -> None:
    """Whatever the order of advances and ensures: each cursor holds the highest seq advanced to
    (or the first seq ensured, if only ensured), ``advance_cursor`` returns it, and
    ``all_cursors(name)`` lists exactly the cursors of that name."""
    expected: dict[tuple[str, str, str], int] = {}

    async def run() -> None:
        engine = create_engine(database_url(module_db))
        try:
            async with write_transaction(engine) as conn:  # each example starts with none
                await conn.execute(cursors.delete())
            for op, subscriber, name, thread, seq in plan:
                key = (subscriber, name, thread)
                async with write_transaction(engine) as conn:
                    if op == "advance":
                        expected[key] = max(expected.get(key, seq), seq)
                        got = await advance_cursor(conn, subscriber, name, thread, seq)
                        assert got == expected[key]
                    else:
                        expected.setdefault(key, seq)
                        await ensure_cursor(conn, subscriber, name, thread, seq)
            async with engine.connect() as conn:
                for s in SUBSCRIBERS:
                    for n in NAMES:
                        for t in THREADS:
                            assert await read_cursor(conn, s, n, t) == expected.get((s, n, t), 0)
                for n in NAMES:
                    listed = sorted(await all_cursors(conn, n))
                    assert listed == sorted(
                        (s, t, seq) for (s, n2, t), seq in expected.items() if n2 == n
                    )
        finally:
            await engine.dispose()

    anyio.run(run)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batches=st.lists(
        st.tuples(
            st.sampled_from(SUBSCRIBERS),
            st.sampled_from(NAMES),
            st.dictionaries(st.sampled_from(THREADS), st.integers(min_value=0, max_value=20)),
        ),
        max_size=15,
    )
)
def test_batched_advances_move_each_cursor_as_one_by_one(
    batches: list[tuple[str, str, dict[str, int]]], module_db: TestDb
) -> None:
    """``advance_cursors`` (a hub client's batched acks, one statement) leaves every cursor
    where ``advance_cursor`` thread by thread would: the highest seq given, never back."""
    expected: dict[tuple[str, str, str], int] = {}

    async def run() -> None:
        engine = create_engine(database_url(module_db))
        try:
            async with write_transaction(engine) as conn:
                await conn.execute(cursors.delete())
            for subscriber, name, positions in batches:
                for thread, seq in positions.items():
                    key = (subscriber, name, thread)
                    expected[key] = max(expected.get(key, seq), seq)
                async with write_transaction(engine) as conn:
                    await advance_cursors(conn, subscriber, name, positions)
            async with engine.connect() as conn:
                for n in NAMES:
                    listed = sorted(await all_cursors(conn, n))
                    assert listed == sorted(
                        (s, t, seq) for (s, n2, t), seq in expected.items() if n2 == n
                    )
        finally:
            await engine.dispose()

    anyio.run(run)
