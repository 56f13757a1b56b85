"""Durable append throughput of the hub against raw SQLite on the same machine.

Run:  .venv/bin/python bench/append.py [--seconds 5] [--rounds 3] [--db-dir DIR] [--json]

Every phase writes to its own fresh SQLite file created by the project's migrations and opened with
the project's durable settings (journal_mode=WAL, synchronous=FULL), so every committed transaction
costs one fsync of the WAL file.

1. hub, 1 poster: one task calls ``Hub.append`` and waits for each acknowledgement.
2. hub, N threads: N asyncio tasks (default 50), each posting to its own thread and awaiting each
   acknowledgement before the next; reports envelopes/s and envelopes per committed transaction.
3. raw SQLite (stdlib ``sqlite3``, no SQLAlchemy) into the same ``envelopes`` table:
   a. one row per transaction (the baseline for 1);
   b. executemany in transactions of the average batch size the hub reached in 2 (the baseline
      for 2), plus batches of 1000 rows for context.
   Row tuples (hash chain included, ids made as the hub makes them: time-ordered) are built
   between transactions, off the clock: the raw rate is rows / time spent inside BEGIN..COMMIT,
   i.e. what SQLite itself can do.

The hub phases run on uvloop, the event loop the server runs on (``agent-network serve``).

The script prints figures and never asserts; the targets in the ratio rows come from the issue.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from agent_network.hub import Hub
from agent_network.model.envelope import GENESIS_HASH, Sender
from agent_network.model.ids import new_id, new_sorted_id, now_iso
from agent_network.store.engine import create_engine, database_url, upgrade_schema

TARGET_SINGLE = 0.50  # hub(1) / raw(a), from the issue
TARGET_CONCURRENT = 0.30  # hub(2) / raw(b), from the issue
CONTENT = "benchmark message " + "x" * 82  # 100 characters of content
ORG = "org_bench0000000000000000000"
USER = Sender("user", "usr_bench0000000000000000000", ORG, "bench")

INSERT_SQL = (
    "INSERT INTO envelopes (thread_id, seq, id, type, data, sender_kind, sender_id, "
    "sender_org_id, audience, causation_id, idempotency_key, created_at, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class Result:
    name: str
    rows: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_txn(self) -> float:
        return self.rows / self.transactions if self.transactions else 0.0


# ------------------------------------------------------------------ helpers


async def _migrated(path: Path) -> None:
    """Create ``path`` with the project's schema (alembic migrations)."""
    engine = create_engine(database_url(path))
    await upgrade_schema(engine)
    await engine.dispose()


def _fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def _fs_type(path: Path) -> str:
    """Filesystem type holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mnt, fstype = parts[1], parts[2]
                if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        pass
    return kind


# ------------------------------------------------------------------ hub phases


async def _hub_phase(path: Path, tasks: int, warmup: float, seconds: float) -> Result:
    """``tasks`` posters, each on its own thread, each awaiting its ack before the next post."""
    await _migrated(path)
    engine = create_engine(database_url(path))
    done = 0
    stop = False
    try:
        async with Hub.open(engine) as hub:
            thread_ids = [new_id("thr") for _ in range(tasks)]
            for tid in thread_ids:
                await hub.append(tid, type="thread.created", data={"adapter": "open"}, sender=USER)

            async def poster(tid: str) -> None:
                nonlocal done
                while not stop:
                    await hub.append(tid, type="message", data={"content": CONTENT}, sender=USER)
                    done += 1

            workers = [asyncio.create_task(poster(t)) for t in thread_ids]
            await asyncio.sleep(warmup)
            n0, b0, t0 = done, hub.batches, time.perf_counter()
            await asyncio.sleep(seconds)
            n1, b1, t1 = done, hub.batches, time.perf_counter()
            stop = True
            await asyncio.gather(*workers)
    finally:
        await engine.dispose()
    name = "hub, 1 poster" if tasks == 1 else f"hub, {tasks} threads"
    return Result(name, n1 - n0, t1 - t0, b1 - b0)


# ------------------------------------------------------------------ raw SQLite phases


class RowMaker:
    """Envelope rows as the hub would store them (hash chain per thread), round-robin on threads."""

    def __init__(self, threads: int) -> None:
        self.threads = [new_id("thr") for _ in range(threads)]
        self.seq = dict.fromkeys(self.threads, 0)
        self.head = dict.fromkeys(self.threads, GENESIS_HASH)
        self.data = json.dumps({"content": CONTENT})
        self.i = 0

    def take(self, n: int) -> list[tuple[Any, ...]]:
        rows = []
        for _ in range(n):
            tid = self.threads[self.i % len(self.threads)]
            self.i += 1
            seq = self.seq[tid] + 1
            eid, created, prev = new_sorted_id("env"), now_iso(), self.head[tid]
            digest = hashlib.sha256(
                f"{tid}|{seq}|{eid}|{self.data}|{created}|{prev}".encode()
            ).hexdigest()
            self.seq[tid], self.head[tid] = seq, digest
            rows.append(
                (
                    tid,
                    seq,
                    eid,
                    "message",
                    self.data,
                    USER.kind,
                    USER.id,
                    USER.org_id,
                    "null",
                    None,
                    None,
                    created,
                    prev,
                    digest,
                )
            )
        return rows


def _raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _raw_phase(
    path: Path, name: str, batch: float, threads: int, warmup: float, seconds: float
) -> Result:
    """Insert rows in transactions averaging ``batch`` rows; time only BEGIN..COMMIT.

    A fractional ``batch`` is met exactly on average by alternating floor/ceil sizes.
    """
    asyncio.run(_migrated(path))
    conn = _raw_connect(path)
    maker = RowMaker(threads)
    rows = txns = 0
    inside = 0.0
    target = 0.0
    try:
        for span in (warmup, seconds):  # the counters of the warm-up pass are discarded
            rows = txns = 0
            inside = target = 0.0
            end = time.perf_counter() + span
            while time.perf_counter() < end:
                target += batch
                size = max(1, int(target) - rows)
                chunk = maker.take(size)
                t0 = time.perf_counter()
                conn.execute("BEGIN")
                if size == 1:
                    conn.execute(INSERT_SQL, chunk[0])
                else:
                    conn.executemany(INSERT_SQL, chunk)
                conn.execute("COMMIT")
                inside += time.perf_counter() - t0
                rows += size
                txns += 1
    finally:
        conn.close()
    return Result(name, rows, inside, txns)


# ------------------------------------------------------------------ main


def _total(parts: list[Result]) -> Result:
    """Several rounds of one phase as one result (rows and seconds summed)."""
    return Result(
        parts[0].name,
        sum(p.rows for p in parts),
        sum(p.seconds for p in parts),
        sum(p.transactions for p in parts),
    )


def _ratio_line(label: str, ratios: list[float], target: float) -> tuple[str, float, str]:
    ratio = statistics.median(ratios)
    return label, ratio, "PASS" if ratio >= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    parser.add_argument(
        "--db-dir",
        type=Path,
        default=None,
        help="where the SQLite files go (default: a fresh temp dir, removed after)",
    )
    parser.add_argument("--threads", type=int, default=50, help="concurrent threads in phase 2")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating hub/raw rounds (median ratio wins)"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)

    own_dir = args.db_dir is None
    db_dir = Path(tempfile.mkdtemp(prefix="an-bench-")) if own_dir else args.db_dir
    db_dir.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command   : {cmd}")
    print(f"cpu_count : {os.cpu_count()}")
    print(f"python    : {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")
    print(f"db dir    : {db_dir} ({_fs_type(db_dir)}); journal_mode=WAL, synchronous=FULL")
    print(f"phases    : {args.warmup:g} s warm-up + {args.seconds:g} s measured each")
    print()

    try:
        w, s = args.warmup, args.seconds
        # Each hub phase runs right next to its baseline, alternating for --rounds rounds: fsync
        # latency drifts on shared disks, so a ratio is only meaningful between neighbours.
        # The verdict uses the median of the per-round ratios.
        singles: list[tuple[Result, Result]] = []
        concurrent: list[tuple[Result, Result]] = []
        for r in range(args.rounds):
            h1 = uvloop.run(_hub_phase(_fresh(db_dir / f"hub1_{r}.db"), 1, w, s))
            ra = _raw_phase(_fresh(db_dir / f"raw_a_{r}.db"), "raw sqlite3, 1 row/txn", 1, 1, w, s)
            singles.append((h1, ra))
            h2 = uvloop.run(_hub_phase(_fresh(db_dir / f"hub2_{r}.db"), args.threads, w, s))
            avg = max(1.0, h2.per_txn)
            rb = _raw_phase(
                _fresh(db_dir / f"raw_b_{r}.db"),
                f"raw sqlite3, {avg:.1f} rows/txn",
                avg,
                args.threads,
                w,
                s,
            )
            concurrent.append((h2, rb))
        raw_k = _raw_phase(
            _fresh(db_dir / "raw_1000.db"), "raw sqlite3, 1000 rows/txn", 1000, args.threads, w, s
        )
    finally:
        if own_dir:
            shutil.rmtree(db_dir, ignore_errors=True)

    hub1, raw_a = _total([h for h, _ in singles]), _total([r for _, r in singles])
    hub2, raw_b = _total([h for h, _ in concurrent]), _total([r for _, r in concurrent])
    single_ratios = [h.rate / r.rate if r.rate else 0.0 for h, r in singles]
    concurrent_ratios = [h.rate / r.rate if r.rate else 0.0 for h, r in concurrent]
    results = [hub1, raw_a, hub2, raw_b, raw_k]
    width = max(len(r.name) for r in results)
    print(
        f"{'phase':<{width}}  {'envelopes/s':>12}  {'rows/txn':>9}  {'rows':>8}  {'txns':>7}  "
        f"{'seconds':>7}"
    )
    for res in results:
        print(
            f"{res.name:<{width}}  {res.rate:>12,.0f}  {res.per_txn:>9.1f}  {res.rows:>8}  "
            f"{res.transactions:>7}  {res.seconds:>7.2f}"
        )
    print()
    ratios = [
        (
            *_ratio_line("hub 1 poster / raw 1 row/txn", single_ratios, TARGET_SINGLE),
            TARGET_SINGLE,
        ),
        (
            *_ratio_line(
                f"hub {args.threads} threads / raw same batch", concurrent_ratios, TARGET_CONCURRENT
            ),
            TARGET_CONCURRENT,
        ),
    ]
    context = f"(context) hub {args.threads} threads / raw 1000 rows/txn"
    rwidth = max(len(context), *(len(r[0]) for r in ratios))
    print(f"{'ratio (median of rounds)':<{rwidth}}  {'value':>6}  target (from the issue)")
    for label, value, verdict, target in ratios:
        print(f"{label:<{rwidth}}  {value:>6.2f}  >= {target:.2f}  {verdict}")
    print(
        f"{context:<{rwidth}}  {(hub2.rate / raw_k.rate if raw_k.rate else 0):>6.2f}  (no target)"
    )
    print(f"per round : single {' '.join(f'{x:.2f}' for x in single_ratios)}")
    print(f"            concurrent {' '.join(f'{x:.2f}' for x in concurrent_ratios)}")

    if args.json:
        print(
            json.dumps(
                {
                    "command": cmd,
                    "cpu_count": os.cpu_count(),
                    "sqlite": sqlite3.sqlite_version,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "phases": {
                        key: {
                            "name": r.name,
                            "per_s": round(r.rate, 1),
                            "rows": r.rows,
                            "transactions": r.transactions,
                            "rows_per_txn": round(r.per_txn, 2),
                            "seconds": round(r.seconds, 3),
                        }
                        for key, r in zip(
                            ("hub_single", "raw_single", "hub_concurrent", "raw_batch", "raw_1000"),
                            results,
                            strict=True,
                        )
                    },
                    "ratios": {
                        "single": {
                            "value": round(ratios[0][1], 3),
                            "target": TARGET_SINGLE,
                            "verdict": ratios[0][2],
                        },
                        "concurrent": {
                            "value": round(ratios[1][1], 3),
                            "target": TARGET_CONCURRENT,
                            "verdict": ratios[1][2],
                        },
                    },
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
