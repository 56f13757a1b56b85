"""The Python SDK's REST side against a real server (uvicorn on 127.0.0.1, SQLite file).

Every resource group is driven through ``AsyncClient`` (round trips, typed models), error bodies
map to the typed error classes, the endpoint table matches the server's OpenAPI, and the blocking
``Client`` facade returns the same models and raises the same errors.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import anyio
import pytest

from agent_network.client import (
    ENDPOINTS,
    Agent,
    ApiError,
    AsyncClient,
    AuditRecord,
    Client,
    Conflict,
    Credential,
    Document,
    Envelope,
    EnvelopePage,
    InvalidRequest,
    InviteInvalid,
    IssuedCredential,
    JoinResult,
    Member,
    NotFound,
    PermissionDenied,
    RateLimited,
    Routine,
    Rule,
    Team,
    Thread,
    ThreadClosed,
    Unauthenticated,
    UnresolvedPrincipal,
    User,
    VerifyReport,
    Visa,
)
from conftest import LiveServer

Scenario = Callable[[], Awaitable[None]]


def run(scenario: Scenario) -> None:
    anyio.run(scenario)


async def new_org(srv: LiveServer, name: str) -> AsyncClient:
    """A fresh org (unique name) and an AsyncClient holding its key (caller closes it)."""
    async with AsyncClient(srv.url, srv.admin_key) as admin:
        created = await admin.orgs.create(f"{name}-{uuid.uuid4().hex[:6]}")
    assert created.secret.startswith("an_org_")
    return AsyncClient(srv.url, created.secret)


def _normalise(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_endpoint_table_matches_the_servers_openapi(module_server: LiveServer) -> None:
    with module_server.client() as http:
        spec = http.get("/openapi.json").json()
    served = {
        (method.upper(), _normalise(path.removeprefix("/api/v1")))
        for path, ops in spec["paths"].items()
        for method in ops
    }
    covered = {(e.method, _normalise(e.path)) for e in ENDPOINTS}
    assert served - covered == set(), "endpoints without an SDK method"
    assert covered - served == set(), "SDK methods for endpoints the server does not have"
    names = [e.name for e in ENDPOINTS]
    assert "Threads.post" in names and "Audit.export" in names


def test_orgs_and_users_round_trip(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with await new_org(module_server, "Users") as client:
            me = await client.orgs.me()
            assert me.name.startswith("Users-") and isinstance(me.created_at, datetime)
            ann = await client.users.create("Ann", email="ann@example.com")
            assert isinstance(ann, User) and ann.org_id == me.id and ann.email == "ann@example.com"
            bob = await client.users.create("Bob")
            assert [u.id for u in await client.users.list()] == [ann.id, bob.id]
            assert await client.users.get(ann.id) == ann
            renamed = await client.users.update(ann.id, name="Ann Lee")
            assert (renamed.name, renamed.email) == ("Ann Lee", "ann@example.com")
            cleared = await client.users.update(ann.id, email=None)
            assert (cleared.name, cleared.email) == ("Ann Lee", None)
            assert await client.users.delete(bob.id) is None
            with pytest.raises(NotFound) as err:
                await client.users.get(bob.id)
            assert err.value.status == 404 and bob.id in err.value.message
            assert [u.id for u in await client.users.list()] == [ann.id]
            # the raw call returns the decoded JSON
            raw = await client.request("GET", f"/users/{ann.id}")
            assert raw["name"] == "Ann Lee"

    run(scenario)


def test_agents_routines_rule_knowledge_secrets(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with await new_org(module_server, "Agents") as client:
            ada = await client.agents.create(
                "Ada", "ada", identity="You analyse.", metadata={"tier": 1}
            )
            assert isinstance(ada, Agent) and ada.metadata == {"tier": 1} and ada.model is None
            ben = await client.agents.create("Ben", "ben", model="test")
            assert [a.lookup_key for a in await client.agents.list()] == ["ada", "ben"]
            assert (await client.agents.get(ben.id)).model == "test"
            updated = await client.agents.update(ada.id, model="test", metadata={"tier": 2})
            assert (updated.model, updated.metadata, updated.identity) == (
                "test",
                {"tier": 2},
                "You analyse.",
            )
            assert (await client.agents.update(ada.id, model=None)).model is None
            with pytest.raises(Conflict):
                await client.agents.create("Other", "ada")

            # routines
            routine = await client.agents.routines.create(ada.id, "participate")
            assert isinstance(routine, Routine)
            assert (routine.preset_name, routine.status) == ("participate", "active")
            assert (await client.agents.routines.pause(ada.id, routine.id)).status == "paused"
            assert (await client.agents.routines.activate(ada.id, routine.id)).status == "active"
            changed = await client.agents.routines.update(
                ada.id, routine.id, name="chat", config={"k": 1}, status="paused"
            )
            assert (changed.name, changed.config, changed.status) == ("chat", {"k": 1}, "paused")
            assert [r.id for r in await client.agents.routines.list(ada.id)] == [routine.id]
            await client.agents.routines.delete(ada.id, routine.id)
            assert await client.agents.routines.list(ada.id) == []

            # rule
            default = await client.agents.rule.get(ada.id)
            assert isinstance(default, Rule) and default.rate is None
            assert default.inbound_from == ["*"]
            rule = await client.agents.rule.put(
                ada.id, Rule(inbound_from=["Ben"]), rate={"messages": 5, "per_seconds": 60}
            )
            # the name is resolved to Ben's id; the rule shows who the id is
            assert rule.inbound_from == [ben.id] and rule.rate is not None
            assert rule.principals[ben.id].name == "Ben"
            assert (rule.rate.messages, rule.rate.per_seconds) == (5, 60.0)
            assert await client.agents.rule.get(ada.id) == rule
            assert await client.agents.rule.put(ada.id, rule) == rule  # a rule read writes back
            with pytest.raises(UnresolvedPrincipal) as unknown:
                await client.agents.rule.put(ada.id, outbound_to=["Nobody"])
            assert unknown.value.details["entry"] == "Nobody"
            with pytest.raises(InvalidRequest) as bad_rule:
                await client.agents.rule.put(ada.id, inbox_cap=-1)
            assert "inbox_cap" in bad_rule.value.message
            assert await client.agents.rule.get(ada.id) == rule  # nothing half-written

            # knowledge: the agent's own and the org's
            docs = await client.agents.knowledge.add(
                ada.id, [("glossary", "A zorblat is a unit of llama wool.")]
            )
            assert isinstance(docs[0], Document) and docs[0].agent_id == ada.id
            assert docs[0].chunks >= 1
            assert [d.id for d in await client.agents.knowledge.list(ada.id)] == [docs[0].id]
            org_docs = await client.knowledge.add([{"name": "faq", "content": "Quokkas smile."}])
            assert org_docs[0].agent_id is None
            assert [d.id for d in await client.knowledge.list()] == [org_docs[0].id]
            hits = await client.knowledge.search("quokkas")
            assert [h.document_id for h in hits] == [org_docs[0].id]
            own = await client.knowledge.search("zorblat", agent_id=ada.id)
            assert [h.document for h in own] == ["glossary"] and "zorblat" in own[0].text
            await client.knowledge.delete(org_docs[0].id)
            assert await client.knowledge.list() == []

            # secrets: names only, never values
            put = await client.agents.secrets.put(ada.id, "API_TOKEN", "s3cret")
            assert (put.name, put.agent_id) == ("API_TOKEN", ada.id)
            listed = await client.agents.secrets.list(ada.id)
            assert [s.name for s in listed] == ["API_TOKEN"]
            assert "s3cret" not in listed[0].model_dump_json()
            await client.agents.secrets.delete(ada.id, "API_TOKEN")
            assert await client.agents.secrets.list(ada.id) == []

            await client.agents.delete(ben.id)
            with pytest.raises(NotFound):
                await client.agents.get(ben.id)

    run(scenario)


def test_teams_threads_and_messages(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with await new_org(module_server, "Teams") as client:
            ann = await client.users.create("Ann")
            bot = await client.agents.create("Bot", "bot")
            team = await client.teams.create("Core", description="the core team")
            assert isinstance(team, Team) and (team.kind, team.status) == ("team", "open")
            assert [t.id for t in await client.teams.list()] == [team.id]
            assert (await client.teams.update(team.id, name="Core 2")).name == "Core 2"
            assert (await client.teams.get(team.id)).description == "the core team"
            member = await client.teams.add_member(team.id, user_id=ann.id, role="admin")
            assert isinstance(member, Member) and (member.kind, member.role) == ("user", "admin")
            await client.teams.add_member(team.id, agent_id=bot.id)
            members = await client.teams.members(team.id)
            assert {(m.kind, m.id) for m in members} == {("user", ann.id), ("agent", bot.id)}

            thread = await client.threads.create("Plans", team_id=team.id, agent_budget=2)
            assert isinstance(thread, Thread)
            assert (thread.team_id, thread.agent_budget, thread.last_seq) == (team.id, 2, 1)
            with pytest.raises(ValueError):
                await client.threads.create("Nowhere")
            assert [t.id for t in await client.teams.threads(team.id)] == [thread.id]
            assert [t.id for t in await client.threads.list()] == [thread.id]

            first = await client.threads.post(
                thread.id, "hello", user_id=ann.id, idempotency_key="k1"
            )
            assert isinstance(first, Envelope)
            assert (first.seq, first.type, first.content) == (2, "message", "hello")
            assert (first.sender.kind, first.sender.id, first.sender.name) == (
                "user",
                ann.id,
                "Ann",
            )
            again = await client.threads.post(
                thread.id, "hello", user_id=ann.id, idempotency_key="k1"
            )
            assert again.id == first.id and again.seq == 2
            second = await client.threads.post(thread.id, "from the bot", agent_id=bot.id)
            assert (second.seq, second.sender.kind) == (3, "agent")

            page = await client.threads.messages(thread.id, after=0, limit=2)
            assert isinstance(page, EnvelopePage)
            assert [e.id for e in page.items] == [first.id] and page.next_after == 2
            # limit counts envelopes: the first one is thread.created, so no message yet
            assert (await client.threads.messages(thread.id, limit=1)).items == []
            rest = await client.threads.messages(thread.id, after=page.next_after)
            assert [e.id for e in rest.items] == [second.id]
            everything = await client.threads.envelopes(thread.id)
            assert [e.type for e in everything.items] == ["thread.created", "message", "message"]
            assert [e.seq async for e in client.threads.history(thread.id, page=1)] == [1, 2, 3]
            messages = [
                e.content
                async for e in client.threads.history(thread.id, messages_only=True, page=1)
            ]
            assert messages == ["hello", "from the bot"]

            # long poll: the waiting call returns the message posted while it waits
            got: list[EnvelopePage] = []

            async def waiter() -> None:
                got.append(await client.threads.messages(thread.id, after=3, wait=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                third = await client.threads.post(thread.id, "late", user_id=ann.id)
            assert [e.id for e in got[0].items] == [third.id]

            updated = await client.threads.update(thread.id, agent_budget=5)
            assert (
                updated.agent_budget == 5
                and (await client.threads.get(thread.id)).agent_budget == 5
            )
            report = await client.threads.verify(thread.id)
            assert isinstance(report, VerifyReport) and report.ok
            assert report.checked == updated.last_seq and report.first_bad_seq is None

            # restricted thread: participants, widened later
            private = await client.threads.create(
                "Private", team_id=team.id, visibility="restricted", participants=[ann]
            )
            assert private.visibility == "restricted"
            widened = await client.threads.add_participants(private.id, [("agent", bot.id)])
            assert widened.last_seq > private.last_seq
            assert (await client.threads.update(private.id, visibility="members")).visibility == (
                "members"
            )

            await client.teams.remove_member(team.id, "agent", bot.id)
            assert [m.kind for m in await client.teams.members(team.id)] == ["user"]
            with pytest.raises(PermissionDenied):  # the bot is no member any more
                await client.threads.post(thread.id, "still here?", agent_id=bot.id)
            await client.teams.delete(team.id)
            assert await client.teams.list() == []

    run(scenario)


def test_networks_invites_visas_and_close(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with (
            await new_org(module_server, "Host") as host,
            await new_org(module_server, "Guest") as guest,
        ):
            hbot = await host.agents.create("Host Bot", "hbot")
            gbot = await guest.agents.create("Guest Bot", "gbot")
            net = await host.networks.create("Rollout", description="shared")
            assert net.kind == "network"
            await host.networks.add_member(net.id, agent_id=hbot.id)
            assert (await host.networks.update(net.id, name="Rollout 2")).name == "Rollout 2"
            invite = await host.networks.invites.create(net.id, expires_in=3600, max_uses=2)
            assert invite.join_code and invite.max_uses == 2
            spare = await host.networks.invites.create(net.id)
            await host.networks.invites.revoke(net.id, spare.id)
            listed = {i.id: i for i in await host.networks.invites.list(net.id)}
            assert listed[spare.id].revoked is True and listed[invite.id].join_code is None

            with pytest.raises(InviteInvalid) as bad:
                await guest.networks.join(spare.join_code or "")
            assert bad.value.status == 404 and isinstance(bad.value, NotFound)
            joined = await guest.networks.join(invite.join_code, agent_ids=[gbot.id])
            assert isinstance(joined, JoinResult) and joined.network.id == net.id
            assert [m.id for m in joined.members] == [gbot.id]
            assert [n.id for n in await guest.networks.list()] == [net.id]
            assert {m.id for m in await guest.networks.members(net.id)} == {hbot.id, gbot.id}
            visas = await host.networks.visas.list(net.id)
            assert isinstance(visas[0], Visa) and visas[0].id == joined.visa_id

            thread = await host.threads.create("Status", network_id=net.id)
            assert [t.id for t in await guest.networks.threads(net.id)] == [thread.id]
            env = await guest.threads.post(thread.id, "hello from the guest", agent_id=gbot.id)
            assert env.sender.org_name is not None and env.sender.id == gbot.id

            await guest.networks.remove_member(net.id, "agent", gbot.id)
            ended = await guest.networks.leave(net.id)
            assert ended.end_reason == "left" and ended.revoked_at is not None
            with pytest.raises(NotFound):
                await guest.networks.get(net.id)

            closed = await host.networks.close(net.id)
            assert closed.status == "closed" and closed.closed_at is not None
            with pytest.raises(ThreadClosed) as err:
                await host.threads.post(thread.id, "after close", agent_id=hbot.id)
            assert err.value.status == 409 and isinstance(err.value, Conflict)

    run(scenario)


def test_visa_revocation(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with (
            await new_org(module_server, "Host") as host,
            await new_org(module_server, "Guest") as guest,
        ):
            net = await host.networks.create("Net")
            code = (await host.networks.invites.create(net.id)).join_code
            assert code is not None
            joined = await guest.networks.join(code)
            await host.networks.visas.revoke(net.id, joined.visa_id)
            assert (await host.networks.visas.list(net.id))[0].revoked_at is not None
            with pytest.raises(NotFound):
                await guest.networks.get(net.id)

    run(scenario)


def test_credentials_policy_and_audit(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with await new_org(module_server, "Creds") as client:
            bot = await client.agents.create("Bot", "bot")
            team = await client.teams.create("T")
            await client.teams.add_member(team.id, agent_id=bot.id)
            thread = await client.threads.create("T1", team_id=team.id)

            issued = await client.credentials.issue("agent_token", subject_id=bot.id, name="bot")
            assert isinstance(issued, IssuedCredential) and issued.secret.startswith("an_agt_")
            assert issued.credential.subject_id == bot.id
            async with AsyncClient(module_server.url, issued.secret) as as_bot:
                env = await as_bot.threads.post(thread.id, "posted with my own token")
                assert env.sender.id == bot.id
                with pytest.raises(PermissionDenied) as denied:
                    await as_bot.agents.create("Sneaky", "sneaky")
                assert "token" in denied.value.message

                rotated = await client.credentials.rotate(issued.credential.id)
                assert rotated.secret != issued.secret
                with pytest.raises(Unauthenticated) as unauth:
                    await as_bot.threads.get(thread.id)
                assert unauth.value.status == 401
            creds = {c.id: c for c in await client.credentials.list()}
            assert isinstance(creds[rotated.credential.id], Credential)
            assert creds[issued.credential.id].revoked_at is not None
            revoked = await client.credentials.revoke(rotated.credential.id)
            assert revoked.revoked_at is not None

            assert (await client.policy.egress()).rules == []
            policy = await client.policy.set_egress(
                [{"name": "mail", "kind": "email", "action": "redact"}]
            )
            assert [(r.name, r.kind, r.action) for r in policy.rules] == [
                ("mail", "email", "redact")
            ]
            assert policy.updated_at is not None
            with pytest.raises(InvalidRequest):
                await client.policy.set_egress(
                    [{"name": "x", "kind": "nonsense", "action": "redact"}]
                )
            assert len((await client.policy.egress()).rules) == 1

            records = await client.audit.list(limit=1000)
            assert all(isinstance(r, AuditRecord) for r in records)
            actions = [r.action for r in records]
            assert "agent.create" in actions and "credential.rotate" in actions
            exported = [r async for r in client.audit.export()]
            assert [r.id for r in exported] == [r.id for r in records]
            agent_acts = [r async for r in client.audit.export(action="agent.*")]
            assert agent_acts and {r.action.split(".")[0] for r in agent_acts} == {"agent"}
            page = await client.audit.list(after_id=records[0].id, limit=2)
            assert [r.id for r in page] == [r.id for r in records[1:3]]
            with pytest.raises(InvalidRequest):
                await client.audit.list(since="not a time")

    run(scenario)


def test_error_mapping(module_server: LiveServer) -> None:
    async def scenario() -> None:
        async with (
            await new_org(module_server, "A") as a,
            await new_org(module_server, "B") as b,
        ):
            team = await a.teams.create("Secret team")
            thread = await a.threads.create("secret", team_id=team.id)
            agent = await a.agents.create("Private", "private")
            # another org's ids answer exactly like missing ones
            for call in (
                b.threads.get(thread.id),
                b.teams.get(team.id),
                b.agents.get(agent.id),
                b.threads.messages(thread.id),
            ):
                with pytest.raises(NotFound) as err:
                    await call
                assert (err.value.status, err.value.code) == (404, "not_found")
                assert err.value.message.endswith("not found")
            # 422 with a message naming the field
            with pytest.raises(InvalidRequest) as invalid:
                await a.agents.create("", "empty-name")
            assert invalid.value.status == 422 and invalid.value.code == "invalid_request"
            assert "name" in invalid.value.message
            assert invalid.value.details["problems"][0]["field"].endswith("name")
            with pytest.raises(InvalidRequest):
                await a.threads.messages(thread.id, limit=0)
            # a wrong key
            async with AsyncClient(module_server.url, "an_org_wrong") as nobody:
                with pytest.raises(Unauthenticated):
                    await nobody.orgs.me()
            # the admin key is no org key
            async with AsyncClient(module_server.url, module_server.admin_key) as admin:
                with pytest.raises(PermissionDenied):
                    await admin.agents.list()
            # ids are checked before any request
            with pytest.raises(ValueError):
                await a.threads.get("")
            # path ids are quoted: no way to reach another route
            with pytest.raises(NotFound):
                await a.threads.get("../agents")
            # every error is an ApiError with a readable str
            with pytest.raises(ApiError, match=r"not_found \(404\)"):
                await a.users.get("usr_missing")

    run(scenario)


def test_rate_limited_carries_retry_after(module_server: LiveServer) -> None:
    teams = module_server.app.state.services.teams
    teams.join_limiter.reset()  # other tests of this module joined from 127.0.0.1 too
    teams.join_limit = 2

    async def scenario() -> None:
        async with await new_org(module_server, "Joiner") as client:
            for i in range(2):
                with pytest.raises(InviteInvalid):
                    await client.networks.join(f"WRONGCODE{i:03d}")
            with pytest.raises(RateLimited) as err:
                await client.networks.join("WRONGCODE999")
            assert (err.value.status, err.value.code) == (429, "rate_limited")
            assert err.value.retry_after is not None and 1 <= err.value.retry_after <= 60
            assert f"retry in {err.value.retry_after:g} s" in err.value.message

    try:
        run(scenario)
    finally:
        teams.join_limit = 10
        teams.join_limiter.reset()


def test_models_keep_fields_a_newer_server_adds() -> None:
    env = Envelope.model_validate(
        {
            "id": "env_1",
            "thread_id": "thr_1",
            "seq": 1,
            "type": "message",
            "content": "hi",
            "sender": {"kind": "user", "id": "usr_1", "name": "Ann", "pronouns": "she"},
            "created_at": "2026-01-01T00:00:00+00:00",
            "audience": ["agt_1"],
            "priority": "high",
        }
    )
    assert env.audience == ["agt_1"]  # a field of its own since protocol threads
    assert env.model_extra == {"priority": "high"}
    assert env.sender.model_extra == {"pronouns": "she"}


def test_sync_client_shares_the_async_methods(module_server: LiveServer) -> None:
    with Client(module_server.url, module_server.admin_key) as admin:
        key = admin.orgs.create(f"Sync-{uuid.uuid4().hex[:6]}").secret
        assert admin.health().status == "ok"
    with Client(module_server.url, key) as client:
        ann = client.users.create("Ann")
        assert isinstance(ann, User)
        bot = client.agents.create("Bot", "bot")
        routine = client.agents.routines.create(bot.id, "p")  # a nested group
        assert isinstance(routine, Routine)
        team = client.teams.create("T")
        client.teams.add_member(team.id, user_id=ann.id)
        thread = client.threads.create("Sync", team_id=team.id)
        env = client.threads.post(thread.id, "hi", user_id=ann.id)
        assert isinstance(env, Envelope) and env.seq == 2
        assert [e.seq for e in client.threads.history(thread.id)] == [1, 2]
        records = list(client.audit.export())
        assert records and all(isinstance(r, AuditRecord) for r in records)
        assert client.request("GET", "/orgs/me")["id"] == ann.org_id
        with pytest.raises(NotFound):
            client.threads.get("thr_missing")
        with pytest.raises(InvalidRequest):
            client.users.create("")
        assert "post" in dir(client.threads)
    # closed: the background loop is gone and closing again is harmless
    client.close()


def test_transport_error_when_nothing_listens() -> None:
    from agent_network.client import TransportError
    from conftest import free_port

    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", "an_org_x", timeout=5) as c:
            with pytest.raises(TransportError):
                await c.orgs.me()

    run(scenario)
