"""The in-process runner: participate routines, one reply per trigger, the runaway guard, prompts.

Models are pydantic-ai ``FunctionModel``s registered under a name with
``agent_network.runtime.models.register_model`` (or the configured default ``"test"`` model, which
always answers "Acknowledged.").
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo

from conftest import LiveServer, Org, all_envelopes, function_model, settle

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo"


def register(name_hint: str, fn: Any) -> str:
    """Register ``FunctionModel(fn)`` under a fresh model name and return the name."""
    return function_model(name_hint, fn)


def prompt_text(messages: list[ModelMessage]) -> str:
    """Everything the model was shown, as one string."""
    out = []
    for m in messages:
        for part in m.parts:
            content = getattr(part, "content", None)
            if isinstance(content, str):
                out.append(content)
    return "\n".join(out)


def routine(org: Org, agent_id: str) -> dict[str, Any]:
    return dict(org.ok("POST", f"/agents/{agent_id}/routines", json={"name": "participate"}))


def agent_messages(org: Org, tid: str) -> list[dict[str, Any]]:
    return [
        m
        for m in all_envelopes(org.http, tid, messages_only=True)
        if m["sender"]["kind"] == "agent"
    ]


def team_thread(org: Org, *members: tuple[str, str], **kw: Any) -> str:
    team = org.team("Team", *members)
    return str(org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "Work", **kw})["id"])


# --------------------------------------------------------------------------- basic replies


def test_two_agents_each_reply_once_to_a_user_message(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann = a.user("Ann")
    b1, b2 = a.agent("Planner", "planner"), a.agent("Checker", "checker")
    routine(a, b1["id"])
    routine(a, b2["id"])
    tid = team_thread(a, ("user", ann["id"]), ("agent", b1["id"]), ("agent", b2["id"]))
    trigger = a.ok(
        "POST", f"/threads/{tid}/messages", json={"content": "Plan?", "user_id": ann["id"]}
    )
    settle(server, a.http, tid)

    msgs = agent_messages(a, tid)
    replies = [m for m in msgs if m["causation_id"] == trigger["id"]]
    assert sorted(m["sender"]["id"] for m in replies) == sorted([b1["id"], b2["id"]])
    for m in replies:
        assert m["content"] == "Acknowledged."
        assert m["sender"]["org_id"] == a.id and m["sender"]["org_name"] == "Acme"
        assert m["sender"]["name"] in ("Planner", "Checker")
        assert m["seq"] > trigger["seq"]
        assert m["idempotency_key"] == f"reply:{m['sender']['id']}:{trigger['id']}"
    # every agent message answers a message of somebody else, and at most once
    by_id = {m["id"]: m for m in all_envelopes(a.http, tid, messages_only=True)}
    pairs = Counter((m["sender"]["id"], m["causation_id"]) for m in msgs)
    assert max(pairs.values()) == 1
    for m in msgs:
        assert by_id[m["causation_id"]]["sender"]["id"] != m["sender"]["id"]
    # the "test" model always answers, so the agents answer each other until the budget stops them
    assert len(msgs) == 4
    assert a.ok("GET", f"/threads/{tid}/verify")["ok"] is True


def test_one_reply_per_agent_and_trigger_even_after_restart(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann = a.user("Ann")
    b1, b2 = a.agent("Planner", "planner"), a.agent("Checker", "checker")
    routine(a, b1["id"])
    routine(a, b2["id"])
    tid = team_thread(a, ("user", ann["id"]), ("agent", b1["id"]), ("agent", b2["id"]))
    t1 = a.ok("POST", f"/threads/{tid}/messages", json={"content": "one", "user_id": ann["id"]})
    settle(server, a.http, tid)
    before = all_envelopes(a.http, tid)

    # Forget every runner cursor: on start the runner redelivers the whole thread.
    server.stop()
    con = sqlite3.connect(server.db)
    assert con.execute("UPDATE cursors SET seq = 0 WHERE name = 'runner'").rowcount >= 2
    con.commit()
    con.close()
    server.start()
    settle(server, a.http, tid)
    assert all_envelopes(a.http, tid) == before

    # A trigger posted right before a restart is answered exactly once per agent.
    t2 = a.ok("POST", f"/threads/{tid}/messages", json={"content": "two", "user_id": ann["id"]})
    server.restart()
    settle(server, a.http, tid)
    server.restart()
    settle(server, a.http, tid)

    msgs = agent_messages(a, tid)
    for trig in (t1, t2):
        answered = Counter(m["sender"]["id"] for m in msgs if m["causation_id"] == trig["id"])
        assert answered == {b1["id"]: 1, b2["id"]: 1}, trig["content"]
    pairs = Counter((m["sender"]["id"], m["causation_id"]) for m in msgs)
    assert max(pairs.values()) == 1
    assert a.ok("GET", f"/threads/{tid}/verify")["ok"] is True


def test_first_message_of_many_threads_survives_an_immediate_restart(
    server: LiveServer, make_org
) -> None:
    """Delivery is at-least-once: a trigger committed just before shutdown is still answered."""
    a: Org = make_org("Acme")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    routine(a, bot["id"])
    team = a.team("Team", ("user", ann["id"]), ("agent", bot["id"]))

    async def burst() -> list[str]:
        async with httpx.AsyncClient(
            base_url=f"{server.url}/api/v1",
            headers={"Authorization": f"Bearer {a.key}"},
            timeout=60,
        ) as c:
            made = await asyncio.gather(
                *(
                    c.post(f"/teams/{team['id']}/threads", json={"title": f"t{i}"})
                    for i in range(150)
                )
            )
            tids = [r.json()["id"] for r in made]
            posted = await asyncio.gather(
                *(
                    c.post(f"/threads/{t}/messages", json={"content": "go", "user_id": ann["id"]})
                    for t in tids
                )
            )
            assert {r.status_code for r in posted} == {201}
            return tids

    tids = asyncio.run(burst())
    server.restart()  # right away: the runner has not seen every trigger yet
    settle(server, a.http, *tids)
    unanswered = [t for t in tids if not agent_messages(a, t)]
    assert unanswered == []


# --------------------------------------------------------------------------- no replies


def test_paused_routine_does_not_reply(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    rt = routine(a, bot["id"])
    a.ok("POST", f"/agents/{bot['id']}/routines/{rt['id']}/pause")
    tid = team_thread(a, ("user", ann["id"]), ("agent", bot["id"]))
    a.ok("POST", f"/threads/{tid}/messages", json={"content": "anyone?", "user_id": ann["id"]})
    settle(server, a.http, tid)
    assert agent_messages(a, tid) == []
    # activated again, it answers the next message (and only that one)
    a.ok("POST", f"/agents/{bot['id']}/routines/{rt['id']}/activate")
    t2 = a.ok("POST", f"/threads/{tid}/messages", json={"content": "now?", "user_id": ann["id"]})
    settle(server, a.http, tid)
    assert [m["causation_id"] for m in agent_messages(a, tid)] == [t2["id"]]


def test_deleted_agent_and_deleted_routine_do_not_reply(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann, gone, norout = a.user("Ann"), a.agent("Gone", "gone"), a.agent("NoRoutine", "noroutine")
    routine(a, gone["id"])
    rt = routine(a, norout["id"])
    tid = team_thread(a, ("user", ann["id"]), ("agent", gone["id"]), ("agent", norout["id"]))
    a.ok("DELETE", f"/agents/{gone['id']}")
    a.ok("DELETE", f"/agents/{norout['id']}/routines/{rt['id']}")
    a.ok("POST", f"/threads/{tid}/messages", json={"content": "hello", "user_id": ann["id"]})
    settle(server, a.http, tid)
    assert agent_messages(a, tid) == []


def test_agent_outside_the_threads_team_does_not_reply(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann, inside, outside = a.user("Ann"), a.agent("Inside", "inside"), a.agent("Outside", "outside")
    routine(a, inside["id"])
    routine(a, outside["id"])
    # "outside" is a member of another team of the same org only
    a.team("Other team", ("agent", outside["id"]))
    tid = team_thread(a, ("user", ann["id"]), ("agent", inside["id"]))
    trig = a.ok("POST", f"/threads/{tid}/messages", json={"content": "hi", "user_id": ann["id"]})
    settle(server, a.http, tid)
    msgs = agent_messages(a, tid)
    assert [(m["sender"]["id"], m["causation_id"]) for m in msgs] == [(inside["id"], trig["id"])]
    # removed from the team, "inside" stops answering too
    a.ok(
        "DELETE", f"/teams/{a.ok('GET', f'/threads/{tid}')['team_id']}/members/agent/{inside['id']}"
    )
    a.ok("POST", f"/threads/{tid}/messages", json={"content": "still there?", "user_id": ann["id"]})
    settle(server, a.http, tid)
    assert len(agent_messages(a, tid)) == 1


def test_an_agent_never_answers_its_own_message(server: LiveServer, make_org) -> None:
    a: Org = make_org("Acme")
    ann, bot = a.user("Ann"), a.agent("Bot", "bot")
    routine(a, bot["id"])
    tid = team_thread(a, ("user", ann["id"]), ("agent", bot["id"]))
    own = a.ok(
        "POST", f"/threads/{tid}/messages", json={"content": "I speak", "agent_id": bot["id"]}
    )
    settle(server, a.http, tid)
    msgs = agent_messages(a, tid)
    assert [m["id"] for m in msgs] == [own["id"]]
    # its reply to a user message does not make it answer itself either
    trig = a.ok("POST", f"/threads/{tid}/messages", json={"content": "hi", "user_id": ann["id"]})
    settle(server, a.http, tid)
    msgs = agent_messages(a, tid)
    assert [m["causation_id"] for m in msgs] == [None, trig["id"]]


# ------------------------------------------------------------------------- runaway guard


def _network_with_two_agents(make_org: Any, model: str) -> tuple[Org, Org, dict[str, Any], str]:
    acme, globex = make_org("Acme"), make_org("Globex")
    ann = acme.user("Ann")
    a_bot = acme.agent("Acme Bot", "bot", model=model)
    g_bot = globex.agent("Globex Bot", "bot", model=model)
    routine(acme, a_bot["id"])
    routine(globex, g_bot["id"])
    net = acme.ok("POST", "/networks", json={"name": "Joint"})
    code = acme.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    globex.ok("POST", "/networks/join", json={"code": code, "agent_ids": [g_bot["id"]]})
    for m in ({"user_id": ann["id"]}, {"agent_id": a_bot["id"]}):
        acme.ok("POST", f"/networks/{net['id']}/members", json=m)
    tid = acme.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Loop"})["id"]
    return acme, globex, ann, tid


def test_runaway_guard_stops_two_chatty_agents(server: LiveServer, make_org) -> None:
    calls = Counter[str]()

    def chatty(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["n"] += 1
        return ModelResponse(parts=[TextPart(f"Let me add one more point, number {calls['n']}.")])

    model = register("chatty", chatty)
    acme, globex, ann, tid = _network_with_two_agents(make_org, model)
    trig = acme.ok("POST", f"/threads/{tid}/messages", json={"content": "Go", "user_id": ann["id"]})
    settle(server, acme.http, tid)

    msgs = agent_messages(acme, tid)
    assert len(msgs) == 4  # the default agent_budget
    assert all(m["seq"] > trig["seq"] for m in msgs)
    assert {m["sender"]["org_name"] for m in msgs} == {"Acme", "Globex"}
    assert all(m["content"].startswith("Let me add one more point") for m in msgs)
    assert acme.ok("GET", f"/threads/{tid}")["consecutive_agent_messages"] == 4
    refused = [
        r
        for org in (acme, globex)
        for r in org.ok("GET", "/audit", params={"outcome": "refused", "resource_id": tid})
    ]
    assert refused, "the runaway guard left no trace in the audit log"
    assert all(r["reason"].startswith("agent_budget_exhausted") for r in refused)
    assert all(r["action"] == "envelope.message" for r in refused)
    # quiet afterwards: nothing more happens without a person
    settle(server, acme.http, tid)
    assert len(agent_messages(acme, tid)) == 4

    # a person speaking gives the agents a fresh budget, again bounded
    acme.ok("POST", f"/threads/{tid}/messages", json={"content": "More", "user_id": ann["id"]})
    settle(server, acme.http, tid)
    assert len(agent_messages(acme, tid)) == 8


def test_budget_zero_means_no_agent_message_at_all(server: LiveServer, make_org) -> None:
    calls = Counter[str]()

    def chatty(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["n"] += 1
        return ModelResponse(parts=[TextPart("I always have something to say.")])

    model = register("chatty0", chatty)
    acme, globex, ann, tid = _network_with_two_agents(make_org, model)
    assert acme.ok("PATCH", f"/threads/{tid}", json={"agent_budget": 0})["agent_budget"] == 0
    acme.ok("POST", f"/threads/{tid}/messages", json={"content": "Go", "user_id": ann["id"]})
    settle(server, acme.http, tid)
    assert agent_messages(acme, tid) == []
    assert calls["n"] == 0  # the budget is checked before any model call
    refused = [
        r
        for org in (acme, globex)
        for r in org.ok("GET", "/audit", params={"outcome": "refused", "resource_id": tid})
    ]
    assert len(refused) == 2


# ------------------------------------------------------------------------------- prompts


def _load_demo_knowledge(org: Org, company: str) -> None:
    docs = [
        {"name": p.name, "content": p.read_text(encoding="utf-8")}
        for p in sorted((DEMO / company / "knowledge").glob("*.md"))
    ]
    assert docs
    org.ok("POST", "/knowledge", json={"documents": docs})


def _status_note(marker: str, extra: str = "") -> str:
    """A short knowledge sentence that fits the trigger below (its rare words) and is full of
    status/risk words, so a participate prompt picks it over anything in the demo documents;
    ``extra`` adds more such words to outrank the others."""
    return (
        f"Status {marker}: quasar zebrafact webhook blocker, risk, issue, problem, open, "
        f"pending, delayed{extra}."
    )


def _has_line(prompt: str, *parts: str) -> bool:
    """True when one line of ``prompt`` holds every one of ``parts``."""
    return any(all(p in line for p in parts) for line in prompt.splitlines())


def test_prompt_holds_history_and_own_knowledge_only(server: LiveServer, make_org) -> None:
    prompts: dict[str, list[str]] = {"acme": [], "globex": []}
    lock = threading.Lock()

    def inspector(key: str) -> Any:
        def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            with lock:
                prompts[key].append(prompt_text(messages))
            return ModelResponse(parts=[TextPart(f"Noted by {key}.")])

        return fn

    acme, globex = make_org("Acme Corp"), make_org("Globex Inc")
    _load_demo_knowledge(acme, "acme")
    _load_demo_knowledge(globex, "globex")
    mark = {
        k: f"{k.upper()}{secrets.token_hex(3)}"
        for k in ("own", "gown", "sibling", "adoc", "gdoc", "apriv", "gpriv")
    }

    alex, sam = acme.user("Alex Rivera"), globex.user("Sam Chen")
    a_bot = acme.agent("Acme Ops", "ops", model=register("inspect-acme", inspector("acme")))
    a_sib = acme.agent("Acme Sibling", "sibling")
    g_bot = globex.agent(
        "Globex Delivery", "delivery", model=register("inspect-g", inspector("globex"))
    )

    def attach(org: Org, url: str, name: str, text: str) -> None:
        org.ok("POST", url, json={"documents": [{"name": name, "content": text}]})

    # Every org and agent holds a note that fits the trigger. The answering agent's own note
    # outranks its org's note; another org's agent note ties with it and a sibling agent's note
    # outranks everything: were any of them retrievable, it would show up in the prompt.
    attach(
        acme, f"/agents/{a_bot['id']}/knowledge", "own.md", _status_note(mark["own"], ", failed")
    )
    attach(
        globex,
        f"/agents/{g_bot['id']}/knowledge",
        "gown.md",
        _status_note(mark["gown"], ", failed"),
    )
    attach(
        acme,
        f"/agents/{a_sib['id']}/knowledge",
        "sib.md",
        _status_note(mark["sibling"], ", failed, unresolved, cannot"),
    )
    attach(acme, "/knowledge", "a.md", _status_note(f"{mark['adoc']} ACME-PRIVATE-7731"))
    attach(globex, "/knowledge", "g.md", _status_note(f"{mark['gdoc']} GLOBEX-PRIVATE-4419"))

    # private threads of each org, with private messages
    words = "quasar zebrafact webhook"
    a_priv = team_thread(acme, ("user", alex["id"]), ("agent", a_bot["id"]))
    acme.ok(
        "POST",
        f"/threads/{a_priv}/messages",
        json={"content": f"{words} {mark['apriv']}", "user_id": alex["id"]},
    )
    g_priv = team_thread(globex, ("user", sam["id"]), ("agent", g_bot["id"]))
    globex.ok(
        "POST",
        f"/threads/{g_priv}/messages",
        json={"content": f"{words} {mark['gpriv']}", "user_id": sam["id"]},
    )

    # the shared network thread with some history
    net = acme.ok("POST", "/networks", json={"name": "Rollout"})
    code = acme.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    globex.ok(
        "POST",
        "/networks/join",
        json={"code": code, "agent_ids": [g_bot["id"]], "user_ids": [sam["id"]]},
    )
    for m in ({"user_id": alex["id"]}, {"agent_id": a_bot["id"]}):
        acme.ok("POST", f"/networks/{net['id']}/members", json=m)
    tid = acme.ok("POST", f"/networks/{net['id']}/threads", json={"title": "Cutover"})["id"]
    history = [
        (acme, alex, "Acme Corp", "Cutover is Thursday."),
        (globex, sam, "Globex Inc", "Retries are still open."),
    ]
    for org, who, _, text in history:
        org.ok("POST", f"/threads/{tid}/messages", json={"content": text, "user_id": who["id"]})
    settle(server, acme.http, tid, a_priv)
    settle(server, globex.http, g_priv)
    assert prompts == {"acme": [], "globex": []}  # no routine yet

    # routines start now: the next message is the first trigger either agent sees here
    routine(acme, a_bot["id"])
    routine(globex, g_bot["id"])
    trigger = f"What is the {words} status?"
    acme.ok("POST", f"/threads/{tid}/messages", json={"content": trigger, "user_id": alex["id"]})
    settle(server, acme.http, tid, a_priv)
    settle(server, globex.http, g_priv)

    assert prompts["acme"] and prompts["globex"]
    first_acme, first_globex = prompts["acme"][0], prompts["globex"][0]
    for p in (first_acme, first_globex):
        for _, who, org_name, text in history:
            assert _has_line(p, who["name"], org_name, text), (who["name"], p)
        # the message answered is the user turn itself; the ask names its sender
        assert trigger in p.splitlines(), p
        assert _has_line(p, "Reply to Alex Rivera of Acme Corp"), p
    assert _has_line(first_acme, "Acme Ops", "Acme Corp")
    assert _has_line(first_globex, "Globex Delivery", "Globex Inc")
    assert mark["own"] in first_acme, first_acme
    assert mark["gown"] in first_globex, first_globex

    acme_forbidden = ("GLOBEX-PRIVATE-4419", mark["gdoc"], mark["gown"], mark["sibling"])
    globex_forbidden = ("ACME-PRIVATE-7731", mark["adoc"], mark["own"], mark["sibling"])
    for p in prompts["acme"]:
        for forbidden in (*acme_forbidden, mark["gpriv"], mark["apriv"]):
            assert forbidden not in p, forbidden
    for p in prompts["globex"]:
        for forbidden in (*globex_forbidden, mark["apriv"], mark["gpriv"]):
            assert forbidden not in p, forbidden
    # the agents' replies are in the shared thread, attributed to each org
    replies = {m["sender"]["name"]: m for m in agent_messages(acme, tid)}
    assert replies["Acme Ops"]["content"] == "Noted by acme."
    assert replies["Globex Delivery"]["content"] == "Noted by globex."
    assert replies["Globex Delivery"]["sender"]["org_name"] == "Globex Inc"


def test_reply_key_cannot_be_squatted_by_another_sender(server: LiveServer, make_org) -> None:
    release = threading.Event()

    async def slow(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert await asyncio.to_thread(release.wait, 30)
        return ModelResponse(parts=[TextPart("My real answer.")])

    acme, globex = make_org("Acme"), make_org("Globex")
    alex, sam = acme.user("Alex"), globex.user("Sam")
    bot = acme.agent("Acme Bot", "bot", model=register("slow", slow))
    routine(acme, bot["id"])
    net = acme.ok("POST", "/networks", json={"name": "N"})
    code = acme.ok("POST", f"/networks/{net['id']}/invites", json={})["join_code"]
    globex.ok("POST", "/networks/join", json={"code": code, "user_ids": [sam["id"]]})
    for m in ({"user_id": alex["id"]}, {"agent_id": bot["id"]}):
        acme.ok("POST", f"/networks/{net['id']}/members", json=m)
    tid = acme.ok("POST", f"/networks/{net['id']}/threads", json={"title": "t"})["id"]
    trig = acme.ok(
        "POST", f"/threads/{tid}/messages", json={"content": "Q?", "user_id": alex["id"]}
    )
    # Globex's user sees the trigger and the Acme agent's id, and posts under its reply key.
    globex.ok(
        "POST",
        f"/threads/{tid}/messages",
        json={
            "content": "fake answer",
            "user_id": sam["id"],
            "idempotency_key": f"reply:{bot['id']}:{trig['id']}",
        },
    )
    release.set()
    settle(server, acme.http, tid)
    answers = [m for m in agent_messages(acme, tid) if m["causation_id"] == trig["id"]]
    assert [(m["sender"]["id"], m["content"]) for m in answers] == [(bot["id"], "My real answer.")]
