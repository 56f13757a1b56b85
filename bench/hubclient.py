"""Hub clients (``HubClient``) on the consulting workload, over both links, against the hub's raw
append rate measured in the same run. Prints figures, never asserts.

Run:  .venv/bin/python bench/hubclient.py [--quick] [--seconds S] [--handler model|plain] [--json]

One exchange, through the public HubClient API only: alice opens a ``consulting`` thread with
bob (bob acks automatically), asks one question addressed to bob, bob's handler answers (by
default with pydantic-ai's ``TestModel``, as the issue measured; ``--handler plain`` returns a
string without a model), the reply closes the thread (``consulting_complete``) and alice waits
for ``thread.closed``. ``1`` and ``20`` exchanges run in flight (each in-flight slot runs its
exchanges one after another), for ``--seconds`` after a warm-up, over:

- the embedded link (``EmbeddedLink``: the platform in this process, a durable SQLite file);
- ``WsLink`` against a real server process on 127.0.0.1 (``bench/_server.py``: uvicorn with
  ``GracefulServer``, a durable SQLite file); the CPU per exchange there adds the server's CPU
  (``/proc/<pid>/stat``) to this process's.

Beside the figures, the hub's raw durable append rate (``Hub.append`` on its own fresh file, 1
poster and 20 posters, as ``bench/append.py`` phase 1 and 2) from the same run, and the ratio
exchanges/s ÷ appends/s: how many appends' worth of throughput one exchange costs. The targets
(from the issue) are printed with PASS/MISS; they fail nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import uvloop
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

from _server import ServerProcess, cpu_seconds, load_average
from agent_network.api.embedded import EmbeddedLink
from agent_network.client import Channel, Envelope, HubClient, Passport
from agent_network.client.hubclient import Link, WsLink
from append import _hub_phase

TARGET_EMBEDDED = {1: 300.0, 20: 1000.0}  # exchanges/s over the embedded link, from the issue
TARGET_CPU_MS = 2.0  # CPU per exchange, from the issue
TARGET_WS_SHARE = 0.5  # WsLink figures / embedded figures, from the issue
BEFORE = "before (issue 14): 10.75/s (1), 6.6/s (20), 91-156 ms CPU per exchange"


@dataclass
class Figure:
    """One phase: ``exchanges`` completed in ``seconds`` using ``cpu_s`` of CPU."""

    link: str
    in_flight: int
    exchanges: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        """Exchanges per second."""
        return self.exchanges / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per exchange."""
        return 1000 * self.cpu_s / self.exchanges if self.exchanges else float("inf")


def _handler(kind: str) -> Callable[[Envelope, Channel], Awaitable[str]]:
    model_agent: Agent[None, str] = Agent(TestModel(custom_output_text="Consistency."))

    async def with_model(env: Envelope, channel: Channel) -> str:
        result = await model_agent.run(env.content or "")
        return result.output

    async def plain(env: Envelope, channel: Channel) -> str:
        return "Consistency."

    return with_model if kind == "model" else plain


async def _workload(
    link: Link,
    in_flight: int,
    warmup: float,
    seconds: float,
    handler: str,
    server_pid: int | None,
) -> tuple[int, float, float]:
    """Run the exchanges; returns (exchanges, seconds, CPU seconds) of the measured window."""
    async with HubClient(link) as hc:
        alice = await hc.register(Passport(name="alice"))
        bob = await hc.register(Passport(name="bob"), handler=_handler(handler))
        done = 0
        stop = False

        async def exchange() -> None:
            channel = await alice.open("a question", target=bob.agent_id, adapter="consulting")
            await channel.send("What matters most?", audience=[bob.agent_id])
            await alice.wait_for(channel.thread_id, lambda e: e.type == "thread.closed", timeout=60)

        async def slot() -> None:
            nonlocal done
            while not stop:
                await exchange()
                done += 1

        def cpu() -> float:
            return cpu_seconds() + (cpu_seconds(server_pid) if server_pid else 0.0)

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(slot)
            await anyio.sleep(warmup)
            n0, c0, t0 = done, cpu(), time.perf_counter()
            await anyio.sleep(seconds)
            n1, c1, t1 = done, cpu(), time.perf_counter()
            stop = True
    return n1 - n0, t1 - t0, c1 - c0


@contextlib.asynccontextmanager
async def _embedded(work: Path) -> AsyncIterator[tuple[Link, int | None]]:
    async with EmbeddedLink.open(work / "embedded.db") as link:
        yield link, None


@contextlib.asynccontextmanager
async def _ws(server: ServerProcess, key: str) -> AsyncIterator[tuple[Link, int | None]]:
    async with WsLink.connect(server.base.removesuffix("/api/v1"), key) as link:
        yield link, server.pid


async def _phase(
    name: str,
    opener: Callable[[], contextlib.AbstractAsyncContextManager[tuple[Link, int | None]]],
    in_flight: int,
    warmup: float,
    seconds: float,
    handler: str,
) -> Figure:
    async with opener() as (link, pid):
        n, s, c = await _workload(link, in_flight, warmup, seconds, handler, pid)
    return Figure(name, in_flight, n, s, c)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short phases (< 40 s in all)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per phase")
    parser.add_argument(
        "--handler", choices=["model", "plain"], default="model", help="bob's handler"
    )
    parser.add_argument("--links", default="embedded,ws", help="comma-separated: embedded,ws")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    warmup = 0.5 if args.quick else 1.5
    links = [x.strip() for x in args.links.split(",") if x.strip()]

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="an-bench-hubclient-") as tmp:
        work = Path(tmp)
        hub1 = uvloop.run(_hub_phase(work / "hub1.db", 1, warmup, seconds))
        hub20 = uvloop.run(_hub_phase(work / "hub20.db", 20, warmup, seconds))
        hub_rate = {1: hub1.rate, 20: hub20.rate}
        if "embedded" in links:
            for n in (1, 20):
                fig = anyio.run(
                    _phase,
                    "embedded",
                    lambda: _embedded(work),
                    n,
                    warmup,
                    seconds,
                    args.handler,
                    backend_options={"use_uvloop": True},
                )
                figures.append(fig)
                print(f"  embedded, {n:>2} in flight: {fig.rate:8.1f}/s", file=sys.stderr)
        if "ws" in links:
            with _server(work) as server:
                key = server.org("bench").key
                for n in (1, 20):
                    fig = anyio.run(
                        _phase,
                        "ws",
                        lambda: _ws(server, key),
                        n,
                        warmup,
                        seconds,
                        args.handler,
                        backend_options={"use_uvloop": True},
                    )
                    figures.append(fig)
                    print(f"  ws, {n:>2} in flight: {fig.rate:8.1f}/s", file=sys.stderr)

    print(f"hub client, consulting exchange (handler: {args.handler}), durable SQLite")
    print(f"machine: {os.cpu_count()} cores, load {load_average()}; {seconds:g} s per phase")
    print(f"hub raw append: 1 poster {hub_rate[1]:.0f}/s, 20 posters {hub_rate[20]:.0f}/s")
    print()
    ratio_head = "hub append/s ÷ exch/s"
    print(f"{'link':<9} {'in flight':>9} {'exch/s':>9} {'CPU ms/exch':>12} {ratio_head:>22}")
    for f in figures:
        ratio = hub_rate[f.in_flight] / f.rate if f.rate else float("inf")
        print(f"{f.link:<9} {f.in_flight:>9} {f.rate:>9.1f} {f.cpu_ms:>12.2f} {ratio:>22.1f}")
    print("(last column: how many raw appends (same in-flight count) one exchange is worth)")
    print()
    print("targets (from the issue)")
    by = {(f.link, f.in_flight): f for f in figures}
    for n, target in TARGET_EMBEDDED.items():
        emb = by.get(("embedded", n))
        if emb is not None:
            print(
                f"  embedded {n:>2} in flight >= {target:g}/s: {emb.rate:.1f} "
                f"{_verdict(emb.rate >= target)}"
            )
            print(
                f"  embedded {n:>2} in flight CPU <= {TARGET_CPU_MS:g} ms: {emb.cpu_ms:.2f} "
                f"{_verdict(emb.cpu_ms <= TARGET_CPU_MS)}"
            )
        ws = by.get(("ws", n))
        if emb is not None and ws is not None:
            share = ws.rate / emb.rate if emb.rate else 0.0
            print(
                f"  ws {n:>2} in flight >= {TARGET_WS_SHARE:g} x embedded: {share:.2f} "
                f"{_verdict(share >= TARGET_WS_SHARE)}"
            )
    print(BEFORE)
    if args.json:
        print(
            json.dumps(
                {
                    "hub_append_per_s": hub_rate,
                    "figures": [
                        {**asdict(f), "rate": round(f.rate, 2), "cpu_ms": round(f.cpu_ms, 3)}
                        for f in figures
                    ],
                }
            )
        )
    return 0


def _server(work: Path) -> ServerProcess:
    (work / "server").mkdir(exist_ok=True)
    return ServerProcess(work / "server")


if __name__ == "__main__":
    sys.exit(main())
