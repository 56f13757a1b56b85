"""The ``triage`` routine preset (hub-and-spoke): a coordinator agent classifies every request in
its intake thread(s) and forwards it to a specialist thread, then says in intake where it went.

Pure parts (config shape, label parsing, keywords) are tested directly. The runner is tested
in-process over a real hub on a real SQLite file (services create the org, agents, team,
threads and routines); models are pydantic-ai ``FunctionModel``s that count their calls, or the
``test`` model (it always answers "Acknowledged.", no label: the keyword path). Config
validation is tested over REST on a live server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo
from sqlalchemy import select

from agent_network.errors import InvalidRequestError
from agent_network.model.envelope import Envelope
from agent_network.model.rule import RateLimit, Rule
from agent_network.protocol.events import EV_MESSAGE
from agent_network.runtime.triage import (
    MARKER,
    decide,
    keyword_label,
    label_in,
    parse_config,
    undelivered_content,
)
from agent_network.services.principal import Principal
from agent_network.store.tables import audit_log
from conftest import LiveServer, Org, World, assert_error, function_model, world

pytestmark = pytest.mark.anyio


class Labeler:
    """A FunctionModel body answering ``answer`` and keeping every prompt it was shown."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.prompts.append(
            "\n".join(
                str(getattr(p, "content", "")) for m in messages for p in m.parts if p is not None
            )
        )
        return ModelResponse(parts=[TextPart(self.answer)])


def model(body: Any) -> str:
    return function_model("triage", body)


# ----------------------------------------------------------------------------- pure parts

CONFIG = {
    "intake": "thr_intake",
    "routes": {
        "billing": {"thread_id": "thr_b", "keywords": ["invoice", "refund", "charged twice"]},
        "technical": {"thread_id": "thr_t", "keywords": ["error", "api", "upload"]},
    },
}


def test_parse_config_normalises_and_names_the_bad_key() -> None:
    config = parse_config(CONFIG)
    assert config.intake == ("thr_intake",)
    assert config.labels == ["billing", "technical"]
    assert config.fallback is None

    def bad(raw: Any, key: str) -> None:
        with pytest.raises(InvalidRequestError) as err:
            parse_config(raw)
        assert err.value.message.startswith(key), err.value.message

    routes = CONFIG["routes"]
    bad([], "config:")
    bad({"routes": routes}, "config.intake")
    bad({**CONFIG, "intake": []}, "config.intake")
    bad({**CONFIG, "intake": ["thr_x", "thr_x"]}, "config.intake")
    bad({**CONFIG, "routes": {}}, "config.routes")
    bad({**CONFIG, "extra": 1}, "config.extra")
    bad({**CONFIG, "routes": {"billing": {"keywords": ["x"]}}}, "config.routes.billing.thread_id")
    bad({**CONFIG, "routes": {"bill ing": {"thread_id": "thr_b"}}}, "config.routes.bill ing")
    bad({**CONFIG, "routes": {"x" * 33: {"thread_id": "thr_b"}}}, "config.routes.xxx")
    bad(
        {**CONFIG, "routes": {"Billing": {"thread_id": "a"}, "billing": {"thread_id": "b"}}},
        "config.routes.billing",
    )
    bad(
        {**CONFIG, "routes": {"b": {"thread_id": "thr_b", "keywords": [" "]}}},
        "config.routes.b.keywords[0]",
    )
    bad(
        {**CONFIG, "routes": {"b": {"thread_id": "thr_b", "keywords": "invoice"}}},
        "config.routes.b.keywords",
    )
    bad({**CONFIG, "routes": {"b": {"thread_id": "thr_intake"}}}, "config.routes.b.thread_id")
    bad({**CONFIG, "fallback": "other"}, "config.fallback")
    bad({**CONFIG, "use_model": "no"}, "config.use_model")


def test_label_in_takes_the_first_whole_word_label_ignoring_case() -> None:
    labels = ["billing", "technical", "other"]
    assert label_in("Billing.", labels) == "billing"
    assert label_in("Category: TECHNICAL (not billing)", labels) == "technical"
    assert label_in("rebilling is no label, nor othering", labels) is None
    assert label_in("", labels) is None
    assert label_in("tech-support", ["tech"]) is None  # '-' continues an identifier


def test_keywords_most_hits_then_config_order_then_fallback() -> None:
    config = parse_config(CONFIG)
    assert keyword_label("I was CHARGED  twice on my invoice", config) == "billing"
    # one hit each: the first route in config order
    assert keyword_label("refund after an error", config) == "billing"
    # two technical hits beat one billing hit
    assert keyword_label("API error on my invoice page, another error", config) == "technical"
    assert keyword_label("apis and uploading are not whole words", config) is None
    assert decide(config, "billing", "upload error") == ("billing", "model")
    assert decide(config, "Acknowledged.", "upload error") == ("technical", "keywords")
    assert decide(config, None, "hello") == (None, None)
    with_fallback = parse_config({**CONFIG, "fallback": "technical"})
    assert decide(with_fallback, "no idea", "hello") == ("technical", "fallback")


# ----------------------------------------------------------------------------- the world


@dataclass
class Desk:
    """A support desk: user Ann, the Triage agent (no participate routine), specialists with
    participate routines, a restricted intake thread (Ann, Triage) and one restricted route
    thread per specialist (Triage, the specialist)."""

    org: Principal
    org_id: str
    team_id: str
    ann: str
    triage: str
    specialists: dict[str, str]  # label -> agent id
    intake: str
    routes: dict[str, str]  # label -> thread id
    titles: dict[str, str] = field(default_factory=dict)  # label -> route thread title


async def desk(
    w: World,
    *,
    triage_model: str = "test",
    labels: tuple[str, ...] = ("billing", "technical"),
    specialist_routine: bool = True,
) -> Desk:
    s = w.services
    created = await s.orgs.create_org(Principal("admin", None, "adm_test"), "Acme")
    org = await s.orgs.authenticate(created["secret"])
    team = await s.teams.create(org, "team", "Support")
    ann = (await s.orgs.create_user(org, "Ann", None))["id"]
    await s.teams.add_member(org, "team", team["id"], user_id=ann)
    triage = (await s.agents.create_agent(org, name="Triage", lookup_key="triage",
                                          model=triage_model))["id"]  # fmt: skip
    await s.teams.add_member(org, "team", team["id"], agent_id=triage)
    specialists, routes, titles = {}, {}, {}
    for label in labels:
        agent = await s.agents.create_agent(org, name=f"{label.title()} Agent", lookup_key=label)
        specialists[label] = agent["id"]
        await s.teams.add_member(org, "team", team["id"], agent_id=agent["id"])
        if specialist_routine:
            await s.agents.create_routine(
                org,
                agent["id"],
                name="participate",
                event_type="thread.message_added",
                handler_type="preset",
                preset_name="participate",
            )
        titles[label] = f"{label.title()} desk"
        routes[label] = (
            await s.threads.create(
                org,
                team["id"],
                titles[label],
                visibility="restricted",
                participants=[("agent", triage), ("agent", agent["id"])],
            )
        )["id"]
    intake = (
        await s.threads.create(
            org,
            team["id"],
            "Support intake",
            visibility="restricted",
            participants=[("user", ann), ("agent", triage)],
        )
    )["id"]
    return Desk(
        org, created["org"]["id"], team["id"], ann, triage, specialists, intake, routes, titles
    )


KEYWORDS = {
    "billing": ["invoice", "refund", "charged"],
    "technical": ["error", "api", "upload"],
}


async def add_triage(w: World, d: Desk, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "intake": d.intake,
        "routes": {
            label: {
                "thread_id": tid,
                "keywords": KEYWORDS.get(label, []),
                "description": f"questions about {label}",
            }
            for label, tid in d.routes.items()
        },
        **extra,
    }
    return await w.services.agents.create_routine(
        d.org,
        d.triage,
        name="triage",
        event_type="thread.message_added",
        handler_type="preset",
        preset_name="triage",
        config=config,
    )


async def settle(w: World, *tids: str, quiet: float = 1.0) -> None:
    """Wait until the runner is idle and the threads have not moved for ``quiet`` seconds (the
    runner dispatches a new envelope after a query, before it counts the job as pending, so
    the quiet period must outlast a query on a loaded machine)."""
    with anyio.fail_after(30):
        last: list[int] = []
        since = time.monotonic()
        while True:
            await w.runner.wait_idle()
            seqs = [(await w.hub.state(t)).last_seq for t in tids]
            if seqs != last:
                last, since = seqs, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await anyio.sleep(0.05)


async def messages(w: World, tid: str) -> list[Envelope]:
    return [e for e in await w.hub.read(tid) if e.type == EV_MESSAGE]


async def ask(w: World, d: Desk, text: str) -> Envelope:
    posted = await w.services.threads.post(d.org, d.intake, text, user_id=d.ann)
    return next(e for e in await messages(w, d.intake) if e.id == posted["id"])


async def refusals(w: World, tid: str) -> list[dict[str, Any]]:
    q = select(audit_log).where(audit_log.c.resource_id == tid, audit_log.c.outcome == "refused")
    async with w.ctx.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(q)).mappings()]


def by(sender: str) -> Callable[[Envelope], bool]:
    return lambda e: e.sender_id == sender


# ----------------------------------------------------------------------------- routing


async def test_routes_by_the_models_label_and_the_specialist_answers(db: Path) -> None:
    labeler = Labeler("Billing.")
    async with world(db) as w:
        d = await desk(w, triage_model=model(labeler))
        await add_triage(w, d)
        # the text has a technical keyword: the model's label wins over keywords
        request = await ask(w, d, "My upload failed and I want my money back")
        with anyio.fail_after(30):  # the forward and the specialist's answer
            while len(await messages(w, d.routes["billing"])) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await settle(w, d.intake, *d.routes.values())

        billing = await messages(w, d.routes["billing"])
        assert await messages(w, d.routes["technical"]) == []
        forward, answer = billing
        assert forward.sender_id == d.triage
        assert forward.data["content"] == (
            "Forwarded from Ann in Support intake: My upload failed and I want my money back"
        )
        assert forward.data["triage"] == {
            "kind": "forward",
            "label": "billing",
            "by": "model",
            "intake_thread_id": d.intake,
            "request_id": request.id,
        }
        assert forward.idempotency_key == f"triage:{d.triage}:{request.id}"
        assert forward.causation_id == request.id
        # the specialist's participate routine answers the forward in its thread
        assert answer.sender_id == d.specialists["billing"]
        assert answer.causation_id == forward.id
        assert answer.data["content"] == "Acknowledged."

        intake = await messages(w, d.intake)
        assert [e.id for e in intake[:1]] == [request.id]
        (reply,) = intake[1:]
        assert reply.sender_id == d.triage
        assert reply.data["content"] == "Routed to billing: Billing desk"
        assert reply.causation_id == request.id
        assert reply.idempotency_key == f"reply:{d.triage}:{request.id}"
        assert reply.data["triage"]["kind"] == "reply"

        # one model call; the prompt lists the labels with their descriptions and the request
        (prompt,) = labeler.prompts
        assert "- billing: questions about billing" in prompt
        assert "- technical: questions about technical" in prompt
        assert "My upload failed" in prompt and "category name only" in prompt


async def test_routes_by_keywords_when_the_model_names_no_label(db: Path) -> None:
    async with world(db) as w:
        d = await desk(w)  # the "test" model answers "Acknowledged."
        await add_triage(w, d)
        first = await ask(w, d, "The API returns an error on every upload")
        await settle(w, d.intake, *d.routes.values())
        second = await ask(w, d, "Please refund the second invoice")
        await settle(w, d.intake, *d.routes.values())

        technical = await messages(w, d.routes["technical"])
        billing = await messages(w, d.routes["billing"])
        assert [e.data["triage"]["request_id"] for e in technical if by(d.triage)(e)] == [first.id]
        assert [e.data["triage"]["request_id"] for e in billing if by(d.triage)(e)] == [second.id]
        assert technical[0].data["triage"]["by"] == "keywords"
        replies = [e for e in await messages(w, d.intake) if by(d.triage)(e)]
        assert [(r.causation_id, r.data["content"]) for r in replies] == [
            (first.id, "Routed to technical: Technical desk"),
            (second.id, "Routed to billing: Billing desk"),
        ]


async def test_use_model_false_asks_no_model(db: Path) -> None:
    labeler = Labeler("billing")
    async with world(db) as w:
        d = await desk(w, triage_model=model(labeler), specialist_routine=False)
        await add_triage(w, d, use_model=False)
        await ask(w, d, "Upload error again")
        await settle(w, d.intake, *d.routes.values())
        (forward,) = await messages(w, d.routes["technical"])
        assert forward.data["triage"]["by"] == "keywords"
        assert labeler.prompts == []


async def test_fallback_then_unroutable(db: Path) -> None:
    async with world(db) as w:
        d = await desk(w, labels=("billing", "technical", "other"))
        routine = await add_triage(w, d, fallback="other")
        request = await ask(w, d, "Do you have an office in Berlin?")
        await settle(w, d.intake, *d.routes.values())
        (forward, _answer) = await messages(w, d.routes["other"])
        assert forward.data["triage"]["label"] == "other"
        assert forward.data["triage"]["by"] == "fallback"
        assert forward.data["triage"]["request_id"] == request.id

        # without a fallback nothing is forwarded: the reply says it could not be routed
        config = dict(routine["config"], fallback=None)
        await w.services.agents.update_routine(d.org, d.triage, routine["id"], {"config": config})
        before = {label: len(await messages(w, tid)) for label, tid in d.routes.items()}
        unroutable = await ask(w, d, "Is the sky blue today?")
        await settle(w, d.intake, *d.routes.values())
        after = {label: len(await messages(w, tid)) for label, tid in d.routes.items()}
        assert after == before
        reply = (await messages(w, d.intake))[-1]
        assert reply.sender_id == d.triage and reply.causation_id == unroutable.id
        assert reply.data["content"].startswith("Could not route this request")
        assert "billing, technical, other" in reply.data["content"]
        assert reply.data["triage"]["label"] is None


async def test_no_loops_and_other_threads_are_ignored(db: Path) -> None:
    calls = Labeler("billing")
    async with world(db) as w:
        d = await desk(w, triage_model=model(calls), specialist_routine=False)
        await add_triage(w, d)
        s = w.services
        # the triage agent's own message in intake is no request
        await s.threads.post(d.org, d.intake, "Good morning, I route requests.", agent_id=d.triage)
        # a message in a thread that is not an intake thread is none either
        lobby = (await s.threads.create(d.org, d.team_id, "Lobby"))["id"]
        await s.threads.post(d.org, lobby, "I need a refund for my invoice", user_id=d.ann)
        await settle(w, d.intake, lobby, *d.routes.values())
        assert calls.prompts == []
        assert [e.sender_id for e in await messages(w, lobby)] == [d.ann]
        for tid in d.routes.values():
            assert await messages(w, tid) == []

        # a second triage agent whose intake is the first one's billing route thread ignores
        # the first one's forwards there (and the first one ignores the second one's output)
        second = await s.agents.create_agent(d.org, name="Triage 2", lookup_key="triage2")
        await s.teams.add_member(d.org, "team", d.team_id, agent_id=second["id"])
        escalation = (await s.threads.create(d.org, d.team_id, "Escalations"))["id"]
        await w.services.threads.widen(
            d.org, d.routes["billing"], participants=[("agent", second["id"]), ("user", d.ann)]
        )
        await s.agents.create_routine(
            d.org,
            second["id"],
            name="triage",
            event_type="thread.message_added",
            handler_type="preset",
            preset_name="triage",
            config={
                "intake": d.routes["billing"],
                "routes": {"escalate": {"thread_id": escalation, "keywords": ["refund"]}},
            },
        )
        request = await ask(w, d, "I need a refund for my invoice")
        await settle(w, d.intake, escalation, *d.routes.values())
        assert len(calls.prompts) == 1
        (forward,) = await messages(w, d.routes["billing"])
        assert forward.data["triage"]["request_id"] == request.id
        assert await messages(w, escalation) == []
        # a person writing in the billing thread is a request for the second triage agent
        await s.threads.post(d.org, d.routes["billing"], "Refund please, again", user_id=d.ann)
        await settle(w, escalation, *d.routes.values())
        (escalated,) = await messages(w, escalation)
        assert escalated.sender_id == second["id"]
        assert escalated.data["content"].startswith("Forwarded from Ann in Billing desk:")
        assert len(calls.prompts) == 1  # the first triage agent did not see that one
        replies = [e for e in await messages(w, d.intake) if by(d.triage)(e)]
        assert [r.causation_id for r in replies] == [None, request.id]  # its greeting, a reply


async def test_exactly_once_after_a_stop_between_the_forward_and_the_reply(db: Path) -> None:
    labeler = Labeler("technical")
    name = model(labeler)
    async with world(db) as w:
        d = await desk(w, triage_model=name, specialist_routine=False)
        await add_triage(w, d)
        real_append = w.hub.append
        stopped = anyio.Event()

        async def append(thread_id: str, **kw: Any) -> Envelope:
            if thread_id == d.intake and str(kw.get("idempotency_key", "")).startswith("reply:"):
                stopped.set()  # the process "dies" here: the reply is never written
                await anyio.sleep_forever()
            return await real_append(thread_id, **kw)

        w.hub.append = append  # type: ignore[method-assign]
        request = await ask(w, d, "Something is broken")
        with anyio.fail_after(30):
            await stopped.wait()
        forwards = await messages(w, d.routes["technical"])
        assert [f.data["triage"]["request_id"] for f in forwards] == [request.id]
        assert [e.id for e in await messages(w, d.intake)] == [request.id]
    assert len(labeler.prompts) == 1

    # a new hub and runner over the same database finish the job: the reply only
    async with world(db) as w:
        await settle(w, d.intake, *d.routes.values())
        assert await messages(w, d.routes["technical"]) == forwards
        assert await messages(w, d.routes["billing"]) == []
        intake = await messages(w, d.intake)
        assert [e.id for e in intake[:1]] == [request.id]
        (reply,) = intake[1:]
        assert reply.data["content"] == "Routed to technical: Technical desk"
        assert reply.data["triage"]["by"] == "model"
        assert reply.causation_id == request.id
        # and a third start changes nothing
    async with world(db) as w:
        await settle(w, d.intake, *d.routes.values())
        assert await messages(w, d.intake) == intake
    assert len(labeler.prompts) == 1  # the classification is not repeated


async def test_checks_before_posting_are_audited(db: Path) -> None:
    async with world(db) as w:
        d = await desk(w, specialist_routine=False)
        await add_triage(w, d)
        s = w.services
        # a spent runaway budget in the route thread: nothing forwarded; the person is told
        # the request stays in intake (instead of waiting for a route that never got it)
        await s.threads.set_budget(d.org, d.routes["billing"], 0)
        await ask(w, d, "Refund my invoice")
        await settle(w, d.intake, *d.routes.values())
        assert await messages(w, d.routes["billing"]) == []
        request, told = await messages(w, d.intake)
        assert told.sender_id == d.triage and told.causation_id == request.id
        assert told.data["content"] == undelivered_content("billing")
        assert told.data[MARKER]["label"] == "billing"
        assert told.data[MARKER]["delivered"] is False
        (refusal,) = await refusals(w, d.intake)
        assert refusal["action"] == "envelope.message"
        assert refusal["reason"].startswith("agent_budget_exhausted: route 'billing'")

        # the rate of the triage agent's rule: one routed request per hour
        await s.rules.put(d.org, d.triage, Rule(rate=RateLimit(messages=1, per_seconds=3600)))
        w.runner.rules = s.rules
        await ask(w, d, "The API gives an error")
        await ask(w, d, "Another upload error")
        await settle(w, d.intake, *d.routes.values())
        assert len(await messages(w, d.routes["technical"])) == 1
        rate = [r for r in await refusals(w, d.intake) if "rate of 1 messages" in r["reason"]]
        assert len(rate) == 1 and rate[0]["action"] == "envelope.message"


# ----------------------------------------------------------------------------- REST


def _rest_desk(srv: LiveServer, make_org: Any) -> tuple[Org, dict[str, Any], dict[str, str]]:
    acme: Org = make_org("Acme")
    ann = acme.user("Ann")
    triage = acme.agent("Triage", "triage")
    billing = acme.agent("Billing Agent", "billing")
    team = acme.team("Support", ("user", ann["id"]), ("agent", triage["id"]),
                     ("agent", billing["id"]))  # fmt: skip
    acme.ok("POST", f"/agents/{billing['id']}/routines", json={"name": "participate"})

    def thread(title: str, *participants: tuple[str, str], **kw: Any) -> str:
        body: dict[str, Any] = {"title": title, **kw}
        if participants:
            body["visibility"] = "restricted"
            body["participants"] = [{"kind": k, "id": i} for k, i in participants]
        return str(acme.ok("POST", f"/teams/{team['id']}/threads", json=body)["id"])

    tids = {
        "intake": thread("Intake", ("user", ann["id"]), ("agent", triage["id"])),
        "billing": thread("Billing", ("agent", triage["id"]), ("agent", billing["id"])),
        "private": thread("Ann and Billing", ("user", ann["id"]), ("agent", billing["id"])),
        "consulting": thread(
            "Consult",
            ("agent", triage["id"]),
            ("agent", billing["id"]),
            adapter="consulting",
        ),
        "ann": ann["id"],
    }
    return acme, triage, tids


def test_config_is_validated_over_rest_with_the_key_named(server: LiveServer, make_org) -> None:
    acme, triage, t = _rest_desk(server, make_org)
    globex: Org = make_org("Globex")
    g_team = globex.team("Other")
    foreign = globex.ok("POST", f"/teams/{g_team['id']}/threads", json={"title": "Theirs"})["id"]
    url = f"/agents/{triage['id']}/routines"

    def create(config: Any) -> Any:
        return acme.http.post(url, json={"name": "t", "preset_name": "triage", "config": config})

    def routes(tid: str) -> dict[str, Any]:
        return {"billing": {"thread_id": tid, "keywords": ["invoice"]}}

    cases = [
        ({"routes": routes(t["billing"])}, "config.intake"),
        ({"intake": t["intake"], "routes": {"no way": {"thread_id": t["billing"]}}},
         "config.routes.no way"),
        ({"intake": t["intake"], "routes": routes(t["billing"]), "fallback": "x"},
         "config.fallback"),
        ({"intake": t["intake"], "routes": routes("thr_doesnotexist")},
         "config.routes.billing.thread_id: thread 'thr_doesnotexist' not found"),
        ({"intake": t["intake"], "routes": routes(foreign)},
         f"config.routes.billing.thread_id: thread '{foreign}' not found"),
        ({"intake": [t["intake"], t["private"]], "routes": routes(t["billing"])},
         "config.intake[1]: agent 'Triage' does not take part"),
        ({"intake": t["intake"], "routes": routes(t["consulting"])},
         "config.routes.billing.thread_id: thread"),
    ]  # fmt: skip
    for config, message in cases:
        error = assert_error(create(config), 422, "invalid_request")
        assert error["message"].startswith(message), (message, error["message"])
    # a thread of another org and one that does not exist answer alike (no leak)
    missing = assert_error(create(cases[3][0]), 422, "invalid_request")["message"]
    hidden = assert_error(create(cases[4][0]), 422, "invalid_request")["message"]
    assert missing.replace("thr_doesnotexist", foreign) == hidden
    assert (
        "consulting thread" in assert_error(create(cases[-1][0]), 422, "invalid_request")["message"]
    )
    assert acme.ok("GET", url) == []  # nothing was stored

    good = {"intake": t["intake"], "routes": routes(t["billing"])}
    created = create(good)
    assert created.status_code == 201, created.text
    routine = created.json()
    assert routine["preset_name"] == "triage"
    assert routine["config"]["intake"] == [t["intake"]]  # stored in normal form
    patch = acme.http.patch(f"{url}/{routine['id']}", json={"config": {**good, "fallback": "nope"}})
    assert assert_error(patch, 422, "invalid_request")["message"].startswith("config.fallback")
    assert acme.ok("GET", url)[0]["config"] == routine["config"]

    # end to end over REST: Ann's request lands in the billing thread, the specialist answers
    posted = acme.ok(
        "POST",
        f"/threads/{t['intake']}/messages",
        json={"content": "Where is my invoice?", "user_id": t["ann"]},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        intake = acme.ok("GET", f"/threads/{t['intake']}/messages")["items"]
        billing = acme.ok("GET", f"/threads/{t['billing']}/messages")["items"]
        if len(intake) >= 2 and len(billing) >= 2:
            break
        time.sleep(0.05)
    assert [m["content"] for m in intake] == ["Where is my invoice?", "Routed to billing: Billing"]
    assert intake[1]["causation_id"] == posted["id"]
    assert billing[0]["content"] == "Forwarded from Ann in Intake: Where is my invoice?"
    assert billing[1]["sender"]["name"] == "Billing Agent"
