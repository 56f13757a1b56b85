"""Latency of the hub alone at a fixed offered rate: append → acknowledgement and append →
subscriber, with no HTTP, WebSocket or client process in the way.

Run:  .venv/bin/python bench/hub_latency.py [--rate 1000] [--seconds 10] [--runs 3] [--json]

Each run opens a fresh SQLite file (the project's migrations and durable settings:
journal_mode=WAL, synchronous=FULL) with ``Hub.open``, creates one thread and subscribes to it,
then starts one append task every 1/rate s on a fixed schedule (appends in flight overlap, so
the hub groups them into transactions as it would under load). Each message carries its start
time (``perf_counter_ns``); the subscriber records start → delivery, each append start →
acknowledgement. The process freezes its startup heap (``gc.freeze()``) as ``agent-network
serve`` does. Prints p50/p99/max per run, the size the WAL file reached (it restarts after
checkpoints instead of growing: see docs/architecture.md) and the worst stalls with the second
of the run they happened in. Never asserts; the 5 ms p99 target of the realtime issue applies
to the whole WebSocket path (``bench/realtime.py``), of which this is the hub's share.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_network.hub import Hub
from agent_network.model.envelope import Sender
from agent_network.store.engine import create_engine, database_url, upgrade_schema

ORG = "org_bench0000000000000000000"
USER = Sender("user", "usr_bench0000000000000000000", ORG, "bench")
SYSTEM = Sender("system", ORG, ORG)
PADDING = " " + "x" * 80  # ~100 characters of content with the timestamp


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values`` (not empty)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def file_mib(path: Path) -> float:
    """Size of ``path`` in MiB (0 when it does not exist)."""
    return path.stat().st_size / 2**20 if path.exists() else 0.0


async def one_run(work: Path, rate: float, seconds: float) -> dict[str, Any]:
    db = work / "hub.db"
    engine = create_engine(database_url(db))
    await upgrade_schema(engine)
    delivered: list[tuple[float, float]] = []  # (latency ms, second of the run)
    acked: list[float] = []
    total = int(rate * seconds)
    async with Hub.open(engine) as hub:
        thread_id = "thr_bench_latency"
        created = {"title": "bench", "team_id": "tm_bench", "adapter": "open", "agent_budget": 10}
        await hub.append(thread_id, type="thread.created", data=created, sender=SYSTEM)
        sub = hub.subscribe({thread_id}, buffer=total + 10)
        t0 = time.perf_counter_ns()

        async def read() -> None:
            async for env in sub:
                if env.type == "message":
                    sent = int(str(env.data["content"]).split(" ", 1)[0])
                    now = time.perf_counter_ns()
                    delivered.append(((now - sent) / 1e6, (sent - t0) / 1e9))
                    if len(delivered) == total:
                        return

        async def append() -> None:
            sent = time.perf_counter_ns()
            content = f"{sent}{PADDING}"
            await hub.append(thread_id, type="message", data={"content": content}, sender=USER)
            acked.append((time.perf_counter_ns() - sent) / 1e6)

        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(read())
            start = time.perf_counter()
            sent = 0
            while sent < total:
                due = min(total, int((time.perf_counter() - start) * rate) + 1)
                while sent < due:
                    tg.create_task(append())
                    sent += 1
                await asyncio.sleep(0.0005)
            await asyncio.wait_for(reader, timeout=60)
        wal_mib = file_mib(Path(f"{db}-wal"))
        sub.close()
    await engine.dispose()
    lat = [ms for ms, _ in delivered]
    worst = sorted(delivered, reverse=True)[:3]
    return {
        "appends": total,
        "recv_p50_ms": pct(lat, 50),
        "recv_p99_ms": pct(lat, 99),
        "recv_max_ms": max(lat),
        "ack_p50_ms": pct(acked, 50),
        "ack_p99_ms": pct(acked, 99),
        "wal_mib": wal_mib,
        "worst": [f"{ms:.1f} ms at {at:.2f} s" for ms, at in worst],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=1000.0, help="appends/s offered")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a fresh database")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command    : {cmd}")
    print(f"cpu_count  : {os.cpu_count()}   load average at start: {os.getloadavg()[0]:.2f}")
    gc.collect()
    gc.freeze()  # as `agent-network serve` does after startup
    runs: list[dict[str, Any]] = []
    print(
        f"   {'run':<4} {'appends':>8} {'recv p50/p99/max ms':>24} {'ack p50/p99 ms':>16} "
        f"{'WAL MiB':>8}  worst"
    )
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="an-hublat-"))
        try:
            r = asyncio.run(one_run(work, args.rate, args.seconds))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(r)
        print(
            f"   {i + 1:<4} {r['appends']:>8,} {r['recv_p50_ms']:>8.2f} /{r['recv_p99_ms']:>6.2f} /"
            f"{r['recv_max_ms']:>7.1f} {r['ack_p50_ms']:>8.2f} /{r['ack_p99_ms']:>6.2f} "
            f"{r['wal_mib']:>8.1f}  {', '.join(r['worst'])}"
        )
    p99s = sorted(r["recv_p99_ms"] for r in runs)
    print(
        f"median p99 append→subscriber over {len(runs)} runs: {p99s[len(p99s) // 2]:.2f} ms "
        f"at {args.rate:,.0f} appends/s"
    )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps({"command": cmd, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
