"""The post path's cache of positive decisions (services/cache.py, ThreadService.post).

Every test first posts (so the decision is cached), then changes something that must refuse or
alter the next post — a visa revoked, a network left, a member removed, a rule or an egress
policy set, a token revoked, a member added under an outbound_to rule, a user renamed, a sender
or team deleted — and posts again at once: the answer must be the one the full check gives.
A live server over a real SQLite file or PostgreSQL database; REST through httpx, WebSocket
frames through the ``websockets`` sync client.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from agent_network.services.cache import DECISION_TTL, DecisionCache
from conftest import LiveServer, Org, all_envelopes, assert_error, open_network

pytestmark = pytest.mark.engines("sqlite", "postgresql")

_names = itertools.count(1)


def post(org: Org, thread_id: str, content: str, **sender: str) -> Any:
    return org.http.post(f"/threads/{thread_id}/messages", json={"content": content, **sender})


def posted(org: Org, thread_id: str, content: str, **sender: str) -> dict[str, Any]:
    r = post(org, thread_id, content, **sender)
    assert r.status_code == 201, r.text
    return dict(r.json())


def grants(srv: LiveServer) -> DecisionCache[Any]:
    return srv.app.state.services.threads.grants  # type: ignore[no-any-return]


class World:
    """Org A (host) with user ``alice`` and agent ``scout`` in a team and in a network that
    org B joined with its user ``bob``; a thread in each."""

    def __init__(self, srv: LiveServer) -> None:
        n = next(_names)
        self.srv = srv
        self.a = Org(srv, f"Alpha{n}")
        self.b = Org(srv, f"Beta{n}")
        self.alice = self.a.user("alice")
        self.scout = self.a.agent("scout", f"scout-{n}")
        self.bob = self.b.user("bob")
        self.team = self.a.team("team", ("user", self.alice["id"]), ("agent", self.scout["id"]))
        self.team_thread = self.thread(self.a, self.team["id"], "/teams")
        self.net = open_network(
            self.a,
            {self.b: [("user", self.bob["id"])]},
            ("user", self.alice["id"]),
            ("agent", self.scout["id"]),
        )
        self.net_thread = self.thread(self.a, self.net["id"], "/networks")

    @staticmethod
    def thread(org: Org, team_id: str, prefix: str) -> str:
        body = {"title": "t", "agent_budget": 1000}
        return str(org.ok("POST", f"{prefix}/{team_id}/threads", json=body)["id"])

    def close(self) -> None:
        self.a.http.close()
        self.b.http.close()


@pytest.fixture
def world(module_server: LiveServer) -> Iterator[World]:
    # every org of this module joins from 127.0.0.1: lift the per-address join limit
    module_server.app.state.services.teams.join_limit = 1_000_000
    w = World(module_server)
    yield w
    w.close()


def contents(org: Org, thread_id: str) -> list[str]:
    return [e["content"] for e in all_envelopes(org.http, thread_id, messages_only=True)]


# ----------------------------------------------------------------------------- the cache itself


def test_decision_cache_epochs_ttl_and_lru() -> None:
    now = [100.0]
    cache: DecisionCache[str] = DecisionCache(max_entries=2, ttl=1.0, clock=lambda: now[0])
    cache.put("k", "v", (1, 1))
    assert cache.get("k", (1, 1)) == "v"
    assert cache.get("k", (2, 1)) is None  # access removed since: gone for good
    assert cache.get("k", (1, 1)) is None
    cache.put("k", "v", (1, 1))
    assert cache.get("k", (1, 2)) is None  # configuration changed since
    cache.put("k", "v", (1, 1))
    now[0] += 0.999
    assert cache.get("k", (1, 1)) == "v"
    now[0] += 0.002
    assert cache.get("k", (1, 1)) is None  # older than the ttl (another process's changes)
    cache.put("a", "1", (0, 0))
    cache.put("b", "2", (0, 0))
    assert cache.get("a", (0, 0)) == "1"  # a is now the most recently used
    cache.put("c", "3", (0, 0))
    assert len(cache) == 2
    assert cache.get("b", (0, 0)) is None and cache.get("a", (0, 0)) == "1"
    assert cache.get("c", (0, 0)) == "3"
    with pytest.raises(ValueError):
        DecisionCache(max_entries=0)


def test_repeated_posts_are_served_from_the_cache(world: World) -> None:
    cache = grants(world.srv)
    posted(world.a, world.team_thread, "one", user_id=world.alice["id"])
    hits = cache.hits
    env = posted(world.a, world.team_thread, "two", user_id=world.alice["id"])
    assert cache.hits == hits + 1
    assert env["sender"] == {
        "kind": "user",
        "id": world.alice["id"],
        "name": "alice",
        "org_id": world.a.id,
        "org_name": world.a.name,
    }
    assert env["content"] == "two" and env["seq"] == 3
    # the rendered answer is the REST item of the same envelope
    (item,) = [e for e in all_envelopes(world.a.http, world.team_thread) if e["id"] == env["id"]]
    assert item == env


def test_a_burst_of_posts_makes_one_decision_not_one_each(world: World) -> None:
    """64 post frames pipelined on one WebSocket all miss an empty cache at once; the first
    makes the decision and the others wait for it instead of each querying the database."""
    cache = grants(world.srv)
    url = world.srv.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {world.a.key}"}) as ws:
        assert json.loads(ws.recv(timeout=20))["type"] == "welcome"
        stores = cache.stores
        body = {"type": "post", "thread_id": world.team_thread, "user_id": world.alice["id"]}
        for i in range(64):
            ws.send(json.dumps({**body, "ref": str(i), "content": f"burst {i}"}))
        replies = []
        while len(replies) < 64:
            frame = json.loads(ws.recv(timeout=20))
            if frame["type"] in ("posted", "error"):
                replies.append(frame)
    assert [r["type"] for r in replies] == ["posted"] * 64
    # one decision (a second one only if the burst outlived DECISION_TTL on a crawling machine)
    assert 1 <= cache.stores - stores <= 2
    assert len(contents(world.a, world.team_thread)) == 64


# ----------------------------------------------------------------------------- access removed


def test_revoked_visa_refuses_the_next_post(world: World) -> None:
    posted(world.b, world.net_thread, "hello", user_id=world.bob["id"])
    visa = world.a.ok("GET", f"/networks/{world.net['id']}/visas")
    (b_visa,) = [v for v in visa if v["org_id"] == world.b.id]
    world.a.ok("DELETE", f"/networks/{world.net['id']}/visas/{b_visa['id']}")
    assert_error(
        post(world.b, world.net_thread, "again", user_id=world.bob["id"]), 404, "not_found"
    )
    assert contents(world.a, world.net_thread) == ["hello"]


def test_leaving_the_network_refuses_the_next_post(world: World) -> None:
    posted(world.b, world.net_thread, "hello", user_id=world.bob["id"])
    world.b.ok("POST", f"/networks/{world.net['id']}/leave")
    assert_error(
        post(world.b, world.net_thread, "again", user_id=world.bob["id"]), 404, "not_found"
    )


def test_removed_member_is_refused_at_once(world: World) -> None:
    posted(world.a, world.team_thread, "hello", user_id=world.alice["id"])
    world.a.ok("DELETE", f"/teams/{world.team['id']}/members/user/{world.alice['id']}")
    err = assert_error(
        post(world.a, world.team_thread, "again", user_id=world.alice["id"]),
        403,
        "permission_denied",
    )
    assert "not a member" in err["message"]
    assert contents(world.a, world.team_thread) == ["hello"]


def test_deleted_sender_and_deleted_team_are_refused_at_once(world: World) -> None:
    posted(world.a, world.team_thread, "from scout", agent_id=world.scout["id"])
    posted(world.a, world.team_thread, "from alice", user_id=world.alice["id"])
    world.a.ok("DELETE", f"/agents/{world.scout['id']}")
    assert_error(
        post(world.a, world.team_thread, "again", agent_id=world.scout["id"]), 404, "not_found"
    )
    world.a.ok("DELETE", f"/teams/{world.team['id']}")
    assert_error(
        post(world.a, world.team_thread, "again", user_id=world.alice["id"]), 404, "not_found"
    )


def test_revoked_token_is_refused_over_rest_and_over_an_open_websocket(world: World) -> None:
    srv = world.srv
    issued = world.a.ok(
        "POST", "/credentials", json={"kind": "user_token", "subject_id": world.alice["id"]}
    )
    with srv.client(issued["secret"]) as http:
        r = http.post(f"/threads/{world.team_thread}/messages", json={"content": "rest"})
        assert r.status_code == 201, r.text
        url = srv.url.replace("http://", "ws://") + "/api/v1/ws"
        headers = {"Authorization": f"Bearer {issued['secret']}"}
        with connect(url, additional_headers=headers) as ws:

            def ws_post(content: str, ref: str) -> dict[str, Any]:
                frame = {"type": "post", "ref": ref, "thread_id": world.team_thread}
                ws.send(json.dumps({**frame, "content": content}))
                while True:
                    reply = json.loads(ws.recv(timeout=20))
                    if reply["type"] in ("posted", "error") and reply.get("ref") == ref:
                        return dict(reply)

            assert json.loads(ws.recv(timeout=20))["type"] == "welcome"
            assert ws_post("ws one", "p1")["type"] == "posted"
            assert ws_post("ws two", "p2")["type"] == "posted"  # served from the cache
            world.a.ok("DELETE", f"/credentials/{issued['credential']['id']}")
            assert_error(
                http.post(f"/threads/{world.team_thread}/messages", json={"content": "x"}),
                401,
                "unauthenticated",
            )
            try:
                reply = ws_post("ws three", "p3")
            except Exception:  # the server closed the connection first: refused as well
                reply = {"type": "closed"}
            assert reply["type"] != "posted", reply
    assert contents(world.a, world.team_thread) == ["rest", "ws one", "ws two"]


def test_websocket_post_after_member_removal_is_refused(world: World) -> None:
    url = world.srv.url.replace("http://", "ws://") + "/api/v1/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {world.a.key}"}) as ws:
        assert json.loads(ws.recv(timeout=20))["type"] == "welcome"

        def ws_post(content: str, ref: str) -> dict[str, Any]:
            body = {"type": "post", "ref": ref, "thread_id": world.team_thread}
            ws.send(json.dumps({**body, "content": content, "user_id": world.alice["id"]}))
            while True:
                reply = json.loads(ws.recv(timeout=20))
                if reply.get("ref") == ref:
                    return dict(reply)

        assert ws_post("one", "1")["type"] == "posted"
        assert ws_post("two", "2")["type"] == "posted"
        world.a.ok("DELETE", f"/teams/{world.team['id']}/members/user/{world.alice['id']}")
        reply = ws_post("three", "3")
        assert reply["type"] == "error" and reply["error"]["code"] == "permission_denied", reply
    assert contents(world.a, world.team_thread) == ["one", "two"]


# ----------------------------------------------------------------------------- configuration


def test_rule_change_applies_to_the_next_post(world: World) -> None:
    posted(world.a, world.team_thread, "free", agent_id=world.scout["id"])
    world.a.ok(
        "PUT", f"/agents/{world.scout['id']}/rule", json={"outbound_to": [world.scout["id"]]}
    )
    err = assert_error(
        post(world.a, world.team_thread, "bound", agent_id=world.scout["id"]),
        403,
        "rule_violation",
    )
    assert "outbound_to" in err["message"]
    world.a.ok("PUT", f"/agents/{world.scout['id']}/rule", json={"allowed_adapters": ["none"]})
    err = assert_error(
        post(world.a, world.team_thread, "bound", agent_id=world.scout["id"]),
        403,
        "rule_violation",
    )
    assert "allowed_adapters" in err["message"]
    world.a.ok("PUT", f"/agents/{world.scout['id']}/rule", json={})
    posted(world.a, world.team_thread, "free again", agent_id=world.scout["id"])


def test_new_member_is_checked_against_a_cached_outbound_rule(world: World) -> None:
    world.a.ok("PUT", f"/agents/{world.scout['id']}/rule", json={"outbound_to": ["alice", "scout"]})
    posted(world.a, world.team_thread, "to alice", agent_id=world.scout["id"])
    posted(world.a, world.team_thread, "to alice again", agent_id=world.scout["id"])
    eve = world.a.user("eve")
    world.a.ok("POST", f"/teams/{world.team['id']}/members", json={"user_id": eve["id"]})
    err = assert_error(
        post(world.a, world.team_thread, "to eve too", agent_id=world.scout["id"]),
        403,
        "rule_violation",
    )
    assert "'eve'" in err["message"]


def test_org_joining_later_is_checked_against_a_cached_outbound_rule(world: World) -> None:
    world.a.ok(
        "PUT",
        f"/agents/{world.scout['id']}/rule",
        json={"outbound_to": [f"org:{world.a.name}", f"org:{world.b.name}"]},
    )
    posted(world.a, world.net_thread, "inside", agent_id=world.scout["id"])
    c = Org(world.srv, f"Gamma{next(_names)}")
    carol = c.user("carol")
    code = world.a.ok("POST", f"/networks/{world.net['id']}/invites", json={})["join_code"]
    c.ok("POST", "/networks/join", json={"code": code, "user_ids": [carol["id"]]})
    err = assert_error(
        post(world.a, world.net_thread, "outside", agent_id=world.scout["id"]),
        403,
        "rule_violation",
    )
    assert "'carol'" in err["message"]
    c.http.close()


def test_renamed_member_and_renamed_sender(world: World) -> None:
    world.a.ok("PUT", f"/agents/{world.scout['id']}/rule", json={"outbound_to": ["alice", "scout"]})
    posted(world.a, world.team_thread, "hi alice", agent_id=world.scout["id"])
    assert (
        posted(world.a, world.team_thread, "me", user_id=world.alice["id"])["sender"]["name"]
        == "alice"
    )
    world.a.ok("PATCH", f"/users/{world.alice['id']}", json={"name": "mallory"})
    # the sender's own name as rendered in the answer follows at once
    assert (
        posted(world.a, world.team_thread, "me", user_id=world.alice["id"])["sender"]["name"]
        == "mallory"
    )
    # the agent's outbound_to names alice by id: her new name changes nothing (a rule never
    # decides on names, so a rename can neither shut an agent out nor let one in)
    rule = world.a.ok("GET", f"/agents/{world.scout['id']}/rule")
    assert rule["outbound_to"][0] == world.alice["id"]
    posted(world.a, world.team_thread, "hi mallory", agent_id=world.scout["id"])
    world.a.ok("PATCH", f"/agents/{world.scout['id']}", json={"name": "ranger"})
    world.a.ok("PUT", f"/agents/{world.scout['id']}/rule", json={})
    env = posted(world.a, world.team_thread, "renamed", agent_id=world.scout["id"])
    assert env["sender"]["name"] == "ranger"


def test_egress_policy_set_applies_to_the_next_post(world: World) -> None:
    text = "write to ops@example.com"
    assert posted(world.a, world.net_thread, text, user_id=world.alice["id"])["content"] == text
    assert posted(world.a, world.net_thread, text, user_id=world.alice["id"])["content"] == text
    rules = [{"name": "mail", "kind": "email", "action": "redact"}]
    world.a.ok("PUT", "/policy/egress", json={"rules": rules})
    env = posted(world.a, world.net_thread, text, user_id=world.alice["id"])
    assert env["content"] == "write to [redacted:mail]"
    rules = [{"name": "mail", "kind": "email", "action": "refuse"}]
    world.a.ok("PUT", "/policy/egress", json={"rules": rules})
    assert_error(
        post(world.a, world.net_thread, text, user_id=world.alice["id"]), 422, "egress_refused"
    )
    world.a.ok("PUT", "/policy/egress", json={"rules": []})
    assert posted(world.a, world.net_thread, text, user_id=world.alice["id"])["content"] == text


# ----------------------------------------------------------------------------- never cached


def test_refusals_are_not_cached(world: World) -> None:
    carl = world.a.user("carl")
    for _ in range(2):
        assert_error(
            post(world.a, world.team_thread, "hi", user_id=carl["id"]), 403, "permission_denied"
        )
    world.a.ok("POST", f"/teams/{world.team['id']}/members", json={"user_id": carl["id"]})
    posted(world.a, world.team_thread, "hi", user_id=carl["id"])  # at once


def test_per_post_checks_stay_exact_with_a_cached_grant(world: World) -> None:
    world.a.ok(
        "PUT",
        f"/agents/{world.scout['id']}/rule",
        json={"rate": {"messages": 2, "per_seconds": 3600}},
    )
    posted(world.a, world.team_thread, "one", agent_id=world.scout["id"])
    posted(world.a, world.team_thread, "two", agent_id=world.scout["id"])
    err = assert_error(
        post(world.a, world.team_thread, "three", agent_id=world.scout["id"]),
        403,
        "rule_violation",
    )
    assert "rate of 2 messages" in err["message"]
    # content and causation are checked on every post too
    assert_error(
        post(world.a, world.team_thread, "  ", user_id=world.alice["id"]), 422, "invalid_request"
    )
    posted(world.a, world.team_thread, "ok", user_id=world.alice["id"])
    r = world.a.http.post(
        f"/threads/{world.team_thread}/messages",
        json={"content": "re", "user_id": world.alice["id"], "causation_id": "env_nope"},
    )
    assert_error(r, 422, "invalid_request")
    assert contents(world.a, world.team_thread) == ["one", "two", "ok"]


def test_another_process_change_is_honoured_within_the_ttl(
    module_server: LiveServer, world: World, tmp_path: Path
) -> None:
    """Two servers on one database: a removal made through the other one is not seen by this
    process's epochs, so it takes effect here once the cached decision expires."""
    other = LiveServer(module_server.db)
    other.start()
    try:
        posted(world.a, world.team_thread, "hello", user_id=world.alice["id"])
        with other.client(world.a.key) as http:
            r = http.delete(f"/teams/{world.team['id']}/members/user/{world.alice['id']}")
            assert r.status_code == 204, r.text
        time.sleep(DECISION_TTL + 0.2)
        assert_error(
            post(world.a, world.team_thread, "again", user_id=world.alice["id"]),
            403,
            "permission_denied",
        )
    finally:
        other.stop()
