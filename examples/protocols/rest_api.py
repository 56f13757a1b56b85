"""The protocol REST API, request by request: every JSON body and answer, as sent and received.

``docs/protocols.md`` quotes its output. It drives the API with plain JSON (httpx against the
in-process app of an EmbeddedLink, exactly what ``curl`` would send to a server) with the org key,
posting as each agent in turn (``agent_id``); no routine runs, so nothing answers on its own.

Sections: consulting (open, audience, out of turn, bad audience, the reply closes it);
conversation with a person (explicit ack, reject); discussion (``order`` knob); workflow (graph
JSON, tools, Handoff, context, Finish); expectations (``reply_within`` -> notify,
``max_silence`` -> auto_close); a custom adapter (``register_adapter``).

    .venv/bin/python examples/protocols/rest_api.py [--db PATH]   (--model is ignored)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import httpx
from _common import Options, quiet_logs, run

from agent_network.api.embedded import EmbeddedLink
from agent_network.errors import NotYourTurnError
from agent_network.protocol import (
    AgentTarget,
    BaseAdapter,
    FromSpeaker,
    Proposal,
    TerminateTarget,
    ThreadState,
    ToolCalled,
    ToolSpec,
    Transition,
    TransitionGraph,
    register_adapter,
)


class BroadcastAdapter(BaseAdapter):
    """A custom protocol: only the initiator speaks (the others listen)."""

    name = "broadcast"
    min_participants = 2

    def validate(self, state: ThreadState, proposal: Proposal) -> None:
        super().validate(state, proposal)
        assert state.initiator is not None
        if proposal.type == "message" and proposal.sender.id != state.initiator[1]:
            raise NotYourTurnError("only the initiator speaks in a broadcast thread")

    def expected_speaker(self, state: ThreadState) -> str | None:
        assert state.initiator is not None
        return state.initiator[1]


class Tour:
    """Raw JSON calls that print themselves."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.failures: list[str] = []

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        expect: int,
        show: bool = True,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send ``body`` to ``/api/v1{path}``; print request and answer when ``show``; note a
        failure when the status is not ``expect``."""
        r = await self.http.request(method, "/api/v1" + path, json=body, params=params)
        answer = r.json() if r.content else None
        if show:
            query = "?" + "&".join(f"{k}={v}" for k, v in (params or {}).items()) if params else ""
            print(f"\n{method} /api/v1{path}{query}")
            if body is not None:
                print(json.dumps(body, indent=2))
            print(f"-> {r.status_code}")
            print(json.dumps(answer, indent=2))
        if r.status_code != expect:
            self.failures.append(f"{method} {path}: {r.status_code} (expected {expect})")
        return answer

    async def wait_status(self, thread_id: str, status: str, seconds: float = 20) -> Any:
        """Poll ``GET /threads/{id}`` (not printed) until ``status``."""
        with anyio.fail_after(seconds):
            while True:
                thread = await self.call("GET", f"/threads/{thread_id}", expect=200, show=False)
                if thread["status"] == status:
                    return thread
                await anyio.sleep(0.2)


def section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


async def main(options: Options) -> bool:
    register_adapter(BroadcastAdapter())
    async with EmbeddedLink.open(options.db) as link:
        transport = httpx.ASGITransport(app=link.app)
        headers = {"Authorization": f"Bearer {link.token}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://local", headers=headers
        ) as http:
            tour = Tour(http)
            await steps(tour)
    for failure in tour.failures:
        print("unexpected:", failure, file=sys.stderr)
    return not tour.failures


async def steps(t: Tour) -> None:
    section("setup: agents ann, bob, cat; a person una; a team with all of them")
    ids: dict[str, str] = {}
    for name in ("ann", "bob", "cat"):
        agent = await t.call(
            "POST", "/agents", {"name": name, "lookup_key": name}, expect=201, show=False
        )
        ids[name] = agent["id"]
    una = await t.call("POST", "/users", {"name": "una"}, expect=201, show=False)
    ids["una"] = una["id"]
    team = await t.call("POST", "/teams", {"name": "crew"}, expect=201, show=False)
    for name in ("ann", "bob", "cat"):
        await t.call(
            "POST", f"/teams/{team['id']}/members", {"agent_id": ids[name]}, expect=201, show=False
        )
    await t.call(
        "POST", f"/teams/{team['id']}/members", {"user_id": una["id"]}, expect=201, show=False
    )
    print(json.dumps(ids, indent=2))
    ann, bob, cat = ids["ann"], ids["bob"], ids["cat"]
    threads = f"/teams/{team['id']}/threads"

    section("consulting: open (bob acks automatically), out of turn, bad audience, ask, reply")
    consult = await t.call(
        "POST",
        threads,
        {
            "title": "one question",
            "adapter": "consulting",
            "participants": [{"kind": "agent", "id": ann}, {"kind": "agent", "id": bob}],
            "ttl": 3600,
        },
        expect=201,
    )
    cid = consult["id"]
    await t.call("POST", f"/threads/{cid}/messages", {"content": "hi", "agent_id": bob}, expect=409)
    await t.call(
        "POST",
        f"/threads/{cid}/messages",
        {"content": "2+2?", "agent_id": ann, "audience": [cat]},
        expect=422,
    )
    await t.call(
        "POST",
        f"/threads/{cid}/messages",
        {"content": "What is 2+2?", "agent_id": ann, "audience": [bob]},
        expect=201,
    )
    await t.call("POST", f"/threads/{cid}/messages", {"content": "4", "agent_id": bob}, expect=201)
    await t.wait_status(cid, "closed")
    await t.call("GET", f"/threads/{cid}", expect=200)
    await t.call(
        "POST", f"/threads/{cid}/messages", {"content": "again?", "agent_id": ann}, expect=409
    )

    section("conversation with a person: invited until una acks; a rejected one")
    conv = await t.call(
        "POST",
        threads,
        {
            "title": "chat with una",
            "adapter": "conversation",
            "participants": [{"kind": "agent", "id": ann}, {"kind": "user", "id": una["id"]}],
            "ack_timeout": 600,
        },
        expect=201,
    )
    await t.call(
        "POST",
        f"/threads/{conv['id']}/messages",
        {"content": "hello?", "agent_id": ann},
        expect=409,
    )
    await t.call("POST", f"/threads/{conv['id']}/ack", {"user_id": una["id"]}, expect=200)
    await t.call("POST", f"/threads/{conv['id']}/close", {"reason": "done"}, expect=200)
    declined = await t.call(
        "POST",
        threads,
        {
            "title": "another chat",
            "adapter": "conversation",
            "participants": [{"kind": "agent", "id": ann}, {"kind": "user", "id": una["id"]}],
        },
        expect=201,
        show=False,
    )
    await t.call(
        "POST",
        f"/threads/{declined['id']}/reject",
        {"user_id": una["id"], "reason": "busy"},
        expect=200,
    )

    section("discussion: explicit order, out of turn refused")
    disc = await t.call(
        "POST",
        threads,
        {
            "title": "panel",
            "adapter": "discussion",
            "participants": [
                {"kind": "agent", "id": ann},
                {"kind": "agent", "id": bob},
                {"kind": "agent", "id": cat},
            ],
            "order": [ann, cat, bob],
            "agent_budget": 10,
        },
        expect=201,
    )
    did = disc["id"]
    await t.call(
        "POST",
        f"/threads/{did}/messages",
        {"content": "I open.", "agent_id": ann},
        expect=201,
        show=False,
    )
    await t.call(
        "POST", f"/threads/{did}/messages", {"content": "Me next?", "agent_id": bob}, expect=409
    )
    await t.call(
        "POST",
        f"/threads/{did}/messages",
        {"content": "My turn.", "agent_id": cat},
        expect=201,
        show=False,
    )
    await t.call("GET", f"/threads/{did}", expect=200)

    section("workflow: graph JSON, tools, Handoff, context, Finish")
    graph = TransitionGraph(
        initial_speaker="ann",
        transitions=[
            Transition(ToolCalled("approve"), TerminateTarget("approved"), priority=10),
            Transition(FromSpeaker("ann"), AgentTarget("bob")),
            Transition(FromSpeaker("bob"), AgentTarget("cat")),
        ],
        max_turns=8,
        tools=[
            ToolSpec("request_revision", "Send the draft back", speakers=("cat",), handoff="bob"),
            ToolSpec("approve", "Approve the draft", speakers=("cat",)),
            ToolSpec("publish", "Publish and finish", speakers=("cat",), finish="finished"),
        ],
    )
    wf = await t.call(
        "POST",
        threads,
        {
            "title": "article",
            "adapter": "workflow",
            "participants": [
                {"kind": "agent", "id": ann},
                {"kind": "agent", "id": bob},
                {"kind": "agent", "id": cat},
            ],
            "graph": graph.to_dict(),
            "agent_budget": 10,
        },
        expect=201,
    )
    wid = wf["id"]
    await t.call(
        "POST",
        f"/threads/{wid}/messages",
        {"content": "Facts: ...", "agent_id": ann},
        expect=201,
        show=False,
    )
    await t.call(
        "POST",
        f"/threads/{wid}/messages",
        {"content": "Draft 1", "agent_id": bob},
        expect=201,
        show=False,
    )
    await t.call("GET", f"/threads/{wid}/tools", expect=200, params={"agent_id": cat})
    await t.call(
        "POST",
        f"/threads/{wid}/messages",
        {
            "content": "Needs an example.",
            "agent_id": cat,
            "tool_calls": [
                {
                    "name": "request_revision",
                    "args": {"reason": "add an example"},
                    "result": {"kind": "handoff", "target": "bob", "reason": "add an example"},
                }
            ],
        },
        expect=201,
    )
    await t.call(
        "POST",
        f"/threads/{wid}/context",
        {"values": {"stage": "revision"}, "agent_id": bob},
        expect=200,
    )
    await t.call(
        "POST",
        f"/threads/{wid}/messages",
        {"content": "Draft 2", "agent_id": bob},
        expect=201,
        show=False,
    )
    await t.call(
        "POST",
        f"/threads/{wid}/messages",
        {
            "content": "Ship it.",
            "agent_id": cat,
            "tool_calls": [
                {
                    "name": "publish",
                    "args": {"summary": "published draft 2"},
                    "result": {
                        "kind": "finish",
                        "summary": "published draft 2",
                        "reason": "finished",
                    },
                }
            ],
        },
        expect=201,
    )
    await t.wait_status(wid, "closed")
    await t.call("GET", f"/threads/{wid}", expect=200)

    section("expectations: reply_within -> notify, max_silence -> auto_close")
    ex = await t.call(
        "POST",
        threads,
        {
            "title": "watched",
            "adapter": "conversation",
            "participants": [{"kind": "agent", "id": ann}, {"kind": "agent", "id": bob}],
            "expectations": [
                {"kind": "reply_within", "seconds": 1, "handler": "notify"},
                {"kind": "max_silence", "seconds": 3, "handler": "auto_close"},
            ],
        },
        expect=201,
    )
    await t.call(
        "POST",
        f"/threads/{ex['id']}/messages",
        {"content": "anyone?", "agent_id": ann},
        expect=201,
        show=False,
    )
    await t.wait_status(ex["id"], "closed")
    await t.call("GET", f"/threads/{ex['id']}/envelopes", expect=200, params={"after": 3})

    section("a custom adapter: broadcast (only the initiator speaks)")
    bc = await t.call(
        "POST",
        threads,
        {
            "title": "announcements",
            "adapter": "broadcast",
            "participants": [{"kind": "agent", "id": ann}, {"kind": "agent", "id": bob}],
            "invitees": [],
        },
        expect=201,
    )
    await t.call(
        "POST",
        f"/threads/{bc['id']}/messages",
        {"content": "Release today.", "agent_id": ann},
        expect=201,
        show=False,
    )
    await t.call(
        "POST",
        f"/threads/{bc['id']}/messages",
        {"content": "Can I talk?", "agent_id": bob},
        expect=409,
    )


if __name__ == "__main__":
    quiet_logs()
    run(main, "the protocol REST API, request by request")
