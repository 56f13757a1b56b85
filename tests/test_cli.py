"""The ``agent-network`` CLI against a real server (LiveServer: uvicorn over a SQLite file).

Every resource command over the API (``--json`` parsed, whole ids), ``apply`` run twice, the
connection settings (options, env, ``.env``), and each bug of issue 15 found by trying the CLI
as a new user would. Commands run in-process with typer's CliRunner, or as a real process
where the process matters (``serve``, ``runner``, ``threads follow``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent_network.cli import app
from conftest import LiveServer, Org, free_port

CLI = Path(sys.executable).parent / "agent-network"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def clean_env() -> dict[str, str]:
    """This process's environment without the CLI's own settings, for a CLI subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_NETWORK_")}
    return {**env, "COLUMNS": "80", "AGENT_NETWORK_MODEL": "test"}


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    base = {k: None for k in os.environ if k.startswith("AGENT_NETWORK_")}
    return CliRunner().invoke(app, list(args), env={**base, "COLUMNS": "60", **(env or {})})


def ok(*args: str) -> Any:
    """Run a ``--json`` command that must succeed; its parsed output."""
    result = run(*args, "--json")
    assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def conn(srv: LiveServer, key: str) -> list[str]:
    return ["--url", srv.url, "--token", key]


def no_traceback(result: Any) -> None:
    text = result.stdout + result.stderr
    assert "Traceback" not in text and "──" not in text, text


# ----------------------------------------------------------------------------- basics


def test_version() -> None:
    version = run("--version")
    assert version.exit_code == 0 and re.match(r"agent-network \d", version.stdout)


def test_help_keeps_bracketed_hints() -> None:
    """Rich markup ate "[env AGENT_NETWORK_MODEL]" and the like from help texts."""
    runner_help = run("runner", "--help", env={"COLUMNS": "200"})
    assert runner_help.exit_code == 0
    text = " ".join(runner_help.stdout.split())  # help is wrapped at 80 columns
    assert "[env AGENT_NETWORK_MODEL], e.g. 'test'" in text, text
    verify_help = run("threads", "verify", "--help", env={"COLUMNS": "200"})
    assert "[env AGENT_NETWORK_URL" in " ".join(verify_help.stdout.split())


def test_api_error_is_one_line_and_exit_1(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    result = run("agents", "show", "agt_missing", *conn(server, acme.key))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: not_found: "), result.stderr
    no_traceback(result)
    bad_key = run("agents", "list", *conn(server, "an_org_nonsense"))
    assert bad_key.exit_code == 1 and bad_key.stderr.startswith("error: unauthenticated: ")
    unreachable = run("agents", "list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert unreachable.exit_code == 1 and "cannot reach the server" in unreachable.stderr
    no_traceback(unreachable)
    missing = run("agents", "list", "--url", server.url)
    assert missing.exit_code == 2 and "AGENT_NETWORK_TOKEN" in missing.stderr


def test_connection_from_env_and_dotenv(
    server: LiveServer, make_org: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = make_org("Acme")
    acme.agent("Ada", "ada")
    by_env = run(
        "agents",
        "list",
        "--json",
        env={"AGENT_NETWORK_URL": server.url, "AGENT_NETWORK_TOKEN": acme.key},
    )
    assert by_env.exit_code == 0, by_env.stderr
    assert [a["lookup_key"] for a in json.loads(by_env.stdout)] == ["ada"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        f"AGENT_NETWORK_URL={server.url}\nAGENT_NETWORK_TOKEN={acme.key}\n", encoding="utf-8"
    )
    by_dotenv = run("agents", "list", "--json")
    assert by_dotenv.exit_code == 0, by_dotenv.stderr
    assert [a["lookup_key"] for a in json.loads(by_dotenv.stdout)] == ["ada"]
    assert "AGENT_NETWORK_TOKEN" not in os.environ  # read, not exported into the process
    # the old name still works, with a deprecation warning
    (tmp_path / ".env").write_text(f"AGENT_NETWORK_URL={server.url}\n", encoding="utf-8")
    legacy = run("agents", "list", "--json", env={"AGENT_NETWORK_KEY": acme.key})
    assert legacy.exit_code == 0 and "deprecated" in legacy.stderr


# ----------------------------------------------------------------------------- resources


def test_orgs_admin_commands(server: LiveServer) -> None:
    admin = conn(server, server.admin_key)
    created = ok("orgs", "create", "Acme", *admin)
    org_id, key = created["org"]["id"], created["secret"]
    assert org_id in [o["id"] for o in ok("orgs", "list", *admin)]
    assert ok("orgs", "me", *conn(server, key))["id"] == org_id
    issued = ok("orgs", "issue-key", org_id, *admin)
    assert issued["credential"]["org_id"] == org_id
    assert ok("orgs", "me", *conn(server, issued["secret"]))["id"] == org_id
    # an org key is not the admin: the API's refusal, as one line
    refused = run("orgs", "list", *conn(server, key))
    assert refused.exit_code == 1 and refused.stderr.startswith("error: ")


def test_agents_and_routines(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    agent = ok("agents", "create", "Ada", "ada", "--model", "test", "--metadata", '{"t": 1}', *c)
    aid = agent["id"]
    assert agent["metadata"] == {"t": 1}
    assert [a["id"] for a in ok("agents", "list", *c)] == [aid]
    assert ok("agents", "show", aid, *c)["lookup_key"] == "ada"
    assert ok("agents", "update", aid, "--name", "Ada L", *c)["name"] == "Ada L"
    # tables keep whole ids even when piped into a narrow "terminal"
    table = run("agents", "list", *c)
    assert table.exit_code == 0 and aid in table.stdout, table.stdout
    routine = ok("routines", "add", aid, "helper", *c)
    assert (routine["preset_name"], routine["status"]) == ("participate", "active")
    assert ok("routines", "pause", aid, routine["id"], *c)["status"] == "paused"
    assert ok("routines", "activate", aid, routine["id"], *c)["status"] == "active"
    assert [r["id"] for r in ok("routines", "list", aid, *c)] == [routine["id"]]
    bad_json = run("agents", "create", "B", "b", "--metadata", "{nope", *c)
    assert bad_json.exit_code == 2 and "--metadata" in bad_json.stderr
    assert ok("agents", "delete", aid, *c) == {"deleted": aid}
    assert ok("agents", "list", *c) == []


def test_teams_members_and_roles(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    agent = acme.agent("Ada", "ada")
    user = acme.user("Alex")
    team = ok("teams", "create", "Ops", "--description", "the ops team", *c)
    assert [t["id"] for t in ok("teams", "list", *c)] == [team["id"]]
    ok("teams", "add-member", team["id"], "--agent", agent["id"], *c)
    ok("teams", "add-member", team["id"], "--user", user["id"], "--role", "admin", *c)
    members = {m["id"]: m["role"] for m in ok("teams", "members", team["id"], *c)}
    assert members == {agent["id"]: "member", user["id"]: "admin"}
    changed = ok("teams", "role", team["id"], "agent", agent["id"], "owner", *c)
    assert changed["role"] == "owner"
    both = run("teams", "add-member", team["id"], "--agent", "a", "--user", "u", *c)
    assert both.exit_code == 2 and "exactly one" in both.stderr


def test_networks_invite_join_visas_revoke_close(server: LiveServer, make_org: Any) -> None:
    acme, globex = make_org("Acme"), make_org("Globex")
    a, g = conn(server, acme.key), conn(server, globex.key)
    sam = globex.user("Sam")
    net = ok("networks", "create", "Rollout", *a)
    invite = ok("networks", "invite", net["id"], "--max-uses", "1", *a)
    joined = ok("networks", "join", invite["join_code"], "--user", sam["id"], *g)
    assert joined["network"]["id"] == net["id"]
    assert [m["id"] for m in joined["members"]] == [sam["id"]]
    assert net["id"] in [n["id"] for n in ok("networks", "list", *g)]
    assert sam["id"] in [m["id"] for m in ok("networks", "members", net["id"], *a)]
    visas = ok("networks", "visas", net["id"], *a)
    visa = next(v for v in visas if v["org_id"] == globex.id)
    assert ok("networks", "revoke", net["id"], visa["id"], *a)["revoked"] == visa["id"]
    assert ok("networks", "close", net["id"], *a)["status"] == "closed"
    used_up = run("networks", "join", invite["join_code"], *g)
    assert used_up.exit_code == 1 and used_up.stderr.startswith("error: invite_invalid")


def test_threads_create_post_list_show_verify(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    alex = acme.user("Alex")
    team = acme.team("Ops", ("user", alex["id"]))
    thread = ok("threads", "create", "Rollout", "--team", team["id"], *c)
    tid = thread["id"]
    env = ok("threads", "post", tid, "ship it [/] [bold]now[/bold]", "--user", alex["id"], *c)
    assert env["content"] == "ship it [/] [bold]now[/bold]"
    assert tid in [t["id"] for t in ok("threads", "list", *c)]
    shown = ok("threads", "show", tid, *c)
    assert shown["thread"]["id"] == tid
    assert [e["content"] for e in shown["envelopes"] if e["type"] == "message"] == [
        "ship it [/] [bold]now[/bold]"
    ]
    text = run("threads", "show", tid, *c)  # message text is text, not markup
    assert text.exit_code == 0 and "ship it [/] [bold]now[/bold]" in text.stdout, text.stdout
    verified = run("threads", "verify", tid, *c)
    assert verified.exit_code == 0 and "chain intact" in verified.stdout


def test_threads_follow_tails_live_over_the_websocket(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    alex = acme.user("Alex")
    team = acme.team("Ops", ("user", alex["id"]))
    tid = acme.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
    last = acme.ok("GET", f"/threads/{tid}")["last_seq"]
    follower = subprocess.Popen(
        [
            str(CLI),
            "threads",
            "follow",
            tid,
            "--after",
            str(last),
            "--count",
            "2",
            "--json",
            *conn(server, acme.key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        time.sleep(1.5)  # the follower joins first: what follows arrives live
        for text in ("one", "two [/]"):
            acme.ok(
                "POST", f"/threads/{tid}/messages", json={"content": text, "user_id": alex["id"]}
            )
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [e["content"] for e in lines] == ["one", "two [/]"]


def test_knowledge_add_folder_latin1_dedup_list_search_delete(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    folder = tmp_path / "kb"
    (folder / "sub").mkdir(parents=True)
    (folder / "runbook.md").write_text("# Runbook\nRoll back with the blue switch.\n", "utf-8")
    (folder / "sub" / "cafe.txt").write_bytes("Café menu: crème brûlée\n".encode("latin-1"))
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00")  # not a knowledge suffix: left out
    first = ok("knowledge", "add", str(folder), *c)
    assert sorted(d["name"] for d in first["added"]) == ["cafe.txt", "runbook.md"]
    assert first["skipped"] == []
    listed = ok("knowledge", "list", *c)
    assert len(listed) == 2 and all(d["sha256"] for d in listed)
    hits = ok("knowledge", "search", "crème", *c)
    assert hits and hits[0]["document"] == "cafe.txt" and "brûlée" in hits[0]["text"]
    # the same files again: nothing uploaded, both reported as already there
    again = run("knowledge", "add", str(folder), str(folder / "runbook.md"), *c)
    assert again.exit_code == 0, again.stderr
    assert "0 added, 3 skipped" in again.stdout
    assert len(ok("knowledge", "list", *c)) == 2
    doc = next(d for d in listed if d["name"] == "runbook.md")
    assert ok("knowledge", "delete", doc["id"], *c) == {"deleted": doc["id"]}
    assert [d["name"] for d in ok("knowledge", "list", *c)] == ["cafe.txt"]
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00def")
    refused = run("knowledge", "add", str(binary), *c)
    assert refused.exit_code == 2 and "blob.txt" in refused.stderr
    no_traceback(refused)


def test_knowledge_add_latin1_file_uploads(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    """The old ``knowledge add`` (``--key``) ended in a UnicodeDecodeError traceback here."""
    acme = make_org("Acme")
    notes = tmp_path / "notes.txt"
    notes.write_bytes("Préparez la migration à 9h\n".encode("latin-1"))
    result = run(
        "knowledge", "add", str(notes), "--url", server.url, env={"AGENT_NETWORK_KEY": acme.key}
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    docs = acme.ok("GET", "/knowledge")
    assert [d["name"] for d in docs] == ["notes.txt"]


def test_knowledge_add_twice_makes_one_document(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    acme = make_org("Acme")
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nThe window is Friday.\n", encoding="utf-8")
    for _ in range(2):
        result = run(
            "knowledge", "add", str(notes), "--url", server.url, env={"AGENT_NETWORK_KEY": acme.key}
        )
        assert result.exit_code == 0, (result.stdout, result.stderr)
    assert len(acme.ok("GET", "/knowledge")) == 1


def test_credentials_and_audit(server: LiveServer, make_org: Any) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    user = acme.user("Alex")
    issued = ok("credentials", "issue", "user_token", "--subject", user["id"], "--name", "cli", *c)
    cred_id, secret = issued["credential"]["id"], issued["secret"]
    assert cred_id in [x["id"] for x in ok("credentials", "list", *c)]
    assert ok("credentials", "revoke", cred_id, *c)["revoked_at"] is not None
    assert run("agents", "list", *conn(server, secret)).exit_code == 1
    records = ok("audit", "list", "--action", "credential.*", *c)
    assert records and all(r["action"].startswith("credential.") for r in records)
    assert cred_id in {r["resource_id"] for r in records}
    exported = run("audit", "export", "--action", "credential.*", *c)
    assert exported.exit_code == 0
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["id"] for r in lines] == [r["id"] for r in records]


# ----------------------------------------------------------------------------- apply


def test_apply_twice_changes_nothing(server: LiveServer, make_org: Any, tmp_path: Path) -> None:
    acme = make_org("Acme")
    c = conn(server, acme.key)
    folder = tmp_path / "agents"
    shutil.copytree(EXAMPLES / "agents", folder)
    first = ok("apply", str(folder), *c)
    assert {r["action"] for r in first} <= {"created", "updated"}
    kinds = {r["kind"] for r in first}
    assert kinds == {"agent", "routine", "rule", "document"}, first
    agents = acme.ok("GET", "/agents")
    second = ok("apply", str(folder), *c)
    assert [r["action"] for r in second] == ["unchanged"] * len(second), second
    assert acme.ok("GET", "/agents") == agents
    assert {r["id"] for r in second} == {r["id"] for r in first}
    # a change in the file is applied as an update of that field only
    spec = folder / "acme-ops.yaml"
    spec.write_text(spec.read_text("utf-8").replace("status: active", "status: paused"), "utf-8")
    third = ok("apply", str(folder), *c)
    changed = [r for r in third if r["action"] != "unchanged"]
    assert [(r["kind"], r["changes"]) for r in changed] == [("routine", ["status"])], third
    text = run("apply", str(folder), *c)
    assert text.exit_code == 0 and "0 created, 0 updated" in text.stdout


def test_apply_refuses_a_bad_file_by_name(
    server: LiveServer, make_org: Any, tmp_path: Path
) -> None:
    acme = make_org("Acme")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: A\nlookup_key: a\nroutnies: []\n", encoding="utf-8")
    result = run("apply", str(bad), *conn(server, acme.key))
    assert result.exit_code == 2 and "bad.yaml" in result.stderr and "routnies" in result.stderr
    assert acme.ok("GET", "/agents") == []


# ----------------------------------------------------------------------------- offline db


def test_db_show_prints_markup_like_text(server: LiveServer, make_org: Any) -> None:
    """``thread show`` (now ``db show``) crashed with MarkupError on ``[/]`` in a message."""
    acme = make_org("Acme")
    alex = acme.user("Alex")
    team = acme.team("Ops", ("user", alex["id"]))
    tid = acme.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t"})["id"]
    acme.ok("POST", f"/threads/{tid}/messages", json={"content": "a [/] b", "user_id": alex["id"]})
    result = run("thread", "show", tid, "--db", str(server.db))
    assert result.exit_code == 0, (result.stdout, result.exception)
    assert "Alex (Acme): a [/] b" in result.stdout
    listed = run("db", "list", "--db", str(server.db), "--json")
    assert tid in [t["thread"] for t in json.loads(listed.stdout)]


def test_tables_keep_whole_ids_when_piped(server: LiveServer, make_org: Any) -> None:
    """Rich cut ids to the terminal width (80 when piped) with an ellipsis."""
    acme = make_org("Acme")
    team = acme.team("A team with a rather long name to squeeze the other columns")
    tid = acme.ok("POST", f"/teams/{team['id']}/threads", json={"title": "t" * 40})["id"]
    result = run("thread", "list", "--db", str(server.db))
    assert result.exit_code == 0, result.stdout
    assert tid in result.stdout and "…" not in result.stdout, result.stdout


def test_db_list_without_a_database_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``thread list`` in a folder with no database made an empty one and a long traceback."""
    monkeypatch.chdir(tmp_path)
    result = run("thread", "list")
    assert result.exit_code == 1
    assert "no database" in result.stderr, (result.stdout, result.stderr)
    no_traceback(result)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- serve, runner


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=cwd,
    )


def test_serve_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    result = _serve("--port", "99999", cwd=tmp_path)
    assert result.returncode == 2
    assert "serving" not in result.stdout and "admin key" not in result.stdout
    assert "--port" in result.stderr and "65535" in result.stderr


def test_serve_with_the_port_taken_fails_before_the_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _serve("--port", str(port), "--db", str(tmp_path / "d" / "an.db"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "serving" not in result.stdout and "admin key" not in result.stdout, result.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_and_admin_key_on_a_database_they_cannot_open_say_so_in_one_line(
    tmp_path: Path,
) -> None:
    """A PostgreSQL server that does not answer, or a data folder that cannot be made, used to
    end in a Rich traceback; now one ``error:`` line naming the database (password hidden)."""
    nobody = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/an"
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    cases = [
        (["serve", "--port", "0", "--db", nobody], "cannot open the database postgresql://"),
        (["admin-key", "--db", nobody], "cannot open the database postgresql://"),
        (["serve", "--port", "0", "--data-dir", str(in_the_way)], "cannot create the data"),
        (["admin-key", "--data-dir", str(in_the_way)], "cannot create the data folder"),
    ]
    for args, needle in cases:
        result = subprocess.run(
            [str(CLI), *args], capture_output=True, text=True, timeout=60, env=clean_env()
        )
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "serving" not in result.stdout and "admin key" not in result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {needle}"), (args, lines)
        assert "s3cret" not in result.stderr


def test_threads_post_refuses_both_agent_and_user_before_any_request() -> None:
    """Both senders used to reach the server and come back as its invalid_request (exit 1);
    like every command with --agent/--user, it is a bad argument (exit 2), nothing sent."""
    result = run(
        "threads",
        "post",
        "thr_x",
        "hi",
        "--agent",
        "agt_x",
        "--user",
        "usr_x",
        "--url",
        f"http://127.0.0.1:{free_port()}",
        "--token",
        "an_org_x",
    )
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "--agent or --user" in result.stderr
    no_traceback(result)


def test_serve_log_level_info_writes_json_access_lines(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(CLI),
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "d"),
            "--log-level",
            "info",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
    )
    try:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("server did not come up")
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
    assert f"serving on http://127.0.0.1:{port}" in stdout
    assert (tmp_path / "d" / "agent-network.db").is_file()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("/api/v1/health" in r.get("event", "") for r in records), stderr
    assert all("level" in r and "timestamp" in r for r in records)
    bad = _serve("--log-level", "chatty", cwd=tmp_path)
    assert bad.returncode == 2 and "chatty" in bad.stderr


def test_runner_says_when_the_server_cannot_be_reached() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            str(CLI),
            "runner",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--token",
            "x",
            "--model",
            "test",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert result.returncode == 1
    assert "cannot reach the server" in result.stderr, result.stderr
    assert time.monotonic() - started < 30


def test_every_api_command_takes_url_token_and_json() -> None:
    import typer.main

    root = typer.main.get_command(app)
    local = {"serve", "admin-key", "demo", "doctor", "db", "thread"}
    missing = []
    for name, group in root.commands.items():  # type: ignore[attr-defined]
        if name in local:
            continue
        commands = dict(getattr(group, "commands", {name: group}))
        for sub, nested in list(commands.items()):  # a group in a group: agents rule
            if hasattr(nested, "commands"):
                del commands[sub]
                commands.update({f"{sub} {n}": c for n, c in nested.commands.items()})
        for sub, cmd in commands.items():
            opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
            want = {"--url", "--token"} | (
                {"--json"} if (name, sub) != ("audit", "export") else set()
            )
            if name == "runner":
                want = {"--url", "--token"}
            if not want <= opts:
                missing.append(f"{name} {sub}: {sorted(want - opts)}")
    assert missing == []


def test_org_helper_still_matches(server: LiveServer) -> None:
    """The admin key the fixture made works through the CLI (sanity of the fixture use)."""
    org = Org(server, "Initech")
    try:
        assert ok("orgs", "me", *conn(server, org.key))["name"] == "Initech"
    finally:
        org.http.close()
