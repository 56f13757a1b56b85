"""What the protocol examples share: the command line, the in-process platform, agents, printing.

Every example runs the whole platform inside its own process: :class:`EmbeddedLink` starts the store
(a temporary SQLite file, or ``--db PATH``), the hub, the services and the in-process runner
(``run_routines=True``), with no server and no socket. Agents are registered through a
:class:`HubClient` (each acts with its own agent token) and get a ``participate`` routine, so the
runner — and the model named by ``--model`` — speaks for them. People are :class:`HumanClient`
objects driven by the script, like a UI would be.

``--model test`` (the default) answers instantly and deterministically ("Acknowledged.");
``--model local:smollm2`` runs the bundled 135M-parameter model, which is weak: every example is
designed so that its protocol reaches its terminal state whatever the model says (a graph's
``max_turns``, a runaway budget, a TTL as the last resort). Any pydantic-ai model string works
too (``openai:gpt-4o`` with ``pip install -e '.[providers]'`` and its API key).

An example prints the thread as it unfolds (``sender: content``, lifecycle envelopes as
``-- ...`` lines), then ``status:`` and ``close_reason:`` of the thread(s) and ``outcome: ok``;
it exits 0 on the expected outcome and 1 otherwise (2 when it timed out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import structlog
from anyio.abc import TaskGroup

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import (
    AgentClient,
    ApiError,
    Envelope,
    HubClient,
    HumanClient,
    Passport,
    Thread,
)
from agent_network.client.hubclient import Handler

TEST_MODEL = "test"
LOCAL_MODEL = "local:smollm2"


@dataclass(frozen=True)
class Options:
    """The command line of an example: the agents' ``model``, the ``db`` file (None: a
    temporary file removed on exit) and the ``runner`` that answers for the agents:
    ``inproc`` (the server's in-process runner) or ``remote`` (a :class:`RemoteRunner` over the
    SDK against the same platform served on 127.0.0.1, the in-process runner off)."""

    model: str
    db: Path | None
    runner: str = "inproc"

    @property
    def deterministic(self) -> bool:
        """True with the ``test`` model (instant, always the same reply)."""
        return self.model == TEST_MODEL

    def seconds(self, test: float, other: float) -> float:
        """``test`` seconds with the test model, ``other`` with a real one (TTLs, timeouts)."""
        return test if self.deterministic else other


def parse_options(description: str, argv: list[str] | None = None) -> Options:
    """Parse ``[--model MODEL] [--db PATH] [--runner inproc|remote]`` (``description``: the
    example's one-line purpose)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        default=TEST_MODEL,
        help=f"the agents' model: {TEST_MODEL!r} (default, instant), {LOCAL_MODEL!r} (the bundled "
        "local model) or any pydantic-ai model string",
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file to keep the network in (default: a temporary file); each run creates "
        "a new org in it",
    )
    parser.add_argument(
        "--runner",
        choices=("inproc", "remote"),
        default="inproc",
        help="who runs the agents' routines: the in-process runner (default) or a remote runner "
        "over the SDK against the platform served on 127.0.0.1",
    )
    ns = parser.parse_args(argv)
    return Options(model=str(ns.model), db=ns.db, runner=str(ns.runner))


def run(main: Callable[[Options], Awaitable[bool]], description: str) -> None:
    """Parse the command line, run ``main(options)`` and exit 0 when it returns True, 1 when it
    returns False, 2 when it timed out."""
    quiet_logs()
    options = parse_options(description)
    try:
        ok = anyio.run(main, options)
    except (TimeoutError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(TimeoutError) is None:
            raise
        print("outcome: timed out", flush=True)
        sys.exit(2)
    print(f"outcome: {'ok' if ok else 'unexpected'}", flush=True)
    sys.exit(0 if ok else 1)


def quiet_logs() -> None:
    """Keep the platform's info logs out of the transcript (warnings still show, on stderr)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def is_message(env: Envelope) -> bool:
    """True for a ``message`` envelope."""
    return env.type == "message"


def messages(envs: Iterable[Envelope]) -> list[Envelope]:
    """The ``message`` envelopes of ``envs``, in order."""
    return [e for e in envs if is_message(e)]


def has_closed(envs: Iterable[Envelope]) -> bool:
    """True once ``thread.closed`` is among ``envs``."""
    return any(e.type == "thread.closed" for e in envs)


class Network:
    """One example run: the platform (an EmbeddedLink with the runner), a HubClient, everyone's
    names, and printers that follow threads.

    Use as ``async with Network(options) as net``. Every printer is a task of the network's
    task group, cancelled and awaited on exit.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.names: dict[str, str] = {}  # participant id -> display name
        self.seen: dict[str, list[Envelope]] = {}  # thread id -> envelopes printed so far
        self._changed = anyio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._hc: HubClient | None = None
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        inproc = self.options.runner == "inproc"
        link = await self._stack.enter_async_context(
            EmbeddedLink.open(self.options.db, run_routines=inproc, model=self.options.model)
        )
        self._hc = await self._stack.enter_async_context(HubClient(link))
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        if not inproc:
            await self._remote_runner(link)
        return self

    async def _remote_runner(self, link: EmbeddedLink) -> None:
        """Serve the platform on 127.0.0.1 (a free port) and run a :class:`RemoteRunner` with
        the org key against it, both as tasks of the network's task group."""
        import socket

        import uvicorn

        from agent_network.client import AsyncClient
        from agent_network.runtime.remote import RemoteRunner

        assert self._tg is not None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(
            link.app, host="127.0.0.1", port=port, lifespan="off", log_level="critical"
        )
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._tg.start_soon(server.serve)
        self._stack.callback(setattr, server, "should_exit", True)
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            await anyio.sleep(0.01)
        client = await self._stack.enter_async_context(
            AsyncClient(f"http://127.0.0.1:{port}", token=link.token)
        )
        runner = RemoteRunner(
            client, relist_seconds=0.2, poll_wait=5.0, default_model=self.options.model
        )
        await self._tg.start(runner.run)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def hc(self) -> HubClient:
        """The HubClient (acting with the org key of the example's org)."""
        assert self._hc is not None, "use the Network as an async context manager"
        return self._hc

    # ------------------------------------------------------------------ participants

    async def agent(
        self,
        name: str,
        identity: str,
        *,
        key: str | None = None,
        routine: bool = True,
        model: str | None = None,
        handler: Handler | None = None,
    ) -> AgentClient:
        """Register the agent ``name`` (lookup key ``key``, default ``name`` lower-cased) with
        the system prompt ``identity`` on ``model`` (default: the example's ``--model``); with
        ``routine`` it gets a ``participate`` routine, so the runner answers for it in its
        threads; ``handler`` makes it a code-defined agent (see ``AgentClient``)."""
        passport = Passport(name=name, lookup_key=key, identity=identity, model=model)
        agent = await self.hc.register(passport, handler=handler)
        if routine:
            await self.hc.rest.agents.routines.create(agent.id, f"participate-{agent.id}")
        self.names[agent.id] = name
        return agent

    async def person(self, name: str) -> HumanClient:
        """Register the person ``name`` (a user of the org with its own token)."""
        human = await self.hc.human(name)
        self.names[human.id] = name
        return human

    async def team_id(self) -> str:
        """Id of the team the HubClient puts everyone in."""
        teams = [t for t in await self.hc.rest.teams.list() if t.name == self.hc.team_name]
        return teams[0].id

    # ------------------------------------------------------------------ printing and waiting

    def watch(self, thread_id: str, label: str = "") -> None:
        """Print ``thread_id``'s envelopes as they are committed (from the first one), prefixed
        with ``[label]`` when given, until ``thread.closed``."""
        assert self._tg is not None, "use the Network as an async context manager"
        if thread_id in self.seen:
            return
        self.seen[thread_id] = []
        self._tg.start_soon(self._printer, thread_id, label)

    async def _printer(self, thread_id: str, label: str) -> None:
        prefix = f"[{label}] " if label else ""
        link = self.hc.link
        feed = link.follow(link.token, thread_id, after=0)
        try:
            async for env in feed:
                print(prefix + self.render(env), flush=True)
                self.seen[thread_id].append(env)
                self._changed.set()
                self._changed = anyio.Event()
                if env.type == "thread.closed":
                    return
        finally:
            aclose = getattr(feed, "aclose", None)
            if aclose is not None:  # an async generator: end its long-poll now
                await aclose()

    async def wait_until(
        self,
        thread_id: str,
        predicate: Callable[[list[Envelope]], bool],
        *,
        timeout: float,  # noqa: ASYNC109 (the example's deadline, in seconds)
    ) -> list[Envelope]:
        """The envelopes of ``thread_id`` printed so far, once ``predicate`` holds for them
        (the thread must be watched). TimeoutError after ``timeout`` seconds."""
        self.watch(thread_id)
        with anyio.fail_after(timeout):
            while not predicate(self.seen[thread_id]):
                await self._changed.wait()
        return self.seen[thread_id]

    async def until_closed(self, thread_id: str, *, timeout: float) -> Thread:  # noqa: ASYNC109
        """Wait until ``thread.closed`` was printed; the final state of the thread."""
        await self.wait_until(thread_id, has_closed, timeout=timeout)
        return await self.hc.rest.threads.get(thread_id)

    def render(self, env: Envelope) -> str:
        """One line for one envelope: ``sender: content`` for a message (with its audience and
        tool calls), ``-- ...`` for a lifecycle envelope."""
        who = env.sender.name if env.sender.kind != "system" else "hub"
        data = env.data
        if env.type == "message":
            line = f"{who}: {env.content}"
            if env.audience is not None:
                line += f"  (to {', '.join(self.names.get(a, a) for a in env.audience)})"
            calls = data.get("tool_calls") or []
            if calls:
                line += "  [tools: " + ", ".join(_call(c) for c in calls) + "]"
            return line
        if env.type == "thread.created":
            people = ", ".join(self.names.get(p[1], p[1]) for p in data.get("participants", []))
            adapter = data.get("adapter", "open")
            extra = f" with {people}" if people else ""
            return f"-- {adapter} thread {data.get('title')!r} opened{extra}"
        if env.type == "thread.ack":
            return f"-- {who} acks the invitation{' (automatically)' if data.get('auto') else ''}"
        if env.type == "thread.reject":
            return f"-- {who} rejects the invitation"
        if env.type in ("thread.closing", "thread.closed"):
            verb = "closing" if env.type == "thread.closing" else "closed"
            return f"-- {verb} ({data.get('reason', 'closed')}) by {who}"
        if env.type == "context.set":
            return f"-- {who} sets context {json.dumps(data.get('values'))}"
        return f"-- {env.type} {json.dumps(data, sort_keys=True)} by {who}"


def _call(call: dict[str, Any]) -> str:
    result = call.get("result")
    if isinstance(result, dict) and result.get("kind") == "handoff":
        return f"{call['name']} -> Handoff({result.get('target')})"
    if isinstance(result, dict) and result.get("kind") == "finish":
        return f"{call['name']} -> Finish({result.get('reason')})"
    return str(call.get("name"))


def report(thread: Thread, label: str = "") -> None:
    """Print the final ``status`` and ``close_reason`` of ``thread``."""
    prefix = f"[{label}] " if label else ""
    print(f"{prefix}status: {thread.status}", flush=True)
    print(f"{prefix}close_reason: {thread.close_reason}", flush=True)


async def refused(what: str, attempt: Awaitable[Any]) -> str | None:
    """Run ``attempt`` (a call the protocol should refuse) and print the refusal; returns the
    error code (None, with a note, when it was accepted)."""
    try:
        await attempt
    except ApiError as err:
        print(f"-- refused: {what}: {err.status} {err.code}: {err.message}", flush=True)
        return err.code
    print(f"-- NOT refused: {what}", flush=True)
    return None


@contextlib.asynccontextmanager
async def network(options: Options) -> AsyncIterator[Network]:
    """``async with network(options) as net`` (same as ``async with Network(options)``)."""
    async with Network(options) as net:
        yield net
