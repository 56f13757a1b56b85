"""The embedded link serves a hub client's messages and new threads without HTTP
(``EmbeddedLink.post`` / ``create_thread``), answering exactly what the REST calls answer:
the same envelope and thread shapes, the same refusals (credential permission, body
validation, scope), through the same one post function. On a real SQLite file, in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from agent_network.api.embedded import EmbeddedLink
from agent_network.client import ApiError, HubClient, Passport
from agent_network.client.rest import ThreadOptions

VOLATILE = {"id", "seq", "created_at", "hash", "prev_hash", "thread_id", "title", "content"}


def _shape(value: Any) -> Any:
    """A model's JSON without the fields that differ between two calls (ids, times)."""
    data = value.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in VOLATILE}


async def _error(call: Any) -> tuple[type[ApiError], int, str]:
    with pytest.raises(ApiError) as info:
        await call
    return type(info.value), info.value.status, info.value.code


def test_embedded_posts_and_threads_answer_as_rest_without_http(tmp_path: Path) -> None:
    async def main() -> None:
        async with EmbeddedLink.open(tmp_path / "e.db") as link, HubClient(link) as hc:
            requests: list[str] = []
            handle = link._transport.handle_async_request

            async def counted(request: httpx.Request) -> httpx.Response:
                requests.append(f"{request.method} {request.url.path}")
                return await handle(request)

            link._transport.handle_async_request = counted  # type: ignore[method-assign]
            alice = await hc.register(Passport(name="alice"))
            bob = await hc.register(Passport(name="bob"))
            rest = link.rest(link.token)
            team = await hc._team()

            # the hub client's open and send: no HTTP request
            requests.clear()
            channel = await alice.open(
                "over the link", target=bob.agent_id, adapter="open", agent_budget=7
            )
            sent = await channel.send("hello", audience=[bob.agent_id])
            assert requests == []
            assert (await channel.info()).agent_budget == 7
            assert sent.sender.id == alice.agent_id and sent.audience == [bob.agent_id]

            # the same calls over REST answer the same shapes
            participants = [("agent", alice.agent_id), ("agent", bob.agent_id)]
            via_link = await link.create_thread(
                link.token,
                team,
                "t1",
                agent_budget=9,
                visibility="restricted",
                participants=participants,
            )
            via_rest = await rest.teams.create_thread(
                team, "t2", agent_budget=9, visibility="restricted", participants=participants
            )
            assert _shape(via_link) == _shape(via_rest)
            posted = await link.post(alice.token, via_link.id, "one", causation_id=None)
            over_rest = await link.rest(alice.token).threads.post(via_rest.id, "one")
            assert _shape(posted) == _shape(over_rest)
            # an idempotent repeat answers the original, as over REST
            again = await link.post(alice.token, via_link.id, "x", idempotency_key="k1")
            assert (await link.post(alice.token, via_link.id, "y", idempotency_key="k1")) == again

            # the same refusals: body validation, scope, the credential's permission
            refusals = [
                (lambda c, t: c(alice.token, t, ""), lambda r, t: r.threads.post(t, "")),
                (
                    lambda c, t: c(alice.token, t, "hi", audience=[]),
                    lambda r, t: r.threads.post(t, "hi", audience=[]),
                ),
                (
                    lambda c, t: c(alice.token, "thr_0000000000000000", "hi"),
                    lambda r, t: r.threads.post("thr_0000000000000000", "hi"),
                ),
            ]
            for embedded, over in refusals:
                assert await _error(embedded(link.post, via_link.id)) == await _error(
                    over(link.rest(alice.token), via_rest.id)
                )
            reader = await rest.credentials.issue(
                "agent_token", subject_id=alice.agent_id, name="reader", scopes=["read"]
            )
            denied = await _error(link.post(reader.secret, via_link.id, "hi"))
            assert denied == await _error(link.rest(reader.secret).threads.post(via_rest.id, "hi"))
            assert denied[1] == 403
            bad = ThreadOptions(adapter="consulting", ttl=-1)
            assert await _error(
                link.create_thread(link.token, team, "bad", participants=participants, options=bad)
            ) == await _error(
                rest.teams.create_thread(
                    team, "bad", participants=participants, adapter="consulting", ttl=-1
                )
            )

    anyio.run(main)
