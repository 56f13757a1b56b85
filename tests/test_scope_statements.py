"""The scope statements built once per kind of principal (services/scope.py ``_post_access_query``,
``_visible_thread_queries``: every id a bound parameter, the statement shared by every principal
of that kind) answer exactly as the checks made one by one, for every principal, thread and
sender, in any order, so that no principal's values leak into another's answer. Services in
this process over a real SQLite file or PostgreSQL database.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import anyio
import pytest

from agent_network.config import Settings
from agent_network.errors import AgentNetworkError
from agent_network.hub import Hub
from agent_network.services import ServiceContext, Services, create_admin_key
from agent_network.services.posting import PostPath
from agent_network.services.principal import Principal, RunnerJob, agent_principal
from agent_network.services.scope import post_access, visible_thread
from agent_network.store.engine import create_engine, database_url

pytestmark = pytest.mark.engines("sqlite", "postgresql")


async def _world(svc: Services, admin_key: str) -> dict[str, Any]:
    """Org A (users a1, a2, agent g1; team T with a1 and g1; a members thread and a restricted
    one with a1 as participant) and org B (user b1 in team U, one thread); principals: both
    org keys, tokens of a1, a2, g1 and b1, a revoked token of a1, g1's internal principal."""
    admin = await svc.orgs.authenticate(admin_key)
    out: dict[str, Any] = {"principals": {}, "senders": [], "threads": ["thr_0123456789abcdef"]}
    for name in ("A", "B"):
        created = await svc.orgs.create_org(admin, f"org {name}")
        out["principals"][f"{name} key"] = await svc.orgs.authenticate(created["secret"])
    a, b = out["principals"]["A key"], out["principals"]["B key"]
    a1 = await svc.orgs.create_user(a, "a1", None)
    a2 = await svc.orgs.create_user(a, "a2", None)
    g1 = await svc.agents.create_agent(a, name="g1", lookup_key="g1")
    b1 = await svc.orgs.create_user(b, "b1", None)
    team = await svc.teams.create(a, "team", "T")
    await svc.teams.add_member(a, "team", team["id"], user_id=a1["id"])
    await svc.teams.add_member(a, "team", team["id"], agent_id=g1["id"])
    other = await svc.teams.create(b, "team", "U")
    await svc.teams.add_member(b, "team", other["id"], user_id=b1["id"])
    members_thread = await svc.threads.create(a, team["id"], "members")
    restricted = await svc.threads.create(
        a, team["id"], "restricted", visibility="restricted", participants=[("user", a1["id"])]
    )
    b_thread = await svc.threads.create(b, other["id"], "b")
    out["threads"] += [members_thread["id"], restricted["id"], b_thread["id"]]
    out["senders"] = [("user", a1["id"]), ("user", a2["id"]), ("agent", g1["id"])]
    out["senders"].append(("user", b1["id"]))
    for org, who, kind in ((a, a1, "user"), (a, a2, "user"), (a, g1, "agent"), (b, b1, "user")):
        issued = await svc.credentials.issue(org, kind=f"{kind}_token", subject_id=who["id"])
        out["principals"][f"{who['name']} token"] = await svc.orgs.authenticate(issued["secret"])
    issued = await svc.credentials.issue(a, kind="user_token", subject_id=a1["id"])
    out["principals"]["a1 revoked"] = await svc.orgs.authenticate(issued["secret"])
    await svc.credentials.revoke(a, issued["credential"]["id"])
    job = RunnerJob("env_0", members_thread["id"], "rtn_0")
    out["principals"]["g1 internal"] = agent_principal(g1["id"], a.org_id or "", job)
    return out


async def _one_by_one(conn: Any, p: Principal, thread_id: str, kind: str, sender: str) -> bool:
    try:
        await PostPath._checked_grant(
            conn,
            p,
            thread_id,
            sender if kind == "agent" else None,
            sender if kind == "user" else None,
            None,
        )
    except AgentNetworkError:
        return False
    return True


async def _visible(conn: Any, p: Principal, thread_id: str) -> str | None:
    try:
        thread, team = await visible_thread(conn, p, thread_id)
    except AgentNetworkError:
        return None
    assert thread["id"] == thread_id and team["id"] == thread["team_id"]
    return str(team["id"])


def test_shared_scope_statements_answer_as_the_checks_one_by_one(db: Any) -> None:
    anyio.run(_check, db)


async def _check(db: Any) -> None:
    engine = create_engine(database_url(db))
    try:
        admin_key = await create_admin_key(engine)
        async with Hub.open(engine, sweep_interval=None) as hub:
            svc = Services.create(ServiceContext(engine, hub, Settings(database=str(db))))
            w = await _world(svc, admin_key)
            cases = list(itertools.product(w["principals"].items(), w["threads"], w["senders"]))
            granted = 0
            async with engine.connect() as conn:
                expected = {}
                for (name, p), thread_id, (kind, sender) in cases:
                    expected[name, thread_id, sender] = await _one_by_one(
                        conn, p, thread_id, kind, sender
                    )
                for seed in (1, 2):  # shuffled: each answer must not depend on the one before
                    random.Random(seed).shuffle(cases)
                    for (name, p), thread_id, (kind, sender) in cases:
                        row = await post_access(conn, p, thread_id, kind, sender)
                        want = expected[name, thread_id, sender]
                        assert (row is not None) == want, (name, thread_id, kind, sender)
                        if row is not None:
                            granted += 1
                            assert row["sender_id"] == sender
                            assert row["team_id"] == await _visible(conn, p, thread_id)
            seen = {
                (name, t): await _visible_once(engine, p, t)
                for name, p in w["principals"].items()
                for t in w["threads"]
            }
    finally:
        await engine.dispose()
    assert granted > 0  # the world grants something (and refuses the rest)
    members_thread, restricted, b_thread = w["threads"][1:]
    # what each principal sees: its own org's threads, a restricted one only as a participant
    assert seen["A key", members_thread] and seen["A key", restricted]
    assert not seen["A key", b_thread] and seen["B key", b_thread]
    assert seen["a1 token", restricted] and not seen["a2 token", restricted]
    assert not seen["a2 token", members_thread]  # a2 is not a member of T
    assert seen["g1 internal", members_thread] and not seen["g1 internal", restricted]
    assert not seen["b1 token", members_thread] and seen["b1 token", b_thread]


async def _visible_once(engine: Any, p: Principal, thread_id: str) -> bool:
    async with engine.connect() as conn:
        return await _visible(conn, p, thread_id) is not None
