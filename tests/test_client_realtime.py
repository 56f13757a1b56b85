"""The SDK's realtime rooms against the real WebSocket endpoint (uvicorn on 127.0.0.1).

Join replays the history and switches to live envelopes in seq order; posts are idempotent;
durable cursors resume after an ack; typing reaches the other connections; a room ends with
NotFound when access is lost; and across a server restart, a ``lagged`` disconnect or an
overflow of the room's own buffer the consumer sees every envelope exactly once, in order. The
README quickstart (``examples/quickstart.py``) runs end to end in its own process.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent_network.client import (
    AsyncClient,
    Envelope,
    InvalidAudience,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Room,
    Typing,
    Unauthenticated,
)
from agent_network.runtime.models import TEST_MODEL_REPLY
from conftest import LiveServer

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30  # seconds a step may take before the test is declared hung (not a timing assertion)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    anyio.run(scenario)


async def new_org(srv: LiveServer, name: str = "Org") -> tuple[AsyncClient, str]:
    async with AsyncClient(srv.url, srv.admin_key) as admin:
        created = await admin.orgs.create(f"{name}-{uuid.uuid4().hex[:6]}")
    return AsyncClient(srv.url, created.secret), created.secret


async def setup_thread(client: AsyncClient) -> tuple[str, str]:
    """A team with one user; returns (thread id, user id)."""
    user = await client.users.create("Ann")
    team = await client.teams.create("Team")
    await client.teams.add_member(team.id, user_id=user.id)
    thread = await client.threads.create("Room", team_id=team.id)
    return thread.id, user.id


async def take(room: Room, n: int) -> list[Envelope]:
    out: list[Envelope] = []
    with anyio.fail_after(WAIT):
        while len(out) < n:
            out.append(await anext(room))
    return out


async def post_many(client: AsyncClient, thread_id: str, user_id: str, n: int, tag: str) -> None:
    """``n`` concurrent REST posts (they commit in groups, so fan-out gets bursts)."""
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(
                functools.partial(client.threads.post, thread_id, f"{tag}{i}", user_id=user_id)
            )


def test_join_replays_history_then_live_in_order(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            for i in range(3):
                await client.threads.post(thread_id, f"before {i}", user_id=ann)
            async with client.realtime() as rt:
                assert rt.principal is not None and rt.principal.kind == "org"
                room = await rt.join(thread_id)
                assert room.last_joined == 4
                replayed = await take(room, 4)
                assert [e.seq for e in replayed] == [1, 2, 3, 4]
                assert replayed[0].type == "thread.created"
                assert [e.content for e in replayed[1:]] == ["before 0", "before 1", "before 2"]
                await post_many(client, thread_id, ann, 20, "live ")
                live = await take(room, 20)
                assert [e.seq for e in live] == list(range(5, 25))
                assert sorted(e.content or "" for e in live) == sorted(
                    f"live {i}" for i in range(20)
                )
                assert room.last_seq == 24 and room.buffered == 0
                # the room saw exactly what the REST history holds
                history = [e async for e in client.threads.history(thread_id)]
                assert [e.id for e in replayed + live] == [e.id for e in history]

                # a second connection joining after=22 gets only what follows
                async with client.realtime() as rt2:
                    tail = await rt2.join(thread_id, after=22)
                    assert [e.seq for e in await take(tail, 2)] == [23, 24]
                await room.leave()
                with pytest.raises(StopAsyncIteration):
                    await anext(room)
                assert rt.rooms == {}

    run(scenario)


def test_join_errors_leave_the_connection_usable(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server, "A")
        other, _ = await new_org(module_server, "B")
        async with client, other:
            thread_id, ann = await setup_thread(client)
            async with other.realtime() as rt:
                with pytest.raises(NotFound) as err:  # another org's thread: like a missing one
                    await rt.join(thread_id)
                assert err.value.code == "not_found"
                with pytest.raises(NotFound):
                    await rt.join("thr_missing")
                assert rt.rooms == {} and rt.connected
            async with client.realtime() as rt:
                with pytest.raises(InvalidRequest):
                    await rt.join(thread_id, after=99)  # beyond the last seq
                room = await rt.join(thread_id)
                with pytest.raises(ValueError):
                    await rt.join(thread_id)
                with pytest.raises(InvalidRequest):
                    await room.post("", user_id=ann)
                with pytest.raises(NotFound):
                    await room.post("as a stranger", user_id="usr_missing")
                env = await room.post("still connected", user_id=ann)
                assert env.seq == 2 and rt.reconnects == 0
                assert [e.seq for e in await take(room, 2)] == [1, 2]

        async with AsyncClient(module_server.url, "an_org_wrong") as nobody:
            with pytest.raises(Unauthenticated):
                async with nobody.realtime():
                    pass

    run(scenario)


def test_post_is_idempotent_and_posts_as_the_credential(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            bot = await client.agents.create("Bot", "bot")
            team_id = (await client.threads.get(thread_id)).team_id
            await client.teams.add_member(team_id, agent_id=bot.id)
            token = (await client.credentials.issue("agent_token", subject_id=bot.id)).secret
            async with client.realtime() as rt:
                room = await rt.join(thread_id, after=1)
                first = await room.post("once", user_id=ann, idempotency_key="k-1")
                again = await room.post("once", user_id=ann, idempotency_key="k-1")
                assert again.id == first.id and again.seq == first.seq == 2
                assert first.idempotency_key == "k-1"
                auto = await room.post("auto key", user_id=ann)
                assert auto.idempotency_key and auto.idempotency_key.startswith("rt-")
                # REST and WebSocket share the key space of one sender
                rest = await client.threads.post(
                    thread_id, "once", user_id=ann, idempotency_key="k-1"
                )
                assert rest.id == first.id
                received = await take(room, 2)
                assert [e.id for e in received] == [first.id, auto.id]

            async with AsyncClient(module_server.url, token) as as_bot, as_bot.realtime() as rt:
                assert rt.principal is not None and rt.principal.kind == "agent"
                room = await rt.join(thread_id)
                mine = await room.post("from the bot's own token")
                assert (mine.sender.kind, mine.sender.id) == ("agent", bot.id)
                with pytest.raises(PermissionDenied):  # a token cannot speak for someone else
                    await room.post("impersonation", user_id=ann)
            assert (await client.threads.get(thread_id)).last_seq == mine.seq

    run(scenario)


def test_cursor_ack_resumes_where_acknowledged(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            for i in range(4):
                await client.threads.post(thread_id, f"m{i}", user_id=ann)
            async with client.realtime() as rt:
                room = await rt.join(thread_id, cursor="worker")
                assert [e.seq for e in await take(room, 3)] == [1, 2, 3]
                assert await room.ack() == 3  # the last seq handed out
            async with client.realtime() as rt:
                room = await rt.join(thread_id, cursor="worker")
                assert [e.seq for e in await take(room, 2)] == [4, 5]
                assert await room.ack(5) == 5
                assert await room.ack(2) in (2, 5)  # never moves back
            async with client.realtime() as rt:
                room = await rt.join(thread_id, cursor="worker")
                await client.threads.post(thread_id, "after the ack", user_id=ann)
                (env,) = await take(room, 1)
                assert (env.seq, env.content) == (6, "after the ack")
                team_id = (await client.threads.get(thread_id)).team_id
                other = await rt.join((await client.threads.create("Other", team_id=team_id)).id)
                with pytest.raises(ValueError):  # no cursor name to ack with
                    await other.ack()

    run(scenario)


def test_typing_reaches_other_connections(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            seen: list[Typing] = []
            got = anyio.Event()

            def on_typing(event: Typing) -> None:
                seen.append(event)
                got.set()

            async with client.realtime() as watcher, client.realtime() as typist:
                room = await watcher.join(thread_id)
                room.on("typing", on_typing)
                typing_room = await typist.join(thread_id)
                with anyio.fail_after(WAIT):
                    while not got.is_set():  # typing is ephemeral: repeat until one arrives
                        await typing_room.typing(user_id=ann)
                        with anyio.move_on_after(0.2):
                            await got.wait()
                assert seen[0].thread_id == thread_id
                assert (seen[0].sender.kind, seen[0].sender.id) == ("user", ann)
                with pytest.raises(ValueError):
                    room.on("nonsense", on_typing)  # type: ignore[arg-type]

    run(scenario)


def test_envelope_callback_pushes_in_order(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            seqs: list[int] = []
            done = anyio.Event()

            async def on_envelope(env: Envelope) -> None:
                seqs.append(env.seq)
                if env.seq == 6:
                    done.set()

            async with client.realtime() as rt:
                room = await rt.join(thread_id)
                room.on("envelope", on_envelope)
                with pytest.raises(ValueError):
                    room.on("envelope", on_envelope)
                await post_many(client, thread_id, ann, 5, "push ")
                with anyio.fail_after(WAIT):
                    await done.wait()
            assert seqs == [1, 2, 3, 4, 5, 6]

    run(scenario)


def test_room_ends_with_not_found_when_access_is_lost(module_server: LiveServer) -> None:
    async def scenario() -> None:
        host, _ = await new_org(module_server, "Host")
        guest, _ = await new_org(module_server, "Guest")
        async with host, guest:
            hann = await host.users.create("Hann")
            gbot = await guest.agents.create("Guest Bot", "gbot")
            net = await host.networks.create("Net")
            await host.networks.add_member(net.id, user_id=hann.id)
            code = (await host.networks.invites.create(net.id)).join_code
            assert code is not None
            joined = await guest.networks.join(code, agent_ids=[gbot.id])
            thread = await host.threads.create("Shared", network_id=net.id)
            async with guest.realtime() as rt:
                room = await rt.join(thread.id)
                await host.threads.post(thread.id, "welcome", user_id=hann.id)
                assert [e.seq for e in await take(room, 2)] == [1, 2]
                await host.networks.visas.revoke(net.id, joined.visa_id)
                await host.threads.post(thread.id, "not for the guest", user_id=hann.id)
                with anyio.fail_after(WAIT), pytest.raises(NotFound):
                    while True:
                        env = await anext(room)
                        assert env.content != "not for the guest"
                assert thread.id not in rt.rooms

    run(scenario)


@pytest.fixture
def small_buffer_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path / "an.db", ws_buffer=8)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_reconnect_after_restart_and_lag_sees_every_envelope_once(
    small_buffer_server: LiveServer,
) -> None:
    srv = small_buffer_server

    async def scenario() -> None:
        client, _ = await new_org(srv)
        async with client:
            thread_id, ann = await setup_thread(client)
            async with client.realtime(max_backoff=0.5) as rt:
                room = await rt.join(thread_id)
                seen = await take(room, 1)

                # a burst larger than the server's buffer (8 frames): `disconnect` `lagged`,
                # the client reconnects and resumes from the last seq it received. Posts over
                # a second socket arrive fast enough to be committed (and fanned out) in groups.
                async with client.realtime() as poster:
                    sender = await poster.join(thread_id, after=1)
                    for burst in range(20):
                        async with anyio.create_task_group() as tg:
                            for i in range(40):
                                tg.start_soon(
                                    functools.partial(sender.post, f"b{burst}-{i}", user_id=ann)
                                )
                        if rt.last_disconnect is not None:
                            break
                    await sender.leave()
                assert rt.last_disconnect is not None
                assert rt.last_disconnect["reason"] == "lagged"
                last = (await client.threads.get(thread_id)).last_seq
                seen += await take(room, last - 1)

                # the server restarts (same port, same database) while messages keep coming
                await client.threads.post(thread_id, "before restart", user_id=ann)
                reconnects = rt.reconnects
                await anyio.to_thread.run_sync(srv.restart)
                await client.threads.post(thread_id, "after restart", user_id=ann)
                await post_many(client, thread_id, ann, 10, "later-")
                seen += await take(room, 12)
                assert rt.reconnects > reconnects

            history = [e async for e in client.threads.history(thread_id)]
            assert [e.id for e in seen] == [e.id for e in history]
            assert [e.seq for e in seen] == list(range(1, len(history) + 1))

    run(scenario)


def test_room_buffer_overflow_rejoins_without_loss(module_server: LiveServer) -> None:
    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            async with client.realtime() as rt:
                room = await rt.join(thread_id, buffer=5)
                await post_many(client, thread_id, ann, 30, "m")
                with anyio.fail_after(WAIT):
                    while not room.stale:  # noqa: ASYNC110 (the reader fills the buffer)
                        await anyio.sleep(0.01)
                assert room.buffered == 5
                seen = await take(room, 31)
                assert [e.seq for e in seen] == list(range(1, 32))
                assert room.rejoins >= 1 and rt.reconnects == 0

    run(scenario)


def test_quickstart_example_runs_end_to_end(module_server: LiveServer) -> None:
    example = (ROOT / "examples" / "quickstart.py").read_text()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert example[example.index("import asyncio") :] in blocks, "README quickstart != example"

    async def org_key() -> str:
        _, key = await new_org(module_server, "Quickstart")
        return key

    key = anyio.run(org_key)
    env = {**os.environ, "AGENT_NETWORK_URL": module_server.url, "AGENT_NETWORK_TOKEN": key}

    def run_example() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    done = run_example()
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[Alex Rivera] Research the current state of AI agent frameworks")
    speakers = {line.split("]")[0].lstrip("[") for line in lines[1:]}
    assert speakers == {"Research Agent", "Writer Agent"}
    assert all(line.endswith(TEST_MODEL_REPLY) for line in lines[1:])

    async def check_thread() -> None:
        async with AsyncClient(module_server.url, key) as client:
            (thread,) = await client.threads.list()
            messages = [e async for e in client.threads.history(thread.id, messages_only=True)]
            printed = [f"[{e.sender.name}] {e.content}" for e in messages[: len(lines)]]
            assert printed == lines  # the room printed the thread's messages, in order, once

    anyio.run(check_thread)

    # a second run reuses the two agents and their routines: no 409, one answer each again
    again = run_example()
    assert again.returncode == 0, again.stderr
    replies = [line for line in again.stdout.splitlines() if line.startswith("[")][1:]
    assert {line.split("]")[0].lstrip("[") for line in replies} == speakers

    async def check_reuse() -> None:
        async with AsyncClient(module_server.url, key) as client:
            agents = await client.agents.list()
            assert sorted(a.lookup_key for a in agents) == ["researcher", "writer"]
            for a in agents:
                assert len(await client.agents.routines.list(a.id)) == 1
            assert len(await client.threads.list()) == 2

    anyio.run(check_reuse)


def test_room_post_with_an_audience_reaches_only_that_audience(module_server: LiveServer) -> None:
    """``Room.post(audience=...)``: the envelope carries the audience; a member outside it never
    receives it live, a member inside does; a stranger id is refused with InvalidAudience."""

    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            thread_id, ann = await setup_thread(client)
            team_id = (await client.threads.get(thread_id)).team_id
            bob = await client.users.create("Bob")
            cid = await client.users.create("Cid")
            for u in (bob, cid):
                await client.teams.add_member(team_id, user_id=u.id)
            tokens = {
                u: (await client.credentials.issue("user_token", subject_id=u)).secret
                for u in (bob.id, cid.id)
            }
            async with (
                AsyncClient(module_server.url, tokens[bob.id]) as as_bob,
                AsyncClient(module_server.url, tokens[cid.id]) as as_cid,
                as_bob.realtime() as rt_bob,
                as_cid.realtime() as rt_cid,
                client.realtime() as rt,
            ):
                bob_room = await rt_bob.join(thread_id, after=1)
                cid_room = await rt_cid.join(thread_id, after=1)
                room = await rt.join(thread_id, after=1)
                private = await room.post("for Bob only", user_id=ann, audience=[bob.id])
                assert private.audience == [bob.id]
                public = await room.post("for everyone", user_id=ann)
                assert [e.id for e in await take(bob_room, 2)] == [private.id, public.id]
                assert [e.id for e in await take(cid_room, 1)] == [public.id]
                with pytest.raises(InvalidAudience):
                    await room.post("to a stranger", user_id=ann, audience=["usr_nobody"])

    run(scenario)


def test_watch_pushes_every_readable_thread_acks_in_batches_and_ends_on_revocation(
    module_server: LiveServer,
) -> None:
    """``watch`` (what hub clients use over WebSocket): every thread the credential may read,
    threads made later included, each resuming after the durable cursor; ``acks`` moves many
    threads at once; nothing of a thread it may not read; a revocation ends it."""

    async def collect(watch: Any, n: int) -> list[Envelope]:
        got: list[Envelope] = []
        with anyio.fail_after(WAIT):
            while len(got) < n:
                got.extend(await watch.receive())
        return got

    async def scenario() -> None:
        client, _ = await new_org(module_server)
        async with client:
            first, ann = await setup_thread(client)
            await client.threads.post(first, "m1", user_id=ann)
            team_id = (await client.threads.get(first)).team_id
            bot = await client.agents.create("Bot", f"bot-{uuid.uuid4().hex[:6]}")
            await client.teams.add_member(team_id, agent_id=bot.id)
            hidden = await client.threads.create(
                "not ann's",
                team_id=team_id,
                visibility="restricted",
                participants=[("agent", bot.id)],
            )
            await client.threads.post(hidden.id, "secret", agent_id=bot.id)
            token = (await client.credentials.issue("user_token", subject_id=ann)).secret
            async with AsyncClient(module_server.url, token) as ann_client:
                async with ann_client.realtime() as rt:
                    watch = await rt.watch("ui")
                    got = await collect(watch, 2)
                    assert [(e.thread_id, e.seq) for e in got] == [(first, 1), (first, 2)]
                    later = (await client.threads.create("later", team_id=team_id)).id
                    await client.threads.post(later, "m2", user_id=ann)
                    got = await collect(watch, 2)
                    assert [(e.thread_id, e.seq) for e in got] == [(later, 1), (later, 2)]
                    await watch.ack({first: 2, later: 1})
                    with pytest.raises(InvalidRequest):  # beyond the last seq: nothing moved
                        await watch.ack({later: 9})
                async with ann_client.realtime() as rt:  # resumes after the cursor
                    watch = await rt.watch("ui")
                    got = await collect(watch, 1)
                    assert [(e.thread_id, e.seq) for e in got] == [(later, 2)]
                    assert hidden.id not in {e.thread_id for e in got}
                    creds = [c for c in await client.credentials.list() if c.kind == "user_token"]
                    await client.credentials.revoke(creds[-1].id)
                    await client.threads.post(first, "after the revocation", user_id=ann)
                    with anyio.fail_after(WAIT), pytest.raises(Unauthenticated):
                        while True:
                            for env in await watch.receive():
                                assert env.content != "after the revocation"

    run(scenario)
