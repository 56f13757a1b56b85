"""Hub clients (HubClient, AgentClient, HumanClient) over both links: the same scenario runs in
process (EmbeddedLink, no socket) and against a live server over WebSocket (WsLink)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import ApiError, InvalidRequest, NotFound, Unauthenticated
from agent_network.client.hubclient import (
    HUBCLIENT_CURSOR,
    AgentClient,
    Channel,
    HubClient,
    HumanClient,
    Link,
    Passport,
    Resume,
    WsLink,
)
from agent_network.client.models import Envelope
from agent_network.store.cursors import read_cursor
from conftest import LiveServer, Org, sqlite_only

pytestmark = pytest.mark.engines("sqlite", "postgresql")

_ONE_LINK = (
    "the hub client's own behaviour over an embedded link; the engine under a hub client is "
    "covered by the open_link tests on both"
)

LinkFactory = Callable[[], contextlib.AbstractAsyncContextManager[Link]]


@pytest.fixture(params=["local", "ws"])
def open_link(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> Any:
    """A factory of links to ONE platform (same database / same server across calls), on a
    database of ``engine``."""
    pg: str | None = request.getfixturevalue("pg_db") if engine == "postgresql" else None
    if request.param == "local":
        db = pg or tmp_path / "local.db"
        token: list[str] = []

        @contextlib.asynccontextmanager
        async def local() -> AsyncIterator[Link]:
            async with EmbeddedLink.open(db, token=token[0] if token else None) as link:
                token[:] = [link.token]
                yield link

        return local
    srv = LiveServer(pg or tmp_path / "ws.db", ws_heartbeat=5.0)
    srv.start()
    request.addfinalizer(srv.stop)
    org = Org(srv, "Acme")

    @contextlib.asynccontextmanager
    async def remote() -> AsyncIterator[Link]:
        async with WsLink.connect(srv.url, org.key) as link:
            yield link

    return remote


def _answer(env: Envelope, channel: Channel) -> str | None:
    if env.sender.kind == "agent":
        return None  # answer people and agents that ask, never loop on replies
    return f"answer to: {env.content}"


async def _bob(env: Envelope, channel: Channel) -> str:
    return f"bob says {env.content!r} has {len(env.content or '')} characters"


def test_agents_open_send_handle_wait_and_read_the_wal(open_link: LinkFactory) -> None:
    async def main() -> None:
        async with open_link() as link, HubClient(link, discover=0.2) as hc:
            alice = await hc.register(
                Passport(name="Alice", identity="asks"), Resume(capabilities=["asking"])
            )
            bob = await hc.register(
                Passport(name="Bob"), Resume(domains=["counting"]), handler=_bob
            )
            assert alice.agent_id != bob.agent_id
            channel = await alice.open("a question", target="bob")
            question = await channel.send("how long is this?")
            assert question.sender.id == alice.agent_id and question.seq >= 2

            reply = await alice.wait_for(
                channel.thread_id,
                lambda e: e.type == "message" and e.sender.id == bob.agent_id,
                timeout=20,
            )
            assert reply.causation_id == question.id
            assert reply.content == "bob says 'how long is this?' has 17 characters"

            wal = await hc.read_wal(channel.thread_id)
            assert [e.seq for e in wal] == list(range(1, len(wal) + 1))
            assert wal[0].type == "thread.created"
            messages = [e for e in wal if e.type == "message"]
            assert [m.id for m in messages] == [question.id, reply.id]
            # the agent's own view of the WAL is the same thread
            assert [e.id for e in await alice.read_wal(channel.thread_id)] == [e.id for e in wal]
            # registering again reuses the persistent identity
            again = await hc.register(Passport(name="Bob"))
            assert again.agent_id == bob.agent_id

    anyio.run(main)


def test_agent_token_acts_only_as_itself(open_link: LinkFactory) -> None:
    async def main() -> None:
        async with open_link() as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="Alice"))
            bob = await hc.register(Passport(name="Bob"))
            carol = await hc.register(Passport(name="Carol"))
            private = await alice.open("alice and bob only", target="bob")
            # Carol is not a participant: her token does not even see the thread
            with pytest.raises(ApiError) as err:
                await carol.send(private.thread_id, "let me in")
            assert err.value.status == 404
            # Alice's token cannot post as Bob
            with pytest.raises(ApiError) as err:
                await alice.rest.threads.post(private.thread_id, "I am bob", agent_id=bob.id)
            assert err.value.status in (403, 404)
            assert {t.id for t in await carol.threads()}.isdisjoint({private.thread_id})

    anyio.run(main)


def test_human_pull_and_push(open_link: LinkFactory) -> None:
    async def main() -> None:
        async with open_link() as link, HubClient(link, discover=0.2) as hc:
            helper = await hc.register(Passport(name="Helper"), handler=_answer)
            ann = await hc.human("Ann")
            pushed: list[Envelope] = []
            ann.on_envelope(pushed.append)
            thread = await hc.rest.threads.create(
                "help desk", team_id=await hc._team(), visibility="members"
            )
            mine = await ann.send(thread.id, "where is my parcel?")
            seen: list[Envelope] = []
            with anyio.fail_after(20):
                while not any(e.sender.id == helper.agent_id for e in seen):
                    seen.append(await ann.next_envelope())
            assert mine.id in [e.id for e in seen]  # people see their own posts too
            reply = next(e for e in seen if e.sender.id == helper.agent_id)
            assert reply.content == "answer to: where is my parcel?"
            assert reply.causation_id == mine.id
            assert [e.id for e in pushed][: len(seen)] == [e.id for e in seen]

    anyio.run(main)


def test_delivery_resumes_after_restart_and_replies_are_not_repeated(
    open_link: LinkFactory,
) -> None:
    calls: list[str] = []

    def record(env: Envelope, channel: Channel) -> str:
        calls.append(env.content or "")
        return f"ok {env.content}"

    async def main() -> None:
        async with open_link() as link, HubClient(link, discover=0.2) as hc:
            await hc.register(Passport(name="Clerk"), handler=record)
            ann = await hc.human("Ann")
            thread = await hc.rest.threads.create(
                "orders", team_id=await hc._team(), visibility="members"
            )
            await ann.send(thread.id, "one")
            await ann.wait_for(thread.id, lambda e: e.content == "ok one", timeout=20)
            thread_id = thread.id
        # the clerk is offline: two more messages arrive
        async with open_link() as link, HubClient(link) as hc:
            ann = await hc.human("Ann")
            await ann.send(thread_id, "two")
            await ann.send(thread_id, "three")
        # back online: the missed ones are handled, in order (at-least-once: "one" may be handed
        # over again if the first session stopped between its reply and its acknowledgement)
        async with open_link() as link, HubClient(link, discover=0.2) as hc:
            clerk = await hc.register(Passport(name="Clerk"), handler=record)
            await clerk.wait_for(thread_id, lambda e: e.content == "ok three", timeout=20)
            wal = await hc.read_wal(thread_id)
        assert list(dict.fromkeys(calls)) == ["one", "two", "three"]
        assert calls.count("two") == calls.count("three") == 1  # acknowledged: not redelivered
        replies = [e for e in wal if e.sender.kind == "agent"]
        assert [r.content for r in replies] == ["ok one", "ok two", "ok three"]
        assert len({r.causation_id for r in replies}) == 3

    anyio.run(main)


def test_opening_with_an_unknown_target_says_which_name_is_missing(open_link: LinkFactory) -> None:
    async def main() -> None:
        async with open_link() as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="Alice"))
            with pytest.raises(ApiError) as err:
                await alice.open("to nobody", target=["nobody"])
            assert err.value.status == 404 and "'nobody'" in err.value.message
            # nothing was opened
            assert await alice.threads() == []

    anyio.run(main)


@sqlite_only(_ONE_LINK)
def test_hubclient_tokens_expire_and_are_renewed_while_it_runs(tmp_path: Path) -> None:
    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link:
            async with HubClient(link, token_ttl=3) as hc:
                alice = await hc.register(Passport(name="alice"))
                creds = {c.id: c for c in await hc.rest.credentials.list()}
                first = creds[alice.credential_id].expires_at
                assert first is not None
                await anyio.sleep(4.5)  # past the first expiry; renewed every second
                assert isinstance(await alice.rest.threads.list(), list)  # still authenticates
                creds = {c.id: c for c in await hc.rest.credentials.list()}
                later = creds[alice.credential_id].expires_at
                assert later is not None and later > first
            with pytest.raises(ValueError, match="token_ttl"):
                HubClient(link, token_ttl=0.5)

    anyio.run(main)


@sqlite_only(_ONE_LINK)
def test_embedded_link_speaks_sdk_errors_and_keeps_cursors_through_the_service(
    tmp_path: Path,
) -> None:
    """The embedded link (server side, ``api/embedded.py``) raises the SDK's errors, as REST
    would, and moves durable cursors through ``services.delivery``: forward only, never past
    the thread's last seq, and a follow from the cursor resumes after it."""

    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="alice"))
            await hc.register(Passport(name="bob"))
            carol = await hc.register(Passport(name="carol"))
            channel = await alice.open("two only", target="bob")
            await channel.send("one")
            last = await channel.send("two")
            with pytest.raises(NotFound):  # carol is not in the thread
                await anext(link.follow(carol.token, channel.thread_id))
            with pytest.raises(NotFound):
                await link.ack(carol.token, channel.thread_id, 1, "probe")
            with pytest.raises(InvalidRequest):  # beyond the last seq: nothing written
                await link.ack(alice.token, channel.thread_id, last.seq + 1, "probe")
            await link.ack(alice.token, channel.thread_id, last.seq - 1, "probe")
            await link.ack(alice.token, channel.thread_id, 1, "probe")  # never backwards
            stream = link.follow(alice.token, channel.thread_id, cursor="probe")
            try:
                first = await anext(stream)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            assert first.seq == last.seq and first.id == last.id

    anyio.run(main)


# --------------------------------------------------------------------------- push, not poll
# (docs/architecture.md, "Hub clients: push, not poll")


def _count_rest(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record ``METHOD path`` of every REST request any SDK client sends from now on."""
    seen: list[str] = []
    send = httpx.AsyncClient.send

    async def counting(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
        seen.append(f"{request.method} {request.url.path}")
        return await send(self, request, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "send", counting)
    return seen


def _count_sql(link: Link, needle: str) -> list[str]:
    """Record every SQL statement of the embedded link's engine that contains ``needle``."""
    assert isinstance(link, EmbeddedLink)
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if needle in statement:
            seen.append(statement)

    event.listen(link.services.ctx.engine.sync_engine, "before_cursor_execute", listener)
    return seen


async def _consult(alice: AgentClient, bob: AgentClient) -> str:
    channel = await alice.open("a question", target=bob.agent_id, adapter="consulting")
    await channel.send("what matters most?", audience=[bob.agent_id])
    await alice.wait_for(channel.thread_id, lambda e: e.type == "thread.closed", timeout=20)
    return channel.thread_id


def _hubclient_tasks() -> list[str]:
    """Names of the running tasks that follow or handle a thread for a HubClient."""
    return [
        t.get_name()
        for t in asyncio.all_tasks()
        if "HubClient._follower" in t.get_name() or "HubClient._worker" in t.get_name()
    ]


def test_hub_clients_never_poll_rest_and_still_discover_new_threads(
    open_link: LinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While nothing happens, a HubClient sends no REST request at all (no follow, envelope or
    discovery polling); a thread made later by someone else still reaches its agent (pushed)."""

    async def main() -> None:
        async with open_link() as link, HubClient(link, discover=0.2) as hc:
            helper = await hc.register(Passport(name="Helper"), handler=_answer)
            ann = await hc.human("Ann")
            first = await hc.rest.threads.create(
                "before", team_id=await hc._team(), visibility="members"
            )
            await ann.send(first.id, "one")
            await ann.wait_for(first.id, lambda e: e.sender.id == helper.agent_id, timeout=20)
            requests = _count_rest(monkeypatch)
            await anyio.sleep(2.5)  # idle: an old-style client polled every 0.2 s here
            assert requests == []
            later = await hc.rest.threads.create(
                "after", team_id=await hc._team(), visibility="members"
            )
            await ann.send(later.id, "two")
            reply = await ann.wait_for(
                later.id, lambda e: e.sender.id == helper.agent_id, timeout=20
            )
            assert reply.content == "answer to: two"

    anyio.run(main)


@sqlite_only(_ONE_LINK)
def test_thread_workers_stop_after_thread_closed(tmp_path: Path) -> None:
    """Nothing keeps following a thread once its ``thread.closed`` was handled."""

    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="alice"))
            bob = await hc.register(Passport(name="bob"), handler=_bob)
            for _ in range(3):
                await _consult(alice, bob)
            with anyio.fail_after(10):
                while _hubclient_tasks():  # noqa: ASYNC110 (polls the event loop's tasks)
                    await anyio.sleep(0.05)

    anyio.run(main)


@sqlite_only(_ONE_LINK)
def test_embedded_link_looks_a_credential_up_once_and_still_honours_revocation(
    tmp_path: Path,
) -> None:
    """REST calls over the embedded link authenticate a token once, not once per call; a
    revocation (the access epoch moves) takes effect at the next call and ends its inbox."""

    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="alice"))
            bob = await hc.register(Passport(name="bob"))
            channel = await alice.open("two of us", target=bob.agent_id)
            await alice.threads()
            lookups = _count_sql(link, "key_hash")
            for _ in range(20):
                await alice.threads()
            assert len(lookups) <= 2, lookups  # (1 s passing may re-check once)
            assert len(_pumps()) == 2
            await hc.rest.credentials.revoke(alice.credential_id)
            with pytest.raises(Unauthenticated):
                await alice.threads()
            after = await bob.send(channel.thread_id, "are you there?")
            with anyio.fail_after(10):  # alice's inbox ends before handing it over
                while len(_pumps()) > 1:  # noqa: ASYNC110 (polls the event loop's tasks)
                    await anyio.sleep(0.05)
            await bob.wait_for(channel.thread_id, lambda e: e.id == after.id, timeout=10)
            assert after.id not in [e.id for e in alice._seen.get(channel.thread_id, [])]

    anyio.run(main)


def _pumps() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if "HubClient._pump" in t.get_name()]


@sqlite_only(_ONE_LINK)
def test_wait_for_waits_on_what_arrives_without_reading_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait_for`` finds what the participant already received in memory and waits for the
    rest: no read of the thread's history per call."""

    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link, HubClient(link) as hc:
            alice = await hc.register(Passport(name="alice"))
            bob = await hc.register(Passport(name="bob"), handler=_bob)
            thread_id = await _consult(alice, bob)
            requests = _count_rest(monkeypatch)
            for kind in ("thread.created", "message", "thread.closed", "thread.ack"):
                found = await alice.wait_for(thread_id, lambda e, k=kind: e.type == k, timeout=5)
                assert found.type == kind
            assert not [r for r in requests if r.endswith("/envelopes")], requests

    anyio.run(main)


@sqlite_only(_ONE_LINK)
def test_acknowledgements_are_batched_and_durable(tmp_path: Path) -> None:
    """Handled envelopes are acknowledged in batches (far fewer cursor writes than envelopes
    delivered), and on exit every cursor stands at the last envelope handled, so a restarted
    process resumes after it."""

    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "hub.db") as link:
            async with HubClient(link) as hc:
                alice = await hc.register(Passport(name="alice"))
                bob = await hc.register(Passport(name="bob"), handler=_bob)
                writes = _count_sql(link, "cursors (")  # (the upserts)
                threads = []
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(lambda: _track(threads, _consult(alice, bob)))
            hub = link.services.ctx.hub
            delivered = sum([2 * (await hub.state(t)).last_seq for t in threads])  # both see all
            assert delivered >= 6 * 2 * 4
            assert len(writes) <= delivered // 2, (len(writes), delivered)
            async with link.services.ctx.engine.connect() as conn:
                for thread_id in threads:
                    last = (await link.services.ctx.hub.state(thread_id)).last_seq
                    for who in (alice, bob):
                        assert await read_cursor(conn, who.id, HUBCLIENT_CURSOR, thread_id) == last

    anyio.run(main)


async def _track(out: list[str], exchange: Any) -> None:
    out.append(await exchange)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["thr_a", "thr_b", "thr_c"]), st.integers(1, 8), st.integers(0, 8)
        ),
        max_size=40,
    )
)
@settings(max_examples=200, deadline=None)
def test_redelivered_envelopes_are_handed_over_once_in_order(
    pushes: list[tuple[str, int, int]],
) -> None:
    """Whatever an inbox redelivers after reconnects (a thread resent from any earlier
    position), a participant hands every (thread, seq) to its handler once, in seq order."""
    who = HumanClient(None, "user", "usr_1", "Ann", "token", "cred_1")  # type: ignore[arg-type]
    sent: dict[str, int] = {}  # what the "server" pushed so far per thread
    handed: list[tuple[str, int]] = []
    for thread_id, more, back in pushes:
        top = sent.get(thread_id, 0)
        start = max(0, top - back)  # a replay from an earlier cursor, then new envelopes
        for seq in range(start + 1, top + more + 1):
            env = Envelope.model_validate(
                {
                    "id": f"env_{thread_id}_{seq}",
                    "thread_id": thread_id,
                    "seq": seq,
                    "type": "message",
                    "sender": {"kind": "user", "id": "usr_2", "name": "Bo"},
                    "created_at": "2026-01-01T00:00:00Z",
                    "hash": "0" * 64,
                    "prev_hash": "0" * 64,
                }
            )
            if who._received(env):
                handed.append((thread_id, seq))
        sent[thread_id] = top + more
    assert len(handed) == len(set(handed))
    for thread_id, top in sent.items():
        assert [s for t, s in handed if t == thread_id] == list(range(1, top + 1))
