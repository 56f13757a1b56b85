"""Hub clients (HubClient, AgentClient, HumanClient) over both links: the same scenario runs in
process (EmbeddedLink, no socket) and against a live server over WebSocket (WsLink)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import ApiError, InvalidRequest, NotFound
from agent_network.client.hubclient import (
    Channel,
    HubClient,
    Link,
    Passport,
    Resume,
    WsLink,
)
from agent_network.client.models import Envelope
from conftest import LiveServer, Org

LinkFactory = Callable[[], contextlib.AbstractAsyncContextManager[Link]]


@pytest.fixture(params=["local", "ws"])
def open_link(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory of links to ONE platform (same database / same server across calls)."""
    if request.param == "local":
        db = tmp_path / "local.db"
        token: list[str] = []

        @contextlib.asynccontextmanager
        async def local() -> AsyncIterator[Link]:
            async with EmbeddedLink.open(db, token=token[0] if token else None) as link:
                token[:] = [link.token]
                yield link

        return local
    srv = LiveServer(tmp_path / "ws.db", ws_heartbeat=5.0)
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
