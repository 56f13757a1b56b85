"""Several server processes on one PostgreSQL: the append path against raw inserts, throughput with
1, 2 and 4 servers, cross-process delivery latency, SQLite against PostgreSQL.

Run:  .venv/bin/python bench/scale.py [--quick] [--seconds 5] [--json]

It starts a private PostgreSQL cluster (``tests/pgcluster.py``: initdb in a temp dir,
``synchronous_commit=on``, ``fsync=on``) unless ``AGENT_NETWORK_TEST_PG`` names a running server.
Every phase gets a fresh database created by the project's migrations.

1. append path, PostgreSQL: ``--threads`` (50) asyncio tasks, each posting to its own thread
   through ``Hub.append`` in this process and awaiting each acknowledgement (group commit);
   baseline: raw batched inserts of the same envelope rows with the same driver (asyncpg), in
   transactions of the batch size the hub reached (``executemany``), time inside the
   transactions only; and the same with each envelope's audit row, as the hub writes both (with
   ``org_seq`` numbered by the inserter, as the hub's writer does, so ``audit_log``'s per-row
   trigger, a lock and a MAX per row, does nothing). Target (issue
   16): hub / raw >= 0.50.
2. SQLite against PostgreSQL, one process: phase 1's hub workload on a SQLite file (the project's
   durable settings) next to the PostgreSQL figure.
3. 1, 2 and 4 server processes (``agent-network serve``, in-process runner off) on one database,
   the same offered load: ``--posters`` (64) HTTP posters in this process, round robin over the
   servers and ``--server-threads`` (10) threads, each awaiting its answer (few threads, so the
   post path's per-thread caches stay warm: the cost of many cold threads is issue 16's
   "cost must not grow with the number of threads", a separate part).
   Envelopes/s and server CPU per envelope (user + system seconds of the server processes).
   This machine's cores are shared by the load generator, the servers and PostgreSQL: the curve
   shows where that box flattens, not a cluster.
4. cross-process delivery at ``--rate`` (500) posts/s: two servers; posts go to server A on a
   fixed schedule; a WebSocket subscriber on server B and one on A follow the threads. Latency
   = receipt on the subscriber - the post's send time; p50/p99 on B, with A's as the
   same-process baseline. Target: B's p99 < 20 ms.

Figures are printed as ratios against baselines measured in the same run; the script never
asserts. ``--quick`` runs every phase shortly (for CI smoke, not for figures).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _server import cpu_seconds, free_port  # noqa: E402
from agent_network.hub import Hub  # noqa: E402
from agent_network.model.envelope import GENESIS_HASH, Sender  # noqa: E402
from agent_network.model.ids import new_id, new_sorted_id, now_iso  # noqa: E402
from agent_network.services import create_admin_key  # noqa: E402
from agent_network.store.engine import create_engine, database_url, upgrade_schema  # noqa: E402
from pgcluster import PgCluster  # type: ignore[import-not-found]  # noqa: E402

TARGET_APPEND = 0.50  # hub / raw batched inserts on PostgreSQL (issue 16)
TARGET_P99_MS = 20.0  # cross-process delivery p99 at 500 posts/s (issue 16)
CONTENT = "benchmark message " + "x" * 82  # 100 characters
ORG = "org_bench0000000000000000000"
USER = Sender("user", "usr_bench0000000000000000000", ORG, "bench")
COLUMNS = (
    "thread_id, seq, id, type, data, sender_kind, sender_id, sender_org_id, audience, "
    "causation_id, idempotency_key, created_at, prev_hash, hash"
)
INSERT_AUDIT_PG = (
    "INSERT INTO audit_log (org_id, principal_kind, principal_id, action, resource_kind, "
    "resource_id, outcome, reason, data, created_at, org_seq) VALUES ($1, $2, $3, $4, $5, $6, "
    "$7, $8, $9::json, $10, $11)"
)
INSERT_PG = f"INSERT INTO envelopes ({COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 15))})"


@dataclass
class Rate:
    name: str
    rows: int
    seconds: float
    transactions: int = 0
    cpu: float = 0.0  # server CPU seconds (phase 3)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_txn(self) -> float:
        return self.rows / self.transactions if self.transactions else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.rows if self.rows else 0.0


# ------------------------------------------------------------------ databases


class Databases:
    """Fresh migrated databases on the private (or adopted) PostgreSQL cluster."""

    def __init__(self) -> None:
        self.cluster = PgCluster()
        self.template: str | None = None

    def start(self) -> str:
        url = str(self.cluster.start())
        template_url = self.cluster.create_database("an_bench_template")
        asyncio.run(_migrate(str(template_url)))
        self.template = "an_bench_template"
        return url

    def fresh(self) -> str:
        return str(self.cluster.create_database(template=self.template))

    def stop(self) -> None:
        if self.cluster._owned:
            self.cluster.stop()
        else:
            self.cluster.drop_database("an_bench_template")


async def _migrate(url: str) -> None:
    engine = create_engine(database_url(url))
    await upgrade_schema(engine)
    await engine.dispose()


# ------------------------------------------------------------------ phase 1 and 2: the hub


async def hub_phase(url: str, name: str, tasks: int, warmup: float, seconds: float) -> Rate:
    """``tasks`` posters on their own threads through one in-process hub (see the docstring)."""
    engine = create_engine(database_url(url))
    done = 0
    stop = False
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            tids = [new_id("thr") for _ in range(tasks)]
            for tid in tids:
                await hub.append(tid, type="thread.created", data={"adapter": "open"}, sender=USER)

            async def poster(tid: str) -> None:
                nonlocal done
                while not stop:
                    await hub.append(tid, type="message", data={"content": CONTENT}, sender=USER)
                    done += 1

            workers = [asyncio.create_task(poster(t)) for t in tids]
            await asyncio.sleep(warmup)
            n0, b0, t0 = done, hub.batches, time.perf_counter()
            await asyncio.sleep(seconds)
            n1, b1, t1 = done, hub.batches, time.perf_counter()
            stop = True
            await asyncio.gather(*workers)
    finally:
        await engine.dispose()
    return Rate(name, n1 - n0, t1 - t0, b1 - b0)


def envelope_rows(threads: int, n: int, state: dict[str, tuple[int, str]]) -> list[tuple[Any, ...]]:
    """``n`` envelope rows round robin over ``threads`` threads, hash-chained as the hub does."""
    if not state:
        state.update({new_id("thr"): (0, GENESIS_HASH) for _ in range(threads)})
    data = json.dumps({"content": CONTENT})
    tids = list(state)
    rows = []
    for i in range(n):
        tid = tids[i % len(tids)]
        seq, prev = state[tid]
        eid, created = new_sorted_id("env"), now_iso()
        digest = hashlib.sha256(
            f"{tid}|{seq + 1}|{eid}|{data}|{created}|{prev}".encode()
        ).hexdigest()
        state[tid] = (seq + 1, digest)
        rows.append(
            (
                tid,
                seq + 1,
                eid,
                "message",
                data,
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


async def raw_phase(
    url: str, batch: float, threads: int, warmup: float, seconds: float, *, audit: bool = False
) -> Rate:
    """Raw ``executemany`` of envelope rows with asyncpg in transactions of ``batch`` rows on
    average (rows built between transactions, off the clock). ``audit``: each envelope with its
    audit row too, as the hub writes them (through the table's ``org_seq`` trigger)."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url)
    state: dict[str, tuple[int, str]] = {}
    rows = txns = numbered = 0
    inside = 0.0
    try:
        for span in (warmup, seconds):
            rows = txns = 0
            inside = target = 0.0
            end = time.perf_counter() + span
            while time.perf_counter() < end:
                target += batch
                size = max(1, int(target) - rows)
                chunk = envelope_rows(threads, size, state)
                # org_seq numbered here: the audit_log trigger then does nothing
                audits = [
                    (
                        ORG,
                        USER.kind,
                        USER.id,
                        "envelope.message",
                        "thread",
                        r[0],
                        "accepted",
                        None,
                        json.dumps({"seq": r[1], "envelope_id": r[2]}),
                        r[11],
                        numbered + n + 1,
                    )
                    for n, r in enumerate(chunk)
                ]
                numbered += len(audits)
                t0 = time.perf_counter()
                async with conn.transaction():
                    await conn.executemany(INSERT_PG, chunk)
                    if audit:
                        await conn.executemany(INSERT_AUDIT_PG, audits)
                inside += time.perf_counter() - t0
                rows += size
                txns += 1
    finally:
        await conn.close()
    what = "envelopes + audit rows" if audit else "envelopes"
    return Rate(f"raw asyncpg {what}, {batch:.1f}/txn", rows, inside, txns)


# ------------------------------------------------------------------ server processes


class Servers:
    """``n`` ``agent-network serve`` processes on one database (in-process runner off)."""

    def __init__(self, url: str, n: int, work: Path) -> None:
        self.url = url
        self.ports = [free_port() for _ in range(n)]
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/api/v1" for p in self.ports]

    def __enter__(self) -> Servers:
        env = {**os.environ, "AGENT_NETWORK_RUN_ROUTINES": "false"}
        for i, port in enumerate(self.ports):
            log = (self.work / f"server{i}-{port}.log").open("wb")
            args = [sys.executable, "-m", "agent_network", "serve", "--db", self.url]
            args += ["--port", str(port), "--model", "test", "--log-level", "warning"]
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=log, env=env))
        for base, proc in zip(self.bases, self.procs, strict=True):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited early ({proc.returncode}); see {self.work}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server not healthy within 60 s")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)


def setup_org(base: str, admin_key: str, threads: int) -> tuple[str, str, list[str]]:
    """An org with a user in a team and ``threads`` threads: (org key, user id, thread ids)."""
    with httpx.Client(base_url=base, timeout=60) as http:

        def ok(method: str, path: str, key: str, **kw: Any) -> Any:
            r = http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)
            if r.status_code >= 300:
                raise RuntimeError(f"{method} {path} -> {r.status_code} {r.text}")
            return r.json()

        body = ok("POST", "/orgs", admin_key, json={"name": f"Bench {new_id('x')}"})
        key = body.get("secret") or body["key"]
        user = ok("POST", "/users", key, json={"name": "Ann"})["id"]
        team = ok("POST", "/teams", key, json={"name": "T"})["id"]
        ok("POST", f"/teams/{team}/members", key, json={"user_id": user})
        tids = [
            ok("POST", f"/teams/{team}/threads", key, json={"title": f"t{i}"})["id"]
            for i in range(threads)
        ]
    return key, user, tids


async def _admin_key(url: str) -> str:
    engine = create_engine(database_url(url))
    try:
        return await create_admin_key(engine)
    finally:
        await engine.dispose()


async def post_load(
    bases: list[str], key: str, user: str, tids: list[str], posters: int, warmup: float, span: float
) -> tuple[int, float]:
    """Closed loop: ``posters`` tasks post round robin over servers and threads. Returns (posts
    acknowledged in the measured span, its seconds)."""
    done = 0
    stop = False
    refused: dict[int, int] = {}
    limits = httpx.Limits(max_connections=posters, max_keepalive_connections=posters)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60, headers=headers, limits=limits) as http:

        async def poster(i: int) -> None:
            nonlocal done
            n = i
            while not stop:
                base = bases[n % len(bases)]
                tid = tids[n % len(tids)]
                n += posters
                try:
                    r = await http.post(
                        f"{base}/threads/{tid}/messages",
                        json={"content": CONTENT, "user_id": user},
                    )
                except httpx.TransportError:  # e.g. a keep-alive connection closed meanwhile
                    refused[0] = refused.get(0, 0) + 1
                    continue
                if r.status_code == 201:
                    done += 1
                else:
                    refused[r.status_code] = refused.get(r.status_code, 0) + 1

        tasks = [asyncio.create_task(poster(i)) for i in range(posters)]
        await asyncio.sleep(warmup)
        n0, t0 = done, time.perf_counter()
        await asyncio.sleep(span)
        n1, t1 = done, time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    if refused:
        print(f"  (answers other than 201 by status, 0: transport error: {refused})")
    return n1 - n0, t1 - t0


def servers_phase(
    dbs: Databases, n: int, posters: int, threads: int, warmup: float, seconds: float, work: Path
) -> Rate:
    url = dbs.fresh()
    admin = asyncio.run(_admin_key(url))
    with Servers(url, n, work) as srv:
        key, user, tids = setup_org(srv.bases[0], admin, threads)
        c0 = srv.cpu()
        rows, span = asyncio.run(post_load(srv.bases, key, user, tids, posters, warmup, seconds))
        cpu = srv.cpu() - c0  # includes the warm-up: scaled to the measured span below
    total = warmup + seconds
    return Rate(f"{n} server process(es)", rows, span, cpu=cpu * span / total if total else 0.0)


# ------------------------------------------------------------------ phase 4: delivery latency


@dataclass
class Delivery:
    """Phase 4's raw observations: send times, receipt times per subscriber (by post content),
    posts acknowledged and the seconds from the first send to the last acknowledgement."""

    sent: dict[str, float]
    seen: dict[str, dict[str, float]]
    acked: int
    seconds: float

    def from_send(self, base: str) -> list[float]:
        """Send -> receipt on ``base``'s subscriber, ms."""
        return [1000 * (t - self.sent[c]) for c, t in self.seen[base].items() if c in self.sent]

    def between(self, first: str, second: str) -> list[float]:
        """Receipt on ``first``'s subscriber -> receipt on ``second``'s, ms."""
        a, b = self.seen[first], self.seen[second]
        return [1000 * (b[c] - a[c]) for c in a.keys() & b.keys()]


async def delivery(
    bases: list[str], key: str, user: str, tids: list[str], rate: float, seconds: float
) -> Delivery:
    """Post to server 0 at ``rate`` posts/s (open loop); WebSocket subscribers on every server
    note when each post arrives."""
    from websockets.asyncio.client import connect

    result = Delivery({}, {b: {} for b in bases}, 0, 0.0)
    ready = [asyncio.Event() for _ in bases]

    async def subscriber(i: int, base: str) -> None:
        ws_url = base.replace("http://", "ws://") + "/ws"
        seen = result.seen[base]
        async with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            for n, tid in enumerate(tids):
                await ws.send(json.dumps({"type": "join", "thread_id": tid, "ref": f"j{n}"}))
            joined = 0
            async for raw in ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame["type"] == "joined":
                    joined += 1
                    if joined == len(tids):
                        ready[i].set()
                elif frame["type"] == "envelope":
                    seen.setdefault(frame["envelope"].get("content") or "", now)
                elif frame["type"] == "ping":
                    await ws.send(json.dumps({"type": "pong", "ref": frame.get("ref")}))

    subs = [asyncio.create_task(subscriber(i, b)) for i, b in enumerate(bases)]
    await asyncio.gather(*(e.wait() for e in ready))
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    last_ack = 0.0
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as http:

        async def post(url: str, content: str) -> None:
            nonlocal last_ack
            try:
                r = await http.post(url, json={"content": content, "user_id": user})
            except httpx.TransportError:
                result.sent.pop(content, None)  # not counted
                return
            if r.status_code == 201:
                result.acked += 1
                last_ack = time.perf_counter()

        pending: set[asyncio.Task[Any]] = set()
        total = int(rate * seconds)
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            content = f"lat-{i}"
            result.sent[content] = time.perf_counter()
            task = asyncio.create_task(
                post(f"{bases[0]}/threads/{tids[i % len(tids)]}/messages", content)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    result.seconds = last_ack - start
    await asyncio.sleep(1.0)
    for sub in subs:
        sub.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="every phase briefly (smoke)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    parser.add_argument("--threads", type=int, default=50, help="concurrent threads, phase 1")
    parser.add_argument("--posters", type=int, default=64, help="HTTP posters, phase 3")
    parser.add_argument("--server-threads", type=int, default=10, help="threads, phase 3")
    parser.add_argument("--rate", type=float, default=500.0, help="posts/s, phase 4")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    w, s = (0.3, 1.5) if args.quick else (args.warmup, args.seconds)
    print(f"command   : {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"cpu_count : {os.cpu_count()}, load average {load}")
    print(f"phases    : {w:g} s warm-up + {s:g} s measured each")
    dbs = Databases()
    work = Path(tempfile.mkdtemp(prefix="an-scale-"))
    figures: dict[str, Any] = {}
    try:
        server_url = dbs.start()
        print(f"postgres  : {server_url} (synchronous_commit=on, fsync=on)")
        print()
        # 1. append path vs raw batched inserts (same driver), PostgreSQL
        hub_pg = asyncio.run(hub_phase(dbs.fresh(), "hub, PostgreSQL", args.threads, w, s))
        batch = max(1.0, hub_pg.per_txn)
        raw = asyncio.run(raw_phase(dbs.fresh(), batch, args.threads, w, s))
        raw_audit = asyncio.run(raw_phase(dbs.fresh(), batch, args.threads, w, s, audit=True))
        # 2. the same hub workload on SQLite
        sqlite_db = work / "an.db"
        asyncio.run(_migrate(str(sqlite_db)))
        hub_sqlite = asyncio.run(hub_phase(str(sqlite_db), "hub, SQLite", args.threads, w, s))
        rows = [hub_pg, raw, raw_audit, hub_sqlite]
        width = max(len(r.name) for r in rows)
        print(
            f"{'phase (' + str(args.threads) + ' threads)':<{width}}  {'env/s':>9}  {'rows/txn':>8}"
        )
        for r in rows:
            print(f"{r.name:<{width}}  {r.rate:>9,.0f}  {r.per_txn:>8.1f}")
        append_ratio = hub_pg.rate / raw.rate if raw.rate else 0.0
        verdict = "PASS" if append_ratio >= TARGET_APPEND else "MISS"
        label = "ratio hub PG / raw envelopes, same batch"
        print(f"{label:<44} : {append_ratio:.2f}  >= {TARGET_APPEND}  {verdict}")
        audit_ratio = hub_pg.rate / raw_audit.rate if raw_audit.rate else 0.0
        verdict = "PASS" if audit_ratio >= TARGET_APPEND else "MISS"
        label = "ratio hub PG / raw envelopes + audit rows"
        print(f"{label:<44} : {audit_ratio:.2f}  >= {TARGET_APPEND}  {verdict}")
        sq_ratio = hub_pg.rate / hub_sqlite.rate if hub_sqlite.rate else 0.0
        label = "ratio hub PG / hub SQLite (1 process)"
        print(f"{label:<44} : {sq_ratio:.2f}  (no target)")
        print()
        # 3. 1, 2, 4 server processes, same offered load
        curve = [
            servers_phase(dbs, n, args.posters, args.server_threads, w, s, work)
            for n in ((1, 2) if args.quick else (1, 2, 4))
        ]
        base = curve[0].rate
        head = f"servers ({args.posters} HTTP posters)"
        print(f"{head:<28}  {'env/s':>8}  {'x 1 server':>10}  {'CPU ms/env':>10}")
        for r in curve:
            times = r.rate / base if base else 0.0
            print(f"{r.name:<28}  {r.rate:>8,.0f}  {times:>10.2f}  {r.cpu_ms:>10.2f}")
        print()
        # 4. cross-process delivery latency
        url = dbs.fresh()
        admin = asyncio.run(_admin_key(url))
        with Servers(url, 2, work) as srv:
            key, user, tids = setup_org(srv.bases[0], admin, 20)
            seen = asyncio.run(delivery(srv.bases, key, user, tids, args.rate, s))
        a, b = srv.bases
        local, remote, extra = seen.from_send(a), seen.from_send(b), seen.between(a, b)
        achieved = seen.acked / seen.seconds if seen.seconds > 0 else 0.0
        p99 = pct(remote, 0.99)
        verdict = "PASS" if p99 < TARGET_P99_MS else "MISS"
        print(
            f"delivery: {args.rate:g} posts/s offered to server A, {achieved:,.0f}/s acknowledged, "
            f"{len(remote)} of {len(seen.sent)} seen on B"
        )
        print(f"{'latency (ms)':<40} {'p50':>8} {'p99':>8}")
        print(
            f"{'send -> subscriber on A (same process)':<40} {pct(local, 0.5):>8.1f} "
            f"{pct(local, 0.99):>8.1f}"
        )
        print(
            f"{'send -> subscriber on B (cross process)':<40} {pct(remote, 0.5):>8.1f} "
            f"{p99:>8.1f}  < {TARGET_P99_MS:g}  {verdict}"
        )
        print(
            f"{'subscriber on A -> on B (the extra hop)':<40} {pct(extra, 0.5):>8.1f} "
            f"{pct(extra, 0.99):>8.1f}"
        )
        if achieved < 0.9 * args.rate:
            print("  (the servers did not keep up with the offered rate: latencies are queueing)")
        figures = {
            "append": {
                "hub_pg": hub_pg.rate,
                "raw": raw.rate,
                "raw_with_audit": raw_audit.rate,
                "rows_per_txn": hub_pg.per_txn,
                "ratio": append_ratio,
                "hub_sqlite": hub_sqlite.rate,
            },
            "servers": [{"n": r.name, "rate": r.rate, "cpu_ms": r.cpu_ms} for r in curve],
            "delivery": {
                "offered": args.rate,
                "acknowledged_per_s": achieved,
                "local_p50": pct(local, 0.5),
                "local_p99": pct(local, 0.99),
                "remote_p50": pct(remote, 0.5),
                "remote_p99": p99,
                "extra_hop_p50": pct(extra, 0.5),
                "extra_hop_p99": pct(extra, 0.99),
                "received": len(remote),
            },
        }
    finally:
        dbs.stop()
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
