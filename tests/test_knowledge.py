"""Knowledge of an org and of its agents: attach, list, search (FTS5), delete, isolation."""

from __future__ import annotations

import secrets

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LiveServer, Org, assert_error

RUNBOOK = """# Billing runbook

Intro paragraph about the migration of invoices.

## Cutover window

The cutover happens on Thursday between 06:00 and 09:00 UTC. Bridge opens early.

## Rollback plan

If the webhook validation fails, we roll back to the legacy platform within two hours.
The rollback decision belongs to the project lead.

## Contacts

Escalate to the duty manager via the pager.
"""


def _docs(*pairs: tuple[str, str]) -> dict[str, object]:
    return {"documents": [{"name": n, "content": c} for n, c in pairs]}


def test_attach_list_search_and_delete(make_org) -> None:
    a: Org = make_org("A")
    bot, other = a.agent("Bot", "bot"), a.agent("Other", "other")
    r = a.http.post(
        "/knowledge", json=_docs(("runbook.md", RUNBOOK), ("faq.md", "Short faq text."))
    )
    assert r.status_code == 201, r.text
    runbook, faq = r.json()
    assert runbook["name"] == "runbook.md" and runbook["agent_id"] is None
    assert runbook["id"].startswith("doc_") and runbook["chunks"] >= 1
    assert faq["chunks"] == 1
    r = a.http.post(
        f"/agents/{bot['id']}/knowledge", json=_docs(("bot.md", "The bot knows the platypus code."))
    )
    assert r.status_code == 201
    bot_doc = r.json()[0]
    assert bot_doc["agent_id"] == bot["id"]
    other_doc = a.ok(
        "POST",
        f"/agents/{other['id']}/knowledge",
        json=_docs(("other.md", "The other agent knows the platypus secret.")),
    )[0]

    listed = a.ok("GET", "/knowledge")
    assert [d["id"] for d in listed] == [runbook["id"], faq["id"]]
    assert [(d["name"], d["chunks"], d["agent_id"]) for d in listed] == [
        ("runbook.md", runbook["chunks"], None),
        ("faq.md", 1, None),
    ]
    assert [d["id"] for d in a.ok("GET", f"/agents/{bot['id']}/knowledge")] == [bot_doc["id"]]
    assert [d["id"] for d in a.ok("GET", f"/agents/{other['id']}/knowledge")] == [other_doc["id"]]

    # the right chunk: the rollback section, with its heading
    hits = a.ok("GET", "/knowledge/search", params={"q": "rollback legacy"})
    assert hits, "no hit for words of the runbook"
    top = hits[0]
    assert top["document_id"] == runbook["id"] and top["document"] == "runbook.md"
    assert "Rollback plan" in top["text"] and "legacy platform" in top["text"]
    assert isinstance(top["score"], float)
    cut = a.ok("GET", "/knowledge/search", params={"q": "When is the cutover window?"})
    assert "Thursday" in cut[0]["text"]

    # agent knowledge: only with that agent's id, never another agent's
    assert a.ok("GET", "/knowledge/search", params={"q": "platypus"}) == []
    hits = a.ok("GET", "/knowledge/search", params={"q": "platypus", "agent_id": bot["id"]})
    assert [h["document_id"] for h in hits] == [bot_doc["id"]]
    hits = a.ok("GET", "/knowledge/search", params={"q": "platypus", "agent_id": other["id"]})
    assert [h["document_id"] for h in hits] == [other_doc["id"]]
    # org-wide knowledge is included in an agent's search
    hits = a.ok("GET", "/knowledge/search", params={"q": "rollback", "agent_id": bot["id"]})
    assert hits[0]["document_id"] == runbook["id"]
    assert len(a.ok("GET", "/knowledge/search", params={"q": "the", "limit": 5})) == 0

    # limit
    many = a.ok(
        "GET", "/knowledge/search", params={"q": "rollback cutover contacts intro", "limit": 2}
    )
    assert len(many) == 2

    r = a.http.delete(f"/knowledge/{runbook['id']}")
    assert r.status_code == 204
    assert a.ok("GET", "/knowledge/search", params={"q": "rollback legacy"}) == []
    assert [d["id"] for d in a.ok("GET", "/knowledge")] == [faq["id"]]
    assert_error(a.http.delete(f"/knowledge/{runbook['id']}"), 404, "not_found")
    # agent documents are deleted the same way
    assert a.http.delete(f"/knowledge/{bot_doc['id']}").status_code == 204
    assert a.ok("GET", "/knowledge/search", params={"q": "platypus", "agent_id": bot["id"]}) == []
    assert a.ok("GET", f"/agents/{bot['id']}/knowledge") == []
    # a new document after a delete is indexed normally
    again = a.ok("POST", "/knowledge", json=_docs(("again.md", "rollback once more")))[0]
    assert [
        h["document_id"] for h in a.ok("GET", "/knowledge/search", params={"q": "rollback"})
    ] == [again["id"]]


def test_long_documents_are_chunked_by_section(make_org) -> None:
    a: Org = make_org("A")
    sections = []
    for i in range(6):
        body = " ".join(f"filler{i}word{j}" for j in range(120))
        sections.append(f"## Section {i}\n\n{body}\n\nUnique term sectionmarker{i}.")
    doc = a.ok("POST", "/knowledge", json=_docs(("long.md", "# Long\n\n" + "\n\n".join(sections))))[
        0
    ]
    assert doc["chunks"] >= 6
    for i in (0, 3, 5):
        hits = a.ok("GET", "/knowledge/search", params={"q": f"sectionmarker{i}"})
        assert len(hits) == 1
        assert f"## Section {i}" in hits[0]["text"]
        assert f"sectionmarker{i}" in hits[0]["text"]


def test_bad_knowledge_inputs(make_org) -> None:
    a: Org = make_org("A")
    bot = a.agent("Bot", "bot")
    for body in (
        {"documents": []},
        {},
        {"documents": [{"name": "x.md", "content": ""}]},
        {"documents": [{"name": "x.md", "content": "  \n\n  "}]},
        {"documents": [{"name": "", "content": "text"}]},
        {"documents": [{"name": "   ", "content": "text"}]},
        {"documents": [{"name": "x.md"}]},
        {"documents": [{"name": "x.md", "content": "text", "tags": []}]},
        {"documents": [{"name": "x.md", "content": "text"}] * 201},
        {"documents": "x.md"},
    ):
        assert_error(a.http.post("/knowledge", json=body), 422, "invalid_request")
        assert_error(
            a.http.post(f"/agents/{bot['id']}/knowledge", json=body), 422, "invalid_request"
        )
    # all or nothing: one bad document stores none
    bad_batch = _docs(("good.md", "perfectly fine aardvark"), ("bad.md", ""))
    assert_error(a.http.post("/knowledge", json=bad_batch), 422, "invalid_request")
    assert a.ok("GET", "/knowledge") == []
    assert a.ok("GET", "/knowledge/search", params={"q": "aardvark"}) == []
    # unknown agent
    assert_error(
        a.http.post("/agents/agt_000000000000000000000000/knowledge", json=_docs(("x", "y"))),
        404,
        "not_found",
    )
    assert_error(
        a.http.get(
            "/knowledge/search", params={"q": "x", "agent_id": "agt_000000000000000000000000"}
        ),
        404,
        "not_found",
    )
    assert_error(a.http.delete("/knowledge/doc_000000000000000000000000"), 404, "not_found")
    # search parameters
    assert_error(a.http.get("/knowledge/search"), 422, "invalid_request")
    assert_error(
        a.http.get("/knowledge/search", params={"q": "x", "limit": 0}), 422, "invalid_request"
    )
    assert_error(
        a.http.get("/knowledge/search", params={"q": "x", "limit": 51}), 422, "invalid_request"
    )
    # free text never breaks the full-text engine
    a.ok("POST", "/knowledge", json=_docs(("t.md", "alpha beta gamma")))
    for q in (
        '"',
        "alpha OR",
        "NEAR(alpha beta)",
        "*",
        "text:alpha",
        "-alpha",
        "a AND (b",
        "'",
        "",
    ):
        r = a.http.get("/knowledge/search", params={"q": q})
        assert r.status_code == 200, (q, r.text)
    hits = a.ok("GET", "/knowledge/search", params={"q": 'alpha" OR "zzz'})
    assert len(hits) == 1


def test_search_never_returns_another_orgs_chunks(make_org) -> None:
    a, b = make_org("A"), make_org("B")
    a_bot, b_bot = a.agent("Bot", "bot"), b.agent("Bot", "bot")
    shared = "ocelot harbour manifest"
    a_doc = a.ok("POST", "/knowledge", json=_docs(("a.md", f"{shared} ACME-PRIVATE-7731")))[0]
    b_doc = b.ok("POST", "/knowledge", json=_docs(("b.md", f"{shared} GLOBEX-PRIVATE-4419")))[0]
    a_agent_doc = a.ok(
        "POST", f"/agents/{a_bot['id']}/knowledge", json=_docs(("aa.md", f"{shared} agent A"))
    )[0]
    b_agent_doc = b.ok(
        "POST", f"/agents/{b_bot['id']}/knowledge", json=_docs(("bb.md", f"{shared} agent B"))
    )[0]
    hits = a.ok(
        "GET", "/knowledge/search", params={"q": shared, "agent_id": a_bot["id"], "limit": 50}
    )
    assert {h["document_id"] for h in hits} == {a_doc["id"], a_agent_doc["id"]}
    assert "GLOBEX" not in str(hits)
    hits = b.ok(
        "GET", "/knowledge/search", params={"q": shared, "agent_id": b_bot["id"], "limit": 50}
    )
    assert {h["document_id"] for h in hits} == {b_doc["id"], b_agent_doc["id"]}
    assert "ACME" not in str(hits)
    assert a.ok("GET", "/knowledge/search", params={"q": "GLOBEX-PRIVATE-4419"}) == []
    assert b.ok("GET", "/knowledge/search", params={"q": "ACME-PRIVATE-7731"}) == []
    # B cannot list, search through or delete A's documents
    assert_error(b.http.delete(f"/knowledge/{a_doc['id']}"), 404, "not_found")
    assert_error(b.http.get(f"/agents/{a_bot['id']}/knowledge"), 404, "not_found")
    assert_error(
        b.http.get("/knowledge/search", params={"q": shared, "agent_id": a_bot["id"]}),
        404,
        "not_found",
    )
    assert a_doc["id"] not in b.http.get("/knowledge").text
    assert [d["id"] for d in a.ok("GET", "/knowledge")] == [a_doc["id"]]


WORD = st.from_regex(r"[a-z]{6,12}", fullmatch=True)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    a_words=st.lists(WORD, min_size=1, max_size=6, unique=True),
    b_words=st.lists(WORD, min_size=1, max_size=6, unique=True),
    overlap=st.booleans(),
)
def test_property_search_is_confined_to_the_callers_org(
    module_server: LiveServer, a_words: list[str], b_words: list[str], overlap: bool
) -> None:
    a = Org(module_server, f"A-{secrets.token_hex(3)}")
    b = Org(module_server, f"B-{secrets.token_hex(3)}")
    try:
        if overlap:
            b_words = b_words + a_words
        a_marker, b_marker = f"amark{secrets.token_hex(6)}", f"bmark{secrets.token_hex(6)}"
        a_doc = a.ok("POST", "/knowledge", json=_docs(("a.md", " ".join([*a_words, a_marker]))))[0]
        b_doc = b.ok("POST", "/knowledge", json=_docs(("b.md", " ".join([*b_words, b_marker]))))[0]
        for org, own_doc, own_marker, other_marker in (
            (a, a_doc, a_marker, b_marker),
            (b, b_doc, b_marker, a_marker),
        ):
            for q in (" ".join(a_words + b_words), other_marker, own_marker):
                r = org.http.get("/knowledge/search", params={"q": q, "limit": 50})
                assert r.status_code == 200, r.text
                assert other_marker not in r.text
                assert {h["document_id"] for h in r.json()} <= {own_doc["id"]}
            hits = org.ok("GET", "/knowledge/search", params={"q": own_marker})
            assert [h["document_id"] for h in hits] == [own_doc["id"]]
        hits = a.ok("GET", "/knowledge/search", params={"q": a_words[0]})
        assert [h["document_id"] for h in hits] == [a_doc["id"]]
    finally:
        a.http.close()
        b.http.close()


def test_every_word_of_a_long_single_line_paragraph_is_searchable(make_org) -> None:
    a: Org = make_org("A")
    words = [f"wd{i:05d}" for i in range(300)]  # one 2,399-character line
    a.ok("POST", "/knowledge", json=_docs(("oneline.md", " ".join(words))))
    missing = [
        w for w in words if not a.ok("GET", "/knowledge/search", params={"q": w, "limit": 1})
    ]
    assert missing == []


def test_cli_attaches_a_directory(server: LiveServer, make_org, tmp_path) -> None:
    import subprocess
    import sys

    a = make_org("CliOrg")
    bot = a.agent("Bot", "bot")
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Alpha\n\nThe zebrafinch protocol runs nightly.\n")
    (folder / "sub" / "b.txt").write_text("Quokkadata lives in the basement archive.\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    cmd = [
        sys.executable,
        "-m",
        "agent_network",
        "knowledge",
        "add",
        str(folder),
        "--url",
        server.url,
        "--key",
        a.key,
        "--agent",
        bot["id"],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(d["name"] for d in a.ok("GET", f"/agents/{bot['id']}/knowledge"))
    assert names == ["a.md", "b.txt"]
    hits = a.ok("GET", "/knowledge/search", params={"q": "quokkadata", "agent_id": bot["id"]})
    assert hits and "basement" in hits[0]["text"]
    # a wrong key is reported and nothing is attached
    bad = subprocess.run(
        [*cmd[:-4], "--key", "an_org_wrong"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "401" in bad.stdout
