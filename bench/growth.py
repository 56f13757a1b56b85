"""Cost as the work grows (issue 16, "cost must not grow with the number of threads"): the post
rate over many threads, a page read against its size, a cold fold, start-up and bytes per
envelope. Prints figures as ratios against baselines measured in the same run; never asserts.

Run:  .venv/bin/python bench/growth.py [--quick] [--db sqlite|postgresql] [--posts 4000] [--json]

Phases (each on a fresh database: a SQLite file with the project's durable settings, or with
``--db postgresql`` a database on a private cluster started by ``tests/pgcluster.py`` as
``bench/scale.py`` does):

1. **posts over threads**: an org key posts as its user through ``ThreadService.post`` in this
   process, ``--concurrency`` (64) posts in flight, round robin over 1, 100, 1,000 and 10,000
   (not with ``--quick``) threads of one team. Every thread gets one untimed post first (its
   fold is in memory, as for an active thread); then ``--posts`` posts are timed. posts/s, CPU
   ms/post (this process, every thread) and the ratio to the 1-thread rate. Targets: >= 0.8 at
   1,000 threads, >= 0.5 at 10,000.
2. **page reads**: ``ThreadService.envelopes`` of one thread of 1,000 messages, pages of 1, 10,
   100 and 1,000, one read at a time. ms per read; the fixed part is the 1-row page, the rest
   is per row. Target: fixed part < 1 ms.
3. **cold fold**: a thread of ``--fold-size`` messages (100,000; 10,000 with ``--quick``); the
   hub is closed and opened again (a restart), then the first post into that thread is timed,
   and, again after a restart, ``Hub.state`` alone. Target: first post < 50 ms.
4. **start-up**: ``python -c "import agent_network.api"`` against ``python -c pass`` (best of
   3), and a server process (``bench/_server.py``: ``create_app`` + uvicorn) from spawn to a
   served ``/health``. Target: < 1 s.
5. **bytes per envelope**: after phase 1, the database size (SQLite: used pages; PostgreSQL:
   every table with its indexes and TOAST) divided by the envelopes stored, audit rows and
   indexes included; also the audit rows per envelope.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _server import ServerProcess, bootstrap, cpu_seconds  # noqa: E402
from agent_network.config import Settings  # noqa: E402
from agent_network.hub import Hub  # noqa: E402
from agent_network.services import ServiceContext, Services  # noqa: E402
from agent_network.services.principal import Principal  # noqa: E402
from agent_network.store.engine import create_engine, database_url  # noqa: E402

TARGET_1K = 0.8  # posts/s at 1,000 threads / at 1 thread
TARGET_10K = 0.5  # posts/s at 10,000 threads / at 1 thread
TARGET_PAGE_MS = 1.0  # fixed cost of a page read
TARGET_FOLD_MS = 50.0  # first post into a large thread after a restart
TARGET_START_S = 1.0  # process start to a served /health
CONTENT = "a message of about one hundred characters, like a short chat line between two agents"
KEYS: dict[str, tuple[str, str, str]] = {}  # database url -> (org key, user id, team id)


@dataclass
class World:
    svc: Services
    hub: Hub
    org: Principal
    user_id: str
    team_id: str


class Databases:
    """Fresh databases of one engine: SQLite files in ``work`` or databases on a private
    PostgreSQL cluster (migrated, each with a platform admin key)."""

    def __init__(self, engine: str, work: Path) -> None:
        self.engine = engine
        self.work = work
        self.count = itertools.count()
        self.cluster: Any = None

    def start(self) -> str:
        if self.engine == "sqlite":
            return "SQLite files (durable settings)"
        from pgcluster import PgCluster  # type: ignore[import-not-found]

        self.cluster = PgCluster()
        return f"{self.cluster.start()} (synchronous_commit=on, fsync=on)"

    async def fresh(self) -> tuple[str, str]:
        """(url, admin key) of a fresh migrated database."""
        n = next(self.count)
        if self.engine == "sqlite":
            url = str(self.work / f"growth{n}.db")
        else:
            url = str(self.cluster.create_database(f"an_growth{n}"))
        return url, await bootstrap(Path(url) if self.engine == "sqlite" else url)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.cluster is not None and self.cluster._owned:
            self.cluster.stop()


@asynccontextmanager
async def world(url: str, admin_key: str, *, setup: bool = True) -> AsyncIterator[World]:
    """Services over ``url`` in this process; with ``setup`` a new org with a user in a team
    (else the first org's, found again: after a restart)."""
    engine = create_engine(database_url(url))
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            ctx = ServiceContext(engine, hub, Settings(database=url, model="test"))
            svc = Services.create(ctx)
            admin = await svc.orgs.authenticate(admin_key)
            if setup:
                created = await svc.orgs.create_org(admin, "growth org")
                org = await svc.orgs.authenticate(created["secret"])
                user = await svc.orgs.create_user(org, "growth user", None)
                team = await svc.teams.create(org, "team", "growth team")
                await svc.teams.add_member(org, "team", team["id"], user_id=user["id"])
                KEYS[url] = (created["secret"], user["id"], team["id"])
            key, user_id, team_id = KEYS[url]
            org = await svc.orgs.authenticate(key)
            yield World(svc, hub, org, user_id, team_id)
    finally:
        await engine.dispose()


async def drive(n: int, concurrency: int, post: Callable[[int], Awaitable[Any]]) -> float:
    """Run ``post(i)`` for i in range(n), ``concurrency`` at a time; the wall seconds. The
    first error is raised (a benchmark of refusals measures nothing)."""
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < n:
            await post(i)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - t0


async def new_threads(w: World, n: int, concurrency: int) -> list[str]:
    ids: list[str] = [""] * n

    async def make(i: int) -> None:
        ids[i] = (await w.svc.threads.create(w.org, w.team_id, f"growth {i}"))["id"]

    await drive(n, min(concurrency, 16), make)
    return ids


# ------------------------------------------------------------------ 1 and 5: posts, bytes


async def posts_phase(
    dbs: Databases, counts: list[int], posts: int, concurrency: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for count in counts:
        url, key = await dbs.fresh()
        async with world(url, key) as w:
            tids = await new_threads(w, count, concurrency)

            def post(i: int, tids: list[str] = tids, count: int = count) -> Awaitable[Any]:
                return w.svc.threads.post(
                    w.org, tids[i % count], f"{i} {CONTENT}", user_id=w.user_id
                )

            await drive(max(count, min(posts, 200)), concurrency, post)  # one post per thread
            cpu0 = cpu_seconds()
            wall = await drive(posts, concurrency, post)
            cpu = cpu_seconds() - cpu0
            grants = w.svc.threads.grants
            size = await bytes_per_envelope(w)
        row = {
            "threads": count,
            "posts": posts,
            "posts_per_s": posts / wall,
            "cpu_ms_per_post": 1000 * cpu / posts,
            "grant_hits": grants.hits,
            "grant_stores": grants.stores,
            **size,
        }
        rows.append(row)
        print(
            f"   {count:>7,} {row['posts_per_s']:>9,.0f} {row['cpu_ms_per_post']:>12.3f} "
            f"{row['posts_per_s'] / rows[0]['posts_per_s']:>10.2f} "
            f"{grants.stores:>8,} {size['bytes_per_envelope']:>10,.0f}"
        )
    return rows


async def bytes_per_envelope(w: World) -> dict[str, float]:
    """Database size / envelopes stored (audit rows and indexes included)."""
    engine = w.svc.threads.ctx.engine
    async with engine.connect() as conn:
        envelopes = (await conn.execute(text("SELECT count(*) FROM envelopes"))).scalar_one()
        audit = (await conn.execute(text("SELECT count(*) FROM audit_log"))).scalar_one()
        if engine.dialect.name == "sqlite":
            await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            pages = (await conn.execute(text("PRAGMA page_count"))).scalar_one()
            free = (await conn.execute(text("PRAGMA freelist_count"))).scalar_one()
            size = (await conn.execute(text("PRAGMA page_size"))).scalar_one()
            total = (pages - free) * size
        else:
            q = (
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = 'public'"
            )
            total = (await conn.execute(text(q))).scalar_one()
    return {
        "bytes_per_envelope": total / envelopes,
        "audit_per_envelope": audit / envelopes,
        "envelopes": envelopes,
    }


# ------------------------------------------------------------------ 2: page reads


async def page_phase(dbs: Databases, reads: int, concurrency: int) -> list[dict[str, Any]]:
    url, key = await dbs.fresh()
    rows: list[dict[str, Any]] = []
    async with world(url, key) as w:
        (tid,) = await new_threads(w, 1, 1)

        def post(i: int) -> Awaitable[Any]:
            return w.svc.threads.post(w.org, tid, f"{i} {CONTENT}", user_id=w.user_id)

        await drive(1000, concurrency, post)
        for limit in (1, 10, 100, 1000):
            n = max(5, reads // max(1, limit // 10))
            await w.svc.threads.envelopes(w.org, tid, limit=limit)  # warm
            t0 = time.perf_counter()
            for i in range(n):
                page = await w.svc.threads.envelopes(w.org, tid, limit=limit, after=i % 2)
            ms = 1000 * (time.perf_counter() - t0) / n
            rows.append({"limit": limit, "rows": len(page["items"]), "ms_per_read": ms})
    fixed = rows[0]["ms_per_read"]
    per_row = (rows[-1]["ms_per_read"] - fixed) / max(1, rows[-1]["rows"] - 1)
    for r in rows:
        print(f"   {r['limit']:>5} {r['rows']:>5} {r['ms_per_read']:>9.3f}")
    verdict = "PASS" if fixed < TARGET_PAGE_MS else "MISS"
    print(f"   fixed part (1-row page) {fixed:.3f} ms  < {TARGET_PAGE_MS:g}  {verdict}")
    print(f"   per row                 {1000 * per_row:.1f} us")
    return rows


# ------------------------------------------------------------------ 3: cold fold


async def fold_phase(dbs: Databases, size: int, concurrency: int) -> dict[str, float]:
    url, key = await dbs.fresh()
    async with world(url, key) as w:
        (tid,) = await new_threads(w, 1, 1)

        def post(i: int) -> Awaitable[Any]:
            return w.svc.threads.post(w.org, tid, f"{i} {CONTENT}", user_id=w.user_id)

        t_fill = await drive(size, concurrency, post)
    print(f"   filled {size:,} messages in {t_fill:.1f} s")
    async with world(url, key, setup=False) as w:  # a restart
        t0 = time.perf_counter()
        await w.svc.threads.post(w.org, tid, "first after restart", user_id=w.user_id)
        first = 1000 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        await w.svc.threads.post(w.org, tid, "second after restart", user_id=w.user_id)
        second = 1000 * (time.perf_counter() - t0)
    async with world(url, key, setup=False) as w:
        t0 = time.perf_counter()
        await w.hub.state(tid)
        state = 1000 * (time.perf_counter() - t0)
    verdict = "PASS" if first < TARGET_FOLD_MS else "MISS"
    print(f"   first post after restart  {first:>9.1f} ms  < {TARGET_FOLD_MS:g}  {verdict}")
    print(f"   second post               {second:>9.1f} ms")
    print(f"   Hub.state after restart   {state:>9.1f} ms")
    return {"size": size, "first_post_ms": first, "second_post_ms": second, "state_ms": state}


# ------------------------------------------------------------------ 4: start-up


def import_seconds(code: str, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def startup_phase(work: Path) -> dict[str, float]:
    bare = import_seconds("pass")
    api = import_seconds("import agent_network.api")
    (work / "start").mkdir()
    with ServerProcess(work / "start") as server:
        served = server.startup_s
    verdict = "PASS" if served < TARGET_START_S else "MISS"
    print(f"   python -c pass                   {bare:>7.3f} s")
    print(f"   import agent_network.api         {api:>7.3f} s  ({api - bare:.3f} s over bare)")
    print(f"   spawn -> served /health          {served:>7.3f} s  < {TARGET_START_S:g}  {verdict}")
    return {"bare_s": bare, "import_api_s": api, "health_s": served}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, no 10,000 threads")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--posts", type=int, default=4000, help="timed posts per thread count")
    parser.add_argument("--concurrency", type=int, default=64, help="posts in flight")
    parser.add_argument("--fold-size", type=int, default=100_000, help="messages, phase 3")
    parser.add_argument("--threads", help="comma-separated thread counts, phase 1")
    parser.add_argument("--phases", default="posts,pages,fold,start", help="comma-separated")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    counts = [1, 100, 1000] if args.quick else [1, 100, 1000, 10_000]
    if args.threads:
        counts = [int(n) for n in args.threads.split(",")]
    posts = min(args.posts, 1500) if args.quick else args.posts
    fold_size = min(args.fold_size, 10_000) if args.quick else args.fold_size
    phases = set(args.phases.split(","))
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command   : {cmd}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cpu_count : {os.cpu_count()}, load average {load}")
    work = Path(tempfile.mkdtemp(prefix="an-growth-"))
    dbs = Databases(args.db, work)
    figures: dict[str, Any] = {"command": cmd, "db": args.db}
    try:
        print(f"database  : {dbs.start()}")
        if "posts" in phases:
            print(f"\n1. posts through ThreadService.post, {args.concurrency} in flight")
            print(
                f"   {'threads':>7} {'posts/s':>9} {'CPU ms/post':>12} {'x 1 thread':>10} "
                f"{'grants':>8} {'bytes/env':>10}"
            )
            rows = asyncio.run(posts_phase(dbs, counts, posts, args.concurrency))
            base = rows[0]["posts_per_s"]
            for r in rows:
                r["ratio"] = r["posts_per_s"] / base
                target = {1000: TARGET_1K, 10_000: TARGET_10K}.get(r["threads"])
                if target is not None:
                    verdict = "PASS" if r["ratio"] >= target else "MISS"
                    print(
                        f"   ratio at {r['threads']:,} threads: {r['ratio']:.2f} >= {target}"
                        f"  {verdict}"
                    )
            last = rows[-1]
            print(
                f"5. bytes per envelope: {last['bytes_per_envelope']:,.0f} "
                f"({last['envelopes']:,} envelopes, {last['audit_per_envelope']:.2f} audit rows "
                "each, indexes included)"
            )
            figures["posts"] = rows
        if "pages" in phases:
            print("\n2. envelopes page reads (one thread of 1,000 messages)")
            print(f"   {'limit':>5} {'rows':>5} {'ms/read':>9}")
            figures["pages"] = asyncio.run(
                page_phase(dbs, 200 if args.quick else 1000, args.concurrency)
            )
        if "fold" in phases:
            print(f"\n3. cold fold of a {fold_size:,}-message thread")
            figures["fold"] = asyncio.run(fold_phase(dbs, fold_size, args.concurrency))
        if "start" in phases:
            print("\n4. start-up")
            figures["start"] = startup_phase(work)
    finally:
        dbs.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
