"""CPU cost of the post path: N posts through ``ThreadService.post`` in this process, and N
``post`` frames over the WebSocket to a server process. Prints posts/s and CPU ms/post; never
asserts.

Run:  .venv/bin/python bench/post.py [--posts 3000] [--modes service,ws] [--json]
      .venv/bin/python bench/post.py --modes service --profile /tmp/post.pstats   # cProfile

Scenarios (each on its own fresh thread):

- ``team user``: an org key posts as one of its users into an org-internal team thread (the
  case ``bench/realtime.py`` measures);
- ``network agent``: an org key posts as an agent with a rule (``outbound_to`` ids and a
  rate that never runs out) into a network thread, where the org's egress policy (an e-mail
  redact rule and a secret refuse rule, neither matching) is applied; every 50th post is the
  user's (a thread accepts at most ``agent_budget`` consecutive agent messages, here 1000);
- ``agent token``: the agent's own token posts into the same network thread (every 50th post
  likewise by the user through the org key).

``service`` mode builds the services over a fresh SQLite file (the project's migrations and
durable settings) inside this process and keeps ``--concurrency`` posts in flight (asyncio
tasks, so the hub group-commits them). ``CPU ms/post`` is this process's user+system CPU (every
thread: the event loop, the aiosqlite threads and the WAL writer) divided by the posts, so it
includes the durable append and its audit record. ``--profile FILE`` runs the same under
cProfile (event-loop thread only) and prints the top functions.

``ws`` mode starts the server like ``bench/realtime.py`` (uvicorn, ``run_routines=False``) and
pipelines ``post`` frames from ``--connections`` connections (64 unanswered each, the server's
limit), with no subscriber; ``CPU ms/post`` is the server process's CPU over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import itertools
import json
import os
import pstats
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from _server import ServerProcess, bootstrap, cpu_seconds
from agent_network.config import Settings
from agent_network.hub import Hub
from agent_network.model.rule import RateLimit, Rule
from agent_network.services import ServiceContext, Services
from agent_network.services.principal import Principal
from agent_network.services.threads import MAX_BUDGET
from agent_network.store.engine import create_engine, database_url

HUMAN_EVERY = 50  # in the agent scenarios every 50th post is the user's (budget 1000)
IN_FLIGHT = 64  # unanswered post frames per connection (the server's per-connection limit)
CONTENT = "a message of about one hundred characters, like a short chat line between two agents"


def report(name: str, posts: int, wall: float, cpu: float, errors: int) -> dict[str, Any]:
    row = {
        "scenario": name,
        "posts": posts,
        "seconds": wall,
        "posts_per_s": posts / wall,
        "cpu_ms_per_post": cpu / posts * 1000,
        "errors": errors,
    }
    print(
        f"   {name:<16} {posts:>7,} {row['posts_per_s']:>9,.0f} "
        f"{row['cpu_ms_per_post']:>12.3f} {errors:>7}"
    )
    return row


# ----------------------------------------------------------------------------- service mode


async def _world(svc: Services, admin_key: str) -> dict[str, Any]:
    """An org with a user, a team thread, an agent with a rule and a token, a network thread."""
    admin = await svc.orgs.authenticate(admin_key)
    created = await svc.orgs.create_org(admin, "bench org")
    org = await svc.orgs.authenticate(created["secret"])
    user = await svc.orgs.create_user(org, "bench user", None)
    team = await svc.teams.create(org, "team", "bench team")
    await svc.teams.add_member(org, "team", team["id"], user_id=user["id"])
    agent = await svc.agents.create_agent(org, name="bench agent", lookup_key="bench-agent")
    rule = Rule(
        outbound_to=[user["id"], "org:self"],
        rate=RateLimit(messages=100_000, per_seconds=0.001),
    )
    await svc.rules.put(org, agent["id"], rule)
    net = await svc.teams.create(org, "network", "bench network")
    await svc.teams.add_member(org, "network", net["id"], agent_id=agent["id"])
    await svc.teams.add_member(org, "network", net["id"], user_id=user["id"])
    await svc.policy.set_egress(
        org,
        [
            {"name": "mail", "kind": "email", "action": "redact"},
            {"name": "keys", "kind": "secret", "action": "refuse"},
        ],
    )
    issued = await svc.credentials.issue(org, kind="agent_token", subject_id=agent["id"])
    token = await svc.orgs.authenticate(issued["secret"])
    return {"org": org, "user": user, "team": team, "agent": agent, "net": net, "token": token}


async def _drive(
    posts: int, concurrency: int, post: Callable[[int], Awaitable[Any]]
) -> tuple[float, float, int]:
    """Run ``post(i)`` for i in range(posts), ``concurrency`` at a time: (wall s, CPU s,
    errors)."""
    counter = itertools.count()
    errors = 0
    first: list[BaseException] = []

    async def worker() -> None:
        nonlocal errors
        while (i := next(counter)) < posts:
            try:
                await post(i)
            except Exception as exc:  # counted; the first one is printed
                errors += 1
                if not first:
                    first.append(exc)
                    print(f"   first error: {exc!r}")

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - t0, cpu_seconds() - cpu0, errors


async def service_mode(
    db: Path, admin_key: str, posts: int, concurrency: int, profile: str | None
) -> list[dict[str, Any]]:
    engine = create_engine(database_url(db))
    rows: list[dict[str, Any]] = []
    try:
        async with Hub.open(engine, sweep_interval=None) as hub:
            ctx = ServiceContext(engine, hub, Settings(database=str(db), model="test"))
            svc = Services.create(ctx)
            w = await _world(svc, admin_key)
            org: Principal = w["org"]
            token: Principal = w["token"]
            user_id, agent_id = w["user"]["id"], w["agent"]["id"]

            def as_user(t: str, i: int) -> Awaitable[Any]:
                return svc.threads.post(org, t, f"{i} {CONTENT}", user_id=user_id)

            def as_agent(t: str, i: int) -> Awaitable[Any]:
                if i % HUMAN_EVERY == 0:  # a person speaks now and then (the runaway budget)
                    return as_user(t, i)
                return svc.threads.post(org, t, f"{i} {CONTENT}", agent_id=agent_id)

            def as_token(t: str, i: int) -> Awaitable[Any]:
                if i % HUMAN_EVERY == 0:
                    return as_user(t, i)
                return svc.threads.post(token, t, f"{i} {CONTENT}")

            scenarios: list[tuple[str, Callable[[str, int], Awaitable[Any]], str]] = [
                ("team user", as_user, w["team"]["id"]),
                ("network agent", as_agent, w["net"]["id"]),
                ("agent token", as_token, w["net"]["id"]),
            ]
            profiler = cProfile.Profile() if profile else None
            for name, make, team_id in scenarios:
                thread = await svc.threads.create(
                    org, team_id, f"bench {name}", agent_budget=MAX_BUDGET
                )
                post = functools.partial(make, thread["id"])
                await _drive(min(200, posts), concurrency, post)  # warm-up
                if profiler is not None:
                    profiler.enable()
                wall, cpu, errors = await _drive(posts, concurrency, post)
                if profiler is not None:
                    profiler.disable()
                rows.append(report(name, posts, wall, cpu, errors))
                stored = len(await hub.read(thread["id"], after=0))
                expected = 1 + min(200, posts) + posts  # thread.created, warm-up, measured
                if stored != expected:
                    print(f"   !! {stored} envelopes stored in the thread, expected {expected}")
            if profiler is not None and profile is not None:
                profiler.dump_stats(profile)
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out).strip_dirs()
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
                print(out.getvalue())
                print(f"   profile written to {profile} (event-loop thread only)")
    finally:
        await engine.dispose()
    return rows


# ----------------------------------------------------------------------------- ws mode


async def _open(url: str, key: str) -> ClientConnection:
    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {key}"},
        compression=None,
        ping_interval=None,
        max_queue=None,
    )
    while (welcome := json.loads(await ws.recv()))["type"] == "ping":
        await ws.send('{"type":"pong"}')
    assert welcome["type"] == "welcome", welcome
    return ws


async def ws_run(
    url: str, key: str, pid: int, thread_id: str, sender: dict[str, str], posts: int, conns: int
) -> tuple[float, float, int]:
    """Pipeline ``posts`` post frames over ``conns`` connections: (wall s, server CPU s,
    errors)."""
    sockets = [await _open(url, key) for _ in range(conns)]
    slots = [asyncio.Semaphore(IN_FLIGHT) for _ in sockets]
    done = asyncio.Event()
    answered = 0
    errors = 0

    async def read(i: int) -> None:
        nonlocal answered, errors
        try:
            async for msg in sockets[i]:
                frame = json.loads(msg)
                if frame["type"] in ("posted", "error"):
                    answered += 1
                    errors += frame["type"] == "error"
                    slots[i].release()
                    if answered == posts:
                        done.set()
                elif frame["type"] == "ping":
                    await sockets[i].send('{"type":"pong"}')
        except ConnectionClosed:
            pass

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        readers = [tg.create_task(read(i)) for i in range(conns)]
        for n in range(posts):
            i = n % conns
            await slots[i].acquire()
            frame = {
                "type": "post",
                "ref": str(n),
                "thread_id": thread_id,
                "content": f"{n} {CONTENT}",
                **sender,
            }
            await sockets[i].send(json.dumps(frame))
        await done.wait()
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        for ws in sockets:
            await ws.close()
        for t in readers:
            t.cancel()
    return wall, cpu, errors


def ws_mode(work: Path, posts: int, conns: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ServerProcess(work / "ws") as server:
        org = server.org("ws bench")
        for label, warm in (("warm-up", True), ("team user", False)):
            thread_id = org.new_thread(label)
            n = min(500, posts) if warm else posts
            wall, cpu, errors = asyncio.run(
                ws_run(
                    server.ws_url,
                    org.key,
                    server.pid,
                    thread_id,
                    {"user_id": org.user_id},
                    n,
                    conns,
                )
            )
            if not warm:
                rows.append(report(f"ws {label}", n, wall, cpu, errors))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--posts", type=int, default=3000, help="measured posts per scenario")
    parser.add_argument("--concurrency", type=int, default=64, help="service mode: in flight")
    parser.add_argument("--connections", type=int, default=4, help="ws mode: poster sockets")
    parser.add_argument("--modes", default="service,ws", help="comma-separated: service, ws")
    parser.add_argument("--profile", help="service mode under cProfile; write stats here")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command    : {cmd}")
    print(f"cpu_count  : {os.cpu_count()}   load average at start: {os.getloadavg()[0]:.2f}")
    figures: dict[str, Any] = {"command": cmd, "rows": []}
    modes = set(args.modes.split(","))
    work = Path(tempfile.mkdtemp(prefix="an-post-"))
    try:
        print(f"   {'scenario':<16} {'posts':>7} {'posts/s':>9} {'CPU ms/post':>12} {'errors':>7}")
        if "service" in modes:
            db = work / "service.db"
            admin_key = asyncio.run(bootstrap(db))
            figures["rows"] += asyncio.run(
                service_mode(db, admin_key, args.posts, args.concurrency, args.profile)
            )
        if "ws" in modes:
            (work / "ws").mkdir()
            figures["rows"] += ws_mode(work, args.posts, args.connections)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
