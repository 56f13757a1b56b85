"""The CLI's resource commands added for issue 15's list, against a real server: ``users``
(list, create, show, delete, token), ``secrets`` (set from --value or stdin, never echoed;
list names; delete), ``agents rule show/set --file``, ``credentials rotate/renew``,
``routines delete``; ``--json`` with whole ids and no traceback on a user mistake; and
``apply`` of a rule naming principals by name, twice, changing nothing the second time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from agent_network.cli import app
from conftest import LiveServer


def run(*args: str, stdin: str | None = None) -> Any:
    """Run the CLI in-process (no AGENT_NETWORK_* from this environment)."""
    base = {k: None for k in os.environ if k.startswith("AGENT_NETWORK_")}
    return CliRunner().invoke(app, list(args), input=stdin, env={**base, "COLUMNS": "60"})


def ok(*args: str, stdin: str | None = None) -> Any:
    result = run(*args, "--json", stdin=stdin)
    assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def refused(result: Any, code: int, *needles: str) -> None:
    """The command failed with ``code``, one line naming ``needles``, and no traceback."""
    text = result.stdout + result.stderr
    assert result.exit_code == code, (result.exit_code, text)
    assert "Traceback" not in text and "──" not in text, text
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_users_commands(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    c = ["--url", server.url, "--token", acme.key]
    alex = ok("users", "create", "Alex Rivera", "--email", "alex@acme.test", "--auto-ack", *c)
    assert (alex["name"], alex["email"], alex["auto_ack"]) == (
        "Alex Rivera",
        "alex@acme.test",
        True,
    )
    assert alex["id"].startswith("usr_") and len(alex["id"]) > 8
    assert [u["id"] for u in ok("users", "list", *c)] == [alex["id"]]
    assert ok("users", "show", alex["id"], *c)["email"] == "alex@acme.test"
    table = run("users", "list", *c)
    assert table.exit_code == 0 and alex["id"] in table.stdout  # whole id in a table
    # a sign-in token for Alex, read-only: it reads, it cannot write
    issued = ok("users", "token", alex["id"], "--name", "laptop", "--read-only", *c)
    assert issued["credential"]["subject_id"] == alex["id"]
    assert issued["credential"]["scopes"] == ["read"]
    mine = ["--url", server.url, "--token", issued["secret"]]
    assert ok("users", "show", alex["id"], *mine)["id"] == alex["id"]
    text = run("users", "token", alex["id"], *c)
    assert text.exit_code == 0 and "shown once" in text.stdout
    # another org's user: not found, one line, exit 1
    refused(
        run("users", "show", alex["id"], "--url", server.url, "--token", globex.key), 1, "not_found"
    )
    refused(run("users", "create", "", *c), 1, "invalid_request")
    assert ok("users", "delete", alex["id"], *c) == {"deleted": alex["id"]}
    assert ok("users", "list", *c) == []
    refused(run("users", "delete", alex["id"], *c), 1, "not_found")


def test_secrets_are_write_only(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    agent = acme.agent("Ops", "ops", model="test")
    value = "ghp_s3cr3t-value-never-printed"
    stored = ok("secrets", "set", agent["id"], "GITHUB_TOKEN", "--value", value, *c)
    assert stored["name"] == "GITHUB_TOKEN" and value not in json.dumps(stored)
    # from stdin (a pipe): the trailing newline is not part of the value
    piped = run("secrets", "set", agent["id"], "DEPLOY_KEY", *c, stdin="from-stdin\n")
    assert piped.exit_code == 0 and "from-stdin" not in piped.stdout + piped.stderr
    names = ok("secrets", "list", agent["id"], *c)
    assert sorted(s["name"] for s in names) == ["DEPLOY_KEY", "GITHUB_TOKEN"]
    listing = run("secrets", "list", agent["id"], *c)
    assert listing.exit_code == 0 and value not in listing.stdout
    # the value reached the server as given: an agent's runner reads it back
    row = acme.ok("GET", f"/agents/{agent['id']}/secrets")
    assert all("value" not in s for s in row)
    refused(run("secrets", "set", agent["id"], "EMPTY", *c, stdin=""), 2, "empty")
    assert ok("secrets", "delete", agent["id"], "DEPLOY_KEY", *c) == {"deleted": "DEPLOY_KEY"}
    assert [s["name"] for s in ok("secrets", "list", agent["id"], *c)] == ["GITHUB_TOKEN"]
    refused(run("secrets", "list", "agt_nope", *c), 1, "not_found")


def test_agents_rule_show_and_set_from_a_file(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    alex = acme.user("Alex Rivera")
    agent = acme.agent("Ops", "ops", model="test")
    shown = ok("agents", "rule", "show", agent["id"], *c)
    assert shown["inbound_from"] == ["*"] and shown["rate"] is None
    yaml_rule = tmp_path / "rule.yaml"
    yaml_rule.write_text(
        "inbound_from: [org:self, Alex Rivera]\nrate: {messages: 5, per_seconds: 60}\n"
        "inbox_cap: 3\n",
        encoding="utf-8",
    )
    rule = ok("agents", "rule", "set", agent["id"], "--file", str(yaml_rule), *c)
    assert rule["inbound_from"] == ["org:self", alex["id"]]
    assert rule["rate"] == {"messages": 5, "per_seconds": 60.0} and rule["inbox_cap"] == 3
    assert rule["principals"][alex["id"]]["name"] == "Alex Rivera"
    text = run("agents", "rule", "show", agent["id"], *c)
    assert text.exit_code == 0 and f"{alex['id']} (user Alex Rivera" in text.stdout
    # JSON works too, and {"rule": {...}} as in an apply file
    json_rule = tmp_path / "rule.json"
    json_rule.write_text(json.dumps({"rule": {"outbound_to": ["org:self"]}}), encoding="utf-8")
    rule = ok("agents", "rule", "set", agent["id"], "-f", str(json_rule), *c)
    assert (rule["inbound_from"], rule["outbound_to"]) == (["*"], ["org:self"])
    # mistakes: one line, nothing written
    bad_name = tmp_path / "bad.yaml"
    bad_name.write_text("inbound_from: [Nobody Here]\n", encoding="utf-8")
    refused(
        run("agents", "rule", "set", agent["id"], "-f", str(bad_name), *c),
        1,
        "unresolved_principal",
        "Nobody Here",
    )
    typo = tmp_path / "typo.yaml"
    typo.write_text("inbox_capp: 3\n", encoding="utf-8")
    refused(run("agents", "rule", "set", agent["id"], "-f", str(typo), *c), 1, "inbox_capp")
    broken = tmp_path / "broken.yaml"
    broken.write_text("inbound_from: [\n", encoding="utf-8")
    refused(run("agents", "rule", "set", agent["id"], "-f", str(broken), *c), 2, "broken.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- '*'\n", encoding="utf-8")
    refused(run("agents", "rule", "set", agent["id"], "-f", str(listed), *c), 2, "mapping")
    refused(
        run("agents", "rule", "set", agent["id"], "-f", str(tmp_path / "none.yaml"), *c),
        2,
        "none.yaml",
    )
    assert ok("agents", "rule", "show", agent["id"], *c)["outbound_to"] == ["org:self"]


def test_credentials_rotate_renew_and_routines_delete(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    alex = acme.user("Alex")
    issued = ok("credentials", "issue", "user_token", "--subject", alex["id"], *c)
    old_id, old_secret = issued["credential"]["id"], issued["secret"]
    rotated = ok("credentials", "rotate", old_id, *c)
    assert rotated["credential"]["id"] != old_id and rotated["secret"] != old_secret
    assert rotated["credential"]["subject_id"] == alex["id"]
    refused(run("users", "list", "--url", server.url, "--token", old_secret), 1, "unauthenticated")
    refused(run("credentials", "rotate", old_id, *c), 1, "invalid_request", "revoked")
    renewed = ok("credentials", "renew", rotated["credential"]["id"], "--expires-in", "3600", *c)
    assert renewed["expires_at"] is not None
    text = run("credentials", "rotate", rotated["credential"]["id"], *c)
    assert text.exit_code == 0 and "shown once" in text.stdout
    agent = acme.agent("Ops", "ops", model="test")
    routine = ok("routines", "add", agent["id"], "helper", *c)
    assert ok("routines", "delete", agent["id"], routine["id"], *c) == {"deleted": routine["id"]}
    assert ok("routines", "list", agent["id"], *c) == []


def test_apply_a_rule_with_names_twice_changes_nothing(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    alex = acme.user("Alex Rivera")
    spec = tmp_path / "ops.yaml"
    spec.write_text(
        "name: Ops\nlookup_key: ops\nmodel: test\n"
        "rule:\n  inbound_from: [org:self, Alex Rivera, org:Acme]\n  inbox_cap: 5\n"
        "knowledge:\n  - name: runbook.md\n"
        "    content: Roll back first, then page the on-call engineer.\n",
        encoding="utf-8",
    )
    first = ok("apply", str(spec), *c)
    assert {(r["kind"], r["action"]) for r in first} == {
        ("agent", "created"),
        ("rule", "updated"),
        ("document", "created"),
    }, first
    agent_id = next(r["id"] for r in first if r["kind"] == "agent")
    rule = acme.ok("GET", f"/agents/{agent_id}/rule")
    assert rule["inbound_from"] == ["org:self", alex["id"], acme.id]
    second = ok("apply", str(spec), *c)
    assert [r["action"] for r in second] == ["unchanged"] * len(second), second
    assert acme.ok("GET", f"/agents/{agent_id}/rule") == rule
    assert len(acme.ok("GET", f"/agents/{agent_id}/knowledge")) == 1


def test_threads_create_protocol_threads(server: LiveServer, make_org: Any, tmp_path: Path) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    alex, pat = acme.user("Alex"), acme.user("Pat")
    bot = acme.agent("Ops", "ops", model="test")
    team = acme.team("Ops", ("user", alex["id"]), ("user", pat["id"]), ("agent", bot["id"]))
    ask = ok(
        "threads",
        "create",
        "ask",
        "--team",
        team["id"],
        "--adapter",
        "consulting",
        "-p",
        f"user:{alex['id']}",
        "-p",
        f"agent:{bot['id']}",
        "--ttl",
        "3600",
        *c,
    )
    assert ask["adapter"] == "consulting" and ask["id"].startswith("thr_")
    rr = ok(
        "threads",
        "create",
        "standup",
        "--team",
        team["id"],
        "--adapter",
        "round_robin",
        "--max-turns",
        "4",
        "--no-acks",
        "--initiator",
        f"user:{pat['id']}",
        "-p",
        f"user:{alex['id']}",
        "-p",
        f"agent:{bot['id']}",
        "-p",
        f"user:{pat['id']}",
        *c,
    )
    assert (rr["adapter"], rr["status"]) == ("workflow", "active")
    first = acme.ok("GET", f"/threads/{rr['id']}/envelopes")["items"][0]
    assert first["data"]["graph"]["order"] == [pat["id"], alex["id"], bot["id"]]
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        f"initial_speaker: {alex['id']}\n"
        "transitions:\n  - when: {kind: always}\n    then: {kind: round_robin}\n"
        "max_turns: 2\n",
        encoding="utf-8",
    )
    wf = ok(
        "threads",
        "create",
        "wf",
        "--team",
        team["id"],
        "--adapter",
        "workflow",
        "--graph",
        str(graph),
        "-p",
        f"user:{alex['id']}",
        "-p",
        f"agent:{bot['id']}",
        *c,
    )
    assert wf["adapter"] == "workflow"
    # mistakes: one line each, nothing created
    before = len(acme.ok("GET", f"/teams/{team['id']}/threads"))
    refused(
        run("threads", "create", "x", "--team", team["id"], "-p", "bot", *c), 2, "--participant"
    )
    refused(
        run(
            "threads",
            "create",
            "x",
            "--team",
            team["id"],
            "--adapter",
            "round_robin",
            "-p",
            f"user:{alex['id']}",
            "-p",
            f"agent:{bot['id']}",
            *c,
        ),
        2,
        "--max-turns",
    )
    refused(
        run(
            "threads",
            "create",
            "x",
            "--team",
            team["id"],
            "--adapter",
            "consulting",
            "-p",
            f"user:{alex['id']}",
            *c,
        ),
        1,
        "invalid_request",
        "2 participants",
    )
    assert len(acme.ok("GET", f"/teams/{team['id']}/threads")) == before


def test_threads_ack_reject_close(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = ["--url", server.url, "--token", acme.key]
    alex, pat = acme.user("Alex"), acme.user("Pat")
    team = acme.team("Ops", ("user", alex["id"]), ("user", pat["id"]))
    pair = ["-p", f"user:{alex['id']}", "-p", f"user:{pat['id']}"]
    talk = ok(
        "threads", "create", "talk", "--team", team["id"], "--adapter", "conversation", *pair, *c
    )
    assert talk["status"] == "invited"
    refused(run("threads", "ack", talk["id"], "--agent", "a", "--user", "u", *c), 2, "at most")
    assert ok("threads", "ack", talk["id"], "--user", pat["id"], *c)["status"] == "active"
    refused(run("threads", "ack", talk["id"], "--user", pat["id"], *c), 1, "protocol_violation")
    closed = ok("threads", "close", talk["id"], "--reason", "done", *c)
    assert closed["status"] in ("closing", "closed")
    refused(run("threads", "close", talk["id"], *c), 1, "thread_closed")
    other = ok(
        "threads", "create", "other", "--team", team["id"], "--adapter", "conversation", *pair, *c
    )
    declined = ok("threads", "reject", other["id"], "--user", pat["id"], "--reason", "busy", *c)
    assert declined["status"] in ("closing", "closed")


def test_members_invites_and_leave(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    a = ["--url", server.url, "--token", acme.key]
    g = ["--url", server.url, "--token", globex.key]
    alex, pat = acme.user("Alex"), acme.user("Pat")
    team = ok("teams", "create", "Ops", *a)
    ok("teams", "add-member", team["id"], "--user", alex["id"], "--role", "owner", *a)
    ok("teams", "add-member", team["id"], "--user", pat["id"], *a)
    removed = ok("teams", "remove-member", team["id"], "user", pat["id"], *a)
    assert removed == {"removed": pat["id"], "kind": "user", "team_id": team["id"]}
    assert [m["id"] for m in ok("teams", "members", team["id"], *a)] == [alex["id"]]
    net = ok("networks", "create", "Rollout", *a)
    first = ok("networks", "invite", net["id"], "--max-uses", "1", *a)
    second = ok("networks", "invite", net["id"], *a)
    invites = ok("networks", "invites", net["id"], *a)
    assert {i["id"] for i in invites} == {first["id"], second["id"]}
    assert all("join_code" not in i or i["join_code"] is None for i in invites)
    refused(run("networks", "invites", net["id"], *g), 1, "not_found")
    assert ok("networks", "revoke-invite", net["id"], second["id"], *a)["revoked"] == second["id"]
    refused(run("networks", "join", second["join_code"], *g), 1)
    sam = globex.user("Sam")
    ok("networks", "join", first["join_code"], "--user", sam["id"], *g)
    gone = ok("networks", "remove-member", net["id"], "user", sam["id"], *g)
    assert gone["removed"] == sam["id"]
    visa = ok("networks", "leave", net["id"], *g)
    assert visa["org_id"] == globex.id and visa["end_reason"]
    refused(run("networks", "members", net["id"], *g), 1, "not_found")
