"""Rules name principals by id (issue 13, point 1).

A rule's ``inbound_from`` / ``outbound_to`` used to be globs over display names and
``org:<org name>``; a second org that also called itself "Acme" passed ``org:Acme``. Now
entries are agent, user and org ids (plus ``org:self`` and ``*``), compared by id on every path
(runner dispatch, remote-runner claims, a protocol thread's auto-ack, posting); a name given to
the API is resolved to an id when the rule is written, and refused when it names nobody or
several principals. The workflow handoff names of the remote runner follow the same idea.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo

from agent_network.client.models import Rule as ClientRule
from agent_network.model.rule import (
    EVERYONE,
    OWN_ORG,
    EntryUnresolved,
    Party,
    matches,
    resolve_entry,
)
from agent_network.runtime.thread_view import handoff_names
from conftest import LiveServer, Org, assert_error, function_model, open_network, settle

# ------------------------------------------------------------------ pure: matching, resolving

# Names are chosen by their owners: they collide, differ in case, look like keywords or like
# somebody else's id.
PLAIN_NAMES = ["Acme", "acme", "ACME", "Alex", "alex", "Bot", "*", "org:self", "org:Acme", ""]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Party], list[str]]:
    """Up to 4 orgs with up to 3 agents/users each; names drawn from colliding ones and from
    the ids of the world itself. Returns (every party, the name pool)."""
    n_orgs = draw(st.integers(1, 4))
    org_ids = [f"org_{i:04x}" for i in range(n_orgs)]
    people: list[tuple[str, str, str]] = []  # (kind, id, org id)
    for i, oid in enumerate(org_ids):
        for j in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["agent", "user"]))
            prefix = "agt" if kind == "agent" else "usr"
            people.append((kind, f"{prefix}_{i:02x}{j:02x}", oid))
    all_ids = org_ids + [p[1] for p in people]
    name = st.one_of(st.sampled_from(PLAIN_NAMES), st.sampled_from(all_ids))
    org_names = {oid: draw(name) for oid in org_ids}
    parties = [Party("org", oid, org_names[oid], oid, org_names[oid]) for oid in org_ids]
    parties += [
        Party(kind, pid, draw(name), oid, org_names[oid])  # type: ignore[arg-type]
        for kind, pid, oid in people
    ]
    return parties, sorted({*PLAIN_NAMES, *all_ids})


def _tiers(parties: list[Party], owner: str) -> tuple[list[Party], list[Party]]:
    return (
        [p for p in parties if p.org_id == owner],
        [p for p in parties if p.org_id != owner],
    )


def _admits(entries: list[str], sender: Party, owner: str) -> bool:
    """The specification, on ids only."""
    return (
        EVERYONE in entries
        or sender.id in entries
        or sender.org_id in entries
        or (OWN_ORG in entries and sender.org_id == owner)
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), world=worlds())
def test_matches_decides_on_ids_only(data: st.DataObject, world: Any) -> None:
    parties, pool = world
    owner = data.draw(st.sampled_from([p.id for p in parties if p.kind == "org"]))
    people = [p for p in parties if p.kind != "org"]
    if not people:
        return
    sender = data.draw(st.sampled_from(people))
    ids = [p.id for p in parties]
    entries = data.draw(
        st.lists(st.sampled_from([EVERYONE, OWN_ORG, *ids, *pool, *(f"org:{n}" for n in pool)]))
    )
    assert matches(entries, sender.id, sender.org_id, owner) == _admits(entries, sender, owner)
    # whatever a sender or its org is called, its names never admit it
    names = [sender.name, f"org:{sender.org_name}", sender.name.upper(), sender.name.lower()]
    by_name = [n for n in names if n not in (EVERYONE, OWN_ORG, sender.id, sender.org_id)]
    assert not matches(by_name, sender.id, sender.org_id, owner)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), world=worlds())
def test_a_resolved_name_admits_exactly_whom_it_resolved_to(
    data: st.DataObject, world: Any
) -> None:
    parties, pool = world
    owner = data.draw(st.sampled_from([p.id for p in parties if p.kind == "org"]))
    own, shared = _tiers(parties, owner)
    entry = data.draw(st.sampled_from([*pool, *(f"org:{n}" for n in pool)]))
    visible = {p.id: p for p in parties}
    try:
        resolved = resolve_entry(entry, own, shared)
    except EntryUnresolved as err:
        assert err.entry == entry
        if err.candidates:  # ambiguous: several of one tier have the name
            assert len(err.candidates) >= 2
            assert len({p.org_id == owner for p in err.candidates}) == 1
            assert len({p.name.lower() for p in err.candidates}) == 1
        return
    assert resolved in (EVERYONE, OWN_ORG) or resolved in visible
    if resolved in (EVERYONE, OWN_ORG) or resolved == entry:
        return
    target = visible[resolved]
    name = entry[4:] if entry[:4].lower() == "org:" else entry
    assert target.name.lower() == name.lower()
    assert (target.kind == "org") == (entry[:4].lower() == "org:")
    tier = own if target.org_id == owner else shared
    same = [
        p
        for p in tier
        if p.name.lower() == name.lower() and (p.kind == "org") == (target.kind == "org")
    ]
    assert same == [target]  # the only one of its tier
    if tier is shared:  # the own org had nobody called that
        assert not [
            p
            for p in own
            if p.name.lower() == name.lower() and (p.kind == "org") == (target.kind == "org")
        ]
    # the stored id admits the principal (or the org's members) and nobody else, however
    # many others share its name
    for sender in (p for p in parties if p.kind != "org"):
        expected = sender.id == resolved or sender.org_id == resolved
        assert matches([resolved], sender.id, sender.org_id, owner) == expected


def test_resolve_refuses_patterns_unknown_ids_and_ambiguity() -> None:
    a1 = Party("org", "org_a1", "Acme", "org_a1", "Acme")
    a2 = Party("org", "org_a2", "Acme", "org_a2", "Acme")
    me = Party("org", "org_me", "Carrier", "org_me", "Carrier")
    bot = Party("agent", "agt_1", "Bot", "org_me", "Carrier")
    for entry in ("Ac*", "A?me", "[A]cme", "org:*", "**", "agt_unknown", "org_unknown", "Nobody"):
        with pytest.raises(EntryUnresolved):
            resolve_entry(entry, [me, bot], [a1, a2])
    with pytest.raises(EntryUnresolved, match="ambiguous") as err:
        resolve_entry("org:acme", [me, bot], [a1, a2])
    assert {p.id for p in err.value.candidates} == {"org_a1", "org_a2"}
    assert resolve_entry("org_a2", [me, bot], [a1, a2]) == "org_a2"
    assert resolve_entry("BOT", [me, bot], [a1, a2]) == "agt_1"
    assert resolve_entry("org:carrier", [me, bot], [a1, a2]) == "org_me"
    assert resolve_entry("*", [], []) == "*" and resolve_entry("org:self", [], []) == "org:self"


@settings(max_examples=200, deadline=None)
@given(
    people=st.lists(
        st.tuples(
            st.sampled_from(["agt_1", "agt_2", "usr_3", "agt_4"]), st.sampled_from(PLAIN_NAMES)
        ),
        max_size=6,
        unique_by=lambda p: p[0],
    ),
    knob=st.dictionaries(
        st.sampled_from(PLAIN_NAMES), st.sampled_from(["agt_1", "agt_2", "usr_3"])
    ),
)
def test_handoff_names_cannot_be_taken_over_by_a_rename(
    people: list[tuple[str, str]], knob: dict[str, str]
) -> None:
    """The remote runner's handoff targets: the names the thread bound at creation win over
    display names, and a display name two participants share names neither."""
    names = handoff_names(knob, people)
    for name, pid in knob.items():
        assert names[name] == pid
    for name in {n for _, n in people}:
        holders = {pid for pid, n in people if n == name}
        if name and name not in knob:
            if len(holders) == 1:
                assert names[name] in holders
            else:
                assert name not in names


# ------------------------------------------------------------------ the two-"Acme" attack


@pytest.fixture
def answers() -> Iterator[str]:
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("Noted, on it.")])

    yield function_model("rule-identity", answer)


class Acmes:
    """Carrier hosts a network with its agent Desk and person Cora; two guest orgs both call
    themselves "Acme", and each has a person called "Alex"; a fourth org, Outside, shares
    nothing with Carrier."""

    def __init__(self, srv: LiveServer, model: str) -> None:
        self.carrier, self.acme, self.fake = Org(srv, "Carrier"), Org(srv, "Acme"), Org(srv, "Acme")
        self.outside = Org(srv, "Outside")
        self.cora = self.carrier.user("Cora")
        self.desk = self.carrier.agent("Desk", "desk", model=model)
        self.carrier.ok("POST", f"/agents/{self.desk['id']}/routines", json={"name": "participate"})
        self.alex, self.mallory = self.acme.user("Alex"), self.fake.user("Alex")
        self.stranger = self.outside.user("Stan")
        self.net = open_network(
            self.carrier,
            {self.acme: [("user", self.alex["id"])], self.fake: [("user", self.mallory["id"])]},
            ("agent", self.desk["id"]),
            ("user", self.cora["id"]),
        )
        self.thread = self.carrier.ok(
            "POST", f"/networks/{self.net['id']}/threads", json={"title": "t", "agent_budget": 50}
        )

    def rule_url(self) -> str:
        return f"/agents/{self.desk['id']}/rule"

    def close(self) -> None:
        for org in (self.carrier, self.acme, self.fake, self.outside):
            org.http.close()


@pytest.fixture
def acmes(server: LiveServer, answers: str) -> Iterator[Acmes]:
    w = Acmes(server, answers)
    yield w
    w.close()


def _desk_replies(w: Acmes) -> list[dict[str, Any]]:
    tid = w.thread["id"]
    items = w.carrier.ok("GET", f"/threads/{tid}/messages", params={"limit": 1000})["items"]
    return [m for m in items if m["sender"]["id"] == w.desk["id"]]


def test_an_org_name_two_orgs_have_is_refused_and_an_org_id_admits_only_that_org(
    server: LiveServer, acmes: Acmes
) -> None:
    w = acmes
    for entry in ("org:Acme", "Alex"):
        err = assert_error(
            w.carrier.http.put(w.rule_url(), json={"inbound_from": [entry]}),
            422,
            "unresolved_principal",
        )
        assert entry in err["message"] and "ambiguous" in err["message"], err
        assert err["details"]["field"] == "inbound_from" and err["details"]["entry"] == entry
        ids = {c["id"] for c in err["details"]["candidates"]}
        assert ids in ({w.acme.id, w.fake.id}, {w.alex["id"], w.mallory["id"]}), err
    assert w.carrier.ok("GET", w.rule_url())["inbound_from"] == ["*"]  # nothing written

    shown = w.carrier.ok("PUT", w.rule_url(), json={"inbound_from": [w.acme.id]})
    assert shown["inbound_from"] == [w.acme.id]
    label = {"kind": "org", "name": "Acme", "org_id": w.acme.id, "org_name": "Acme"}
    assert shown["principals"] == {w.acme.id: label}
    assert w.carrier.ok("GET", w.rule_url()) == shown

    tid = w.thread["id"]
    w.fake.ok(
        "POST",
        f"/threads/{tid}/messages",
        json={"content": "I am Acme", "user_id": w.mallory["id"]},
    )
    settle(server, w.carrier.http, tid)
    assert _desk_replies(w) == []  # the other "Acme" does not trigger Desk
    refused = w.carrier.ok("GET", "/audit", params={"action": "rule.refused"})
    assert any(w.mallory["id"] in (r["reason"] or "") for r in refused), refused
    sent = w.acme.ok(
        "POST", f"/threads/{tid}/messages", json={"content": "hi", "user_id": w.alex["id"]}
    )
    settle(server, w.carrier.http, tid)
    replies = _desk_replies(w)
    assert len(replies) == 1 and replies[0]["causation_id"] == sent["id"], replies


def test_names_resolve_to_ids_when_written_own_org_first(acmes: Acmes) -> None:
    w = acmes
    fake_bot = w.fake.agent("Cora", "cora")  # the fake Acme copies Carrier's person's name
    w.fake.ok("POST", f"/networks/{w.net['id']}/members", json={"agent_id": fake_bot["id"]})
    shown = w.carrier.ok(
        "PUT",
        w.rule_url(),
        json={
            "inbound_from": ["cora", "org:self", "org:CARRIER", w.alex["id"], "Cora"],
            "outbound_to": ["*"],
        },
    )
    # "cora" is Carrier's own person, not the fake Acme's agent of that name; duplicates go
    assert shown["inbound_from"] == [w.cora["id"], "org:self", w.carrier.id, w.alex["id"]]
    assert shown["principals"][w.cora["id"]] == {
        "kind": "user",
        "name": "Cora",
        "org_id": w.carrier.id,
        "org_name": "Carrier",
    }
    assert shown["principals"][w.alex["id"]]["org_id"] == w.acme.id
    # a name only another org's principal has resolves among those sharing the network
    gus = w.acme.user("Gus")
    w.acme.ok("POST", f"/networks/{w.net['id']}/members", json={"user_id": gus["id"]})
    assert w.carrier.ok("PUT", w.rule_url(), json={"inbound_from": ["gus"]})["inbound_from"] == [
        gus["id"]
    ]
    # a rule read can be written back as it is (principals is ignored); the SDK model takes it
    before = w.carrier.ok("GET", w.rule_url())
    assert w.carrier.ok("PUT", w.rule_url(), json=before) == before
    assert ClientRule.model_validate(before).principals[gus["id"]].name == "Gus"
    # refused, and nothing written: patterns, names nobody has, ids of principals the org
    # shares nothing with (they exist, but are not Carrier's to name)
    for bad in (
        "Ac*",
        "A?ex",
        "",
        "Nobody",
        "org:Outside",
        "Stan",
        w.outside.id,
        w.stranger["id"],
        "agt_000000000000000000000000",
    ):
        for field in ("inbound_from", "outbound_to"):
            err = assert_error(
                w.carrier.http.put(w.rule_url(), json={field: [bad]}), 422, "unresolved_principal"
            )
            assert err["details"]["field"] == field and err["details"]["entry"] == bad
    assert w.carrier.ok("GET", w.rule_url()) == before
    # the audit record of a rule change holds the stored ids
    sets = w.carrier.ok("GET", "/audit", params={"action": "agent.rule_set"})  # oldest first
    assert sets[-1]["data"]["inbound_from"] == [gus["id"]], sets[-1]


def test_outbound_to_is_checked_by_id(acmes: Acmes) -> None:
    w = acmes
    tid = w.thread["id"]
    post = {"content": "status", "agent_id": w.desk["id"]}
    w.carrier.ok("PUT", w.rule_url(), json={"outbound_to": ["org:self", w.acme.id]})
    err = assert_error(
        w.carrier.http.post(f"/threads/{tid}/messages", json=post), 403, "rule_violation"
    )
    assert "outbound_to does not admit 'Alex'" in err["message"], err  # the fake Acme's Alex
    w.carrier.ok("PUT", w.rule_url(), json={"outbound_to": ["org:self", w.acme.id, w.fake.id]})
    w.carrier.ok("POST", f"/threads/{tid}/messages", json=post)


def test_a_protocol_thread_opened_by_the_other_acme_is_not_acked(acmes: Acmes) -> None:
    w = acmes
    w.carrier.ok("PUT", w.rule_url(), json={"inbound_from": [w.acme.id]})

    def open_as(org: Org, person: dict[str, Any]) -> dict[str, Any]:
        body = {
            "title": "talk",
            "adapter": "conversation",
            "participants": [
                {"kind": "user", "id": person["id"]},
                {"kind": "agent", "id": w.desk["id"]},
            ],
        }
        return dict(org.ok("POST", f"/networks/{w.net['id']}/threads", json=body))

    by_fake = open_as(w.fake, w.mallory)
    assert by_fake["status"] == "invited"
    assert [p["id"] for p in by_fake["pending_acks"]] == [w.desk["id"]]
    audit = w.carrier.ok(
        "GET", "/audit", params={"action": "rule.refused", "resource_id": by_fake["id"]}
    )
    assert audit and "inbound_from" in audit[0]["reason"], audit
    assert open_as(w.acme, w.alex)["status"] == "active"


def test_a_remote_runner_claim_applies_the_rule_by_id(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path / "an.db", run_routines=False)
    srv.start()
    try:
        w = Acmes(srv, "test")
        try:
            w.carrier.ok("PUT", w.rule_url(), json={"inbound_from": [w.acme.id]})
            tid = w.thread["id"]

            def claim(org: Org, person: dict[str, Any]) -> Any:
                sent = org.ok(
                    "POST",
                    f"/threads/{tid}/messages",
                    json={"content": "q", "user_id": person["id"]},
                )
                body = {
                    "agent_id": w.desk["id"],
                    "thread_id": tid,
                    "trigger_seq": sent["seq"],
                    "runner_id": "r",
                }
                return w.carrier.http.post("/claims", json=body)

            err = assert_error(claim(w.fake, w.mallory), 409, "claim_done")
            assert "inbound_from" in err["message"] and w.mallory["id"] in err["message"], err
            granted = claim(w.acme, w.alex)
            assert granted.status_code in (200, 201), granted.text
        finally:
            w.close()
    finally:
        srv.stop()
