"""Resident memory of a running server (no model loaded) after a little REST load.

Run:  .venv/bin/python bench/memory.py [--messages 2000] [--concurrency 8] [--json]

Starts the equivalent of ``agent-network serve`` as a subprocess (uvicorn serving
``create_app(Settings(database=<temp db>, model="test"))`` on 127.0.0.1 and a free port), waits
for ``GET /api/v1/health``, creates an org, a user, a team with the user as a member and a
thread through the REST API, posts ``--messages`` messages, then reads VmRSS (now) and VmHWM (peak)
of the server process from /proc/<pid>/status and stops the server. No agent exists, so no model
is ever loaded. The script prints figures and never asserts; the target comes from the issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from _server import ServerProcess, ok, proc_status

TARGET_MIB = 150.0  # "< 150 MiB with no model loaded", from the issue
CONTENT = "benchmark message " + "x" * 82  # 100 characters


def mib(status: dict[str, float]) -> dict[str, float]:
    """``proc_status`` figures (KiB) in MiB."""
    return {k: v / 1024 for k, v in status.items()}


def setup(base: str, admin_key: str) -> tuple[str, str, str]:
    """Org, user, team (with the user) and thread; returns (org key, user id, thread id)."""
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
    ) as admin:
        org = ok(admin.post("/orgs", json={"name": "bench"}))
    org_key = org["secret"]
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {org_key}"}, timeout=60
    ) as http:
        user = ok(http.post("/users", json={"name": "bench user"}))
        team = ok(http.post("/teams", json={"name": "bench team"}))
        ok(http.post(f"/teams/{team['id']}/members", json={"user_id": user["id"]}))
        thread = ok(http.post(f"/teams/{team['id']}/threads", json={"title": "bench"}))
    return org_key, user["id"], thread["id"]


async def post_messages(
    base: str, key: str, user_id: str, thread_id: str, count: int, concurrency: int
) -> float:
    """Post ``count`` messages with ``concurrency`` clients in flight; return the seconds taken."""
    next_i = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < count:
            next_i += 1
            r = await http.post(
                f"/threads/{thread_id}/messages", json={"content": CONTENT, "user_id": user_id}
            )
            ok(r)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000, help="messages to post")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)

    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command   : {cmd}")
    print(f"cpu_count : {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="an-memory-"))
    figures: dict[str, Any] = {}
    pid = 0
    try:
        with ServerProcess(work, run_routines=True) as server:
            pid = server.pid
            figures["startup_s"] = server.startup_s
            figures["idle"] = mib(proc_status(pid))
            org_key, user_id, thread_id = setup(server.base, server.admin_key)
            seconds = asyncio.run(
                post_messages(
                    server.base, org_key, user_id, thread_id, args.messages, args.concurrency
                )
            )
            figures["post_s"] = seconds
            figures["after"] = mib(proc_status(pid))
            thread = ok(server.client(org_key).get(f"/threads/{thread_id}"))
            figures["last_seq"] = thread["last_seq"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    idle, after = figures["idle"], figures["after"]
    peak = after["VmHWM"]
    verdict = "PASS" if peak < TARGET_MIB else "MISS"
    print(f"server    : pid {pid}, healthy after {figures['startup_s']:.2f} s")
    print(
        f"load      : {args.messages} messages, {args.concurrency} in flight, "
        f"{figures['post_s']:.2f} s ({args.messages / figures['post_s']:,.0f} msg/s), "
        f"thread last_seq {figures['last_seq']}"
    )
    print()
    print(f"{'when':<22}  {'VmRSS MiB':>9}  {'VmHWM MiB':>9}")
    print(f"{'idle after startup':<22}  {idle['VmRSS']:>9.1f}  {idle['VmHWM']:>9.1f}")
    print(f"{'after the load':<22}  {after['VmRSS']:>9.1f}  {after['VmHWM']:>9.1f}")
    print()
    print(
        f"peak (VmHWM) {peak:.1f} MiB; target from the issue: < {TARGET_MIB:g} MiB with no "
        f"model loaded  {verdict}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "command": cmd,
                    "cpu_count": os.cpu_count(),
                    "messages": args.messages,
                    "concurrency": args.concurrency,
                    "startup_s": round(figures["startup_s"], 3),
                    "post_s": round(figures["post_s"], 3),
                    "idle_mib": {k: round(v, 1) for k, v in idle.items()},
                    "after_mib": {k: round(v, 1) for k, v in after.items()},
                    "target_mib": TARGET_MIB,
                    "verdict": verdict,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
