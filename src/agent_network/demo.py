"""The two-company demo: Acme (customer) and Globex (partner) collaborate on ``acme-rollout``.

It starts a real server process on the embedded defaults (SQLite file, bundled local model),
then drives it only through the REST API: orgs, people, agents, private teams, threads and
knowledge for each company; a network joined by invite code; the shared thread
``rollout-status`` where both agents answer Alex through their participate routines. It then
prints what each org can see, verifies the hash chain, kills the server with SIGKILL, restarts it
and checks that the thread came back identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

KICKOFF = "We are ready to move the billing migration to production on Thursday."
IDENTITIES = {
    "ops": (
        "You are Acme's customer operations agent for the billing migration. You know Acme's "
        "launch checklist and runbooks. Speak for Acme: state the customer-side status and the "
        "remaining blocker plainly."
    ),
    "delivery": (
        "You are Globex's delivery agent for the Acme billing migration. You know Globex's "
        "rollout playbook and QA status. Speak for Globex: state open rollout risks and what "
        "should be validated before cutover."
    ),
}
COLORS = {"Acme": "cyan", "Globex": "magenta"}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_examples(explicit: Path | None) -> Path:
    """The folder holding ``demo/scenario.json``: ``explicit``, ./examples, or the repository's."""
    candidates = (
        [explicit]
        if explicit
        else [Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"]
    )
    for c in candidates:
        if c is not None and (c / "demo" / "scenario.json").is_file():
            return c
    raise DemoError(
        "demo content not found: pass --examples pointing at the repository's examples/ folder"
    )


class DemoServer:
    """``agent-network serve`` as a child process."""

    def __init__(self, db: Path, port: int, model: str | None) -> None:
        self.db, self.port, self.model = db, port, model
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "agent_network",
            "serve",
            "--db",
            str(self.db),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.model:
            cmd += ["--model", self.model]
        log = open(self.db.parent / "server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"the server exited; see {self.db.parent / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise DemoError("the server did not answer within 60 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs; only what was committed survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Company:
    """One org driven through the REST API with its own key."""

    def __init__(self, url: str, admin_key: str, name: str) -> None:
        with httpx.Client(
            base_url=f"{url}/api/v1", timeout=60, headers={"Authorization": f"Bearer {admin_key}"}
        ) as admin:
            body = _ok(admin.post("/orgs", json={"name": name}))
        self.name = name
        self.id = body["org"]["id"]
        self.http = httpx.Client(
            base_url=f"{url}/api/v1",
            timeout=120,
            headers={"Authorization": f"Bearer {body['secret']}"},
        )

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return _ok(self.http.request(method, path, **kw))


def _ok(r: httpx.Response) -> Any:
    if r.status_code >= 300:
        raise DemoError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text}")
    return r.json() if r.content else None


def _load_knowledge(folder: Path) -> list[dict[str, str]]:
    return [
        {"name": p.name, "content": p.read_text(encoding="utf-8")}
        for p in sorted(folder.glob("*.md"))
    ]


def _setup_company(
    co: Company,
    examples: Path,
    scenario: dict[str, Any],
    *,
    key: str,
    person: str,
    agent_name: str,
    agent_key: str,
    model: str | None,
) -> dict[str, Any]:
    user = co.call("POST", "/users", json={"name": person})
    agent = co.call(
        "POST",
        "/agents",
        json={
            "name": agent_name,
            "lookup_key": agent_key,
            "identity": IDENTITIES[agent_key],
            **({"model": model} if model else {}),
        },
    )
    co.call(
        "POST",
        f"/agents/{agent['id']}/knowledge",
        json={"documents": _load_knowledge(examples / "demo" / key / "knowledge")},
    )
    team = co.call("POST", "/teams", json={"name": f"{co.name} internal"})
    for member in ({"user_id": user["id"]}, {"agent_id": agent["id"]}):
        co.call("POST", f"/teams/{team['id']}/members", json=member)
    private = {}
    for title, messages in scenario[key]["private_threads"].items():
        thread = co.call("POST", f"/teams/{team['id']}/threads", json={"title": title})
        for m in messages:
            co.call(
                "POST",
                f"/threads/{thread['id']}/messages",
                json={"content": m["content"], "user_id": user["id"]},
            )
        private[title] = thread["id"]
    return {"user": user, "agent": agent, "team": team, "private": private}


def run_demo(
    *,
    data_dir: Path,
    port: int = 0,
    model: str | None = None,
    examples: Path | None = None,
    console: Console | None = None,
    idle_timeout: float = 240.0,
    keep: bool = False,
) -> int:
    """Run the whole demo; returns the process exit code (0 when every check held). With
    ``keep`` the server stays up afterwards (until Ctrl-C) and the web app's URL is printed
    with sign-in links for Alex and Sam."""
    from agent_network.services import create_admin_key
    from agent_network.store.engine import create_engine, database_url, upgrade_schema

    out = console or Console()
    examples_dir = find_examples(examples)
    scenario = json.loads((examples_dir / "demo" / "scenario.json").read_text(encoding="utf-8"))
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    db = data_dir / "agent-network.db"  # as `serve --data-dir`: `db list --data-dir` reads it

    async def bootstrap() -> str:
        engine = create_engine(database_url(db))
        await upgrade_schema(engine)
        key = await create_admin_key(engine)
        await engine.dispose()
        return key

    import anyio

    chosen = model or os.environ.get("AGENT_NETWORK_MODEL")
    out.rule("[bold]Agent Network demo: acme-rollout")
    if not _local_model_runs(out, chosen):
        return 1
    admin_key = anyio.run(bootstrap)
    server = DemoServer(db, port or _free_port(), chosen)
    out.print(f"Starting the server on {server.url} (database {db}) ...")
    server.start()
    try:
        code = _scenario(out, server, admin_key, examples_dir, scenario, model, idle_timeout, keep)
        if keep:
            out.print("The server keeps running; press Ctrl-C to stop it.")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return code
    except DemoError as exc:
        out.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    finally:
        server.stop()


def _local_model_runs(out: Console, model: str | None) -> bool:
    """For the local model, the doctor's checks (one token in a worker, stopped afterwards):
    on a failure, say why and what to run instead, and return False. Other models: True."""
    from agent_network.doctor import failed, run_checks
    from agent_network.runtime.models import resolve_model_name

    name = resolve_model_name(None, model)
    if not name.startswith("local:"):
        return True
    out.print(f"Checking the local model {name} (one token in a model worker) ...")
    problems = failed(run_checks())
    if not problems:
        return True
    out.print(f"[bold red]The local model {name} cannot run on this machine:[/]")
    for check in problems:
        out.print(f"  - {check.detail}", highlight=False)
        if check.fix:
            out.print(f"    fix: [bold]{check.fix}[/]", highlight=False)
    out.print(
        "Or run the demo on another model: [bold]agent-network demo --model test[/] "
        "(deterministic, instant), or a provider model such as "
        "[bold]--model openai:gpt-4o[/] (with OPENAI_API_KEY set and "
        "pip install 'agent-network[providers]')."
    )
    return False


def setup_companies(
    url: str, admin_key: str, examples: Path, scenario: dict[str, Any], model: str | None
) -> tuple[Company, Company, dict[str, Any], dict[str, Any]]:
    """Create the demo's two orgs on the server at ``url`` with the platform ``admin_key``:
    Acme (Alex Rivera, Customer Ops Agent) and Globex (Sam Chen, Delivery Agent), each with its
    private team, threads and knowledge from ``examples``/``scenario``; ``model`` is the agents'
    model (None: the server's default). Returns ``(acme, globex, acme_side, globex_side)``, each
    side a dict with the created ``user`` and ``agent`` (API objects). Raises what
    :meth:`Company.call` raises when the server refuses a call."""
    acme = Company(url, admin_key, "Acme")
    globex = Company(url, admin_key, "Globex")
    a = _setup_company(
        acme,
        examples,
        scenario,
        key="acme",
        person="Alex Rivera (project lead)",
        agent_name="Customer Ops Agent",
        agent_key="ops",
        model=model,
    )
    g = _setup_company(
        globex,
        examples,
        scenario,
        key="globex",
        person="Sam Chen (delivery lead)",
        agent_name="Delivery Agent",
        agent_key="delivery",
        model=model,
    )
    return acme, globex, a, g


def _scenario(
    out: Console,
    server: DemoServer,
    admin_key: str,
    examples: Path,
    scenario: dict[str, Any],
    model: str | None,
    idle_timeout: float,
    keep: bool = False,
) -> int:
    acme, globex, a, g = setup_companies(server.url, admin_key, examples, scenario, model)
    out.print("Acme and Globex set up: people, agents, private teams, threads and knowledge.")

    net = acme.call(
        "POST",
        "/networks",
        json={"name": "acme-rollout", "description": "Billing migration rollout, Acme x Globex"},
    )
    for member in ({"agent_id": a["agent"]["id"]}, {"user_id": a["user"]["id"]}):
        acme.call("POST", f"/networks/{net['id']}/members", json=member)
    invite = acme.call("POST", f"/networks/{net['id']}/invites", json={})
    out.print(
        f"Acme created network [bold]acme-rollout[/] and invite code "
        f"[bold yellow]{invite['join_code']}[/] (expires {invite['expires_at'][:10]})."
    )
    globex.call(
        "POST",
        "/networks/join",
        json={
            "code": invite["join_code"],
            "agent_ids": [g["agent"]["id"]],
            "user_ids": [g["user"]["id"]],
        },
    )
    out.print("Globex joined with the code, attaching only Delivery Agent and Sam Chen.")
    thread = acme.call("POST", f"/networks/{net['id']}/threads", json={"title": "rollout-status"})
    for co, side in ((acme, a), (globex, g)):
        co.call(
            "POST",
            f"/agents/{side['agent']['id']}/routines",
            json={
                "name": "participate_in_rollout",
                "event_type": "thread.message_added",
                "handler_type": "preset",
                "preset_name": "participate",
            },
        )
    members = acme.call("GET", f"/networks/{net['id']}/members")
    out.print(
        "Visible participants: " + ", ".join(f"{m['name']} [{m['org_name']}]" for m in members)
    )

    out.rule("[bold]rollout-status (live)")
    acme.call(
        "POST",
        f"/threads/{thread['id']}/messages",
        json={"content": KICKOFF, "user_id": a["user"]["id"]},
    )
    transcript = _stream(out, acme, thread["id"], idle_timeout)
    agents_spoke = {m["sender"]["name"] for m in transcript if m["sender"]["kind"] == "agent"}
    state = acme.call("GET", f"/threads/{thread['id']}")
    if state["consecutive_agent_messages"] >= state["agent_budget"]:
        out.print(
            f"[dim]Runaway guard: the thread's budget of {state['agent_budget']} "
            "consecutive agent messages is spent; agents wait for a person now "
            "(refusals are in each org's audit log).[/]"
        )

    ok = _visibility_report(out, acme, globex, a, g, net, thread)
    ok &= {"Customer Ops Agent", "Delivery Agent"} <= agents_spoke
    if not {"Customer Ops Agent", "Delivery Agent"} <= agents_spoke:
        out.print("[red]not both agents answered[/]")

    report = globex.call("GET", f"/threads/{thread['id']}/verify")
    out.print(
        f"Hash chain of rollout-status verified by Globex: "
        f"{'[green]intact' if report['ok'] else '[red]BROKEN'}[/] "
        f"({report['checked']} envelopes)"
    )
    ok &= bool(report["ok"])

    before = acme.call("GET", f"/threads/{thread['id']}/envelopes", params={"limit": 1000})
    out.rule("[bold]Restart")
    out.print("Killing the server with SIGKILL and starting it again on the same database ...")
    server.kill()
    server.start()
    after = acme.call("GET", f"/threads/{thread['id']}/envelopes", params={"limit": 1000})
    same = [e["hash"] for e in before["items"]] == [e["hash"] for e in after["items"]]
    out.print(
        f"rollout-status after restart: {len(after['items'])} envelopes, "
        f"{'[green]identical to before' if same else '[red]DIFFERENT'}[/]."
    )
    ok &= same
    if keep:
        _app_links(out, server.url, [(acme, a), (globex, g)], thread["id"])
    for co in (acme, globex):
        co.http.close()
    out.rule("[bold green]demo complete" if ok else "[bold red]demo finished with failures")
    return 0 if ok else 1


def _app_links(
    out: Console, url: str, sides: list[tuple[Company, dict[str, Any]]], thread_id: str
) -> None:
    """Print the web app's URL and a sign-in link per person (a fresh user token in the URL
    fragment, which the browser never sends to the server; docs/webapp.md)."""
    out.rule("[bold]Watch and post in the web app")
    out.print(f"Web app: {url}/app/  (thread rollout-status: {url}/app/threads/{thread_id})")
    for co, side in sides:
        made = co.call(
            "POST",
            "/credentials",
            json={"kind": "user_token", "subject_id": side["user"]["id"], "name": "demo web"},
        )
        out.print(f"Sign in as {side['user']['name']} ({co.name}): ", end="")
        out.print(f"{url}/app/login#key={made['secret']}", markup=False, highlight=False)


def _stream(out: Console, co: Company, thread_id: str, idle_timeout: float) -> list[dict[str, Any]]:
    """Print messages as they arrive until agents stop (budget spent or quiet)."""
    seen: list[dict[str, Any]] = []
    after, last_activity = 0, time.monotonic()

    def show(wait: float) -> None:
        nonlocal after, last_activity
        page = co.call(
            "GET", f"/threads/{thread_id}/messages", params={"after": after, "wait": wait}
        )
        after = page["next_after"]
        for m in page["items"]:
            seen.append(m)
            last_activity = time.monotonic()
            color = COLORS.get(m["sender"]["org_name"], "white")
            out.print(
                f"[bold {color}]{m['sender']['name']}[/] [dim]({m['sender']['org_name']})"
                f"[/]: {m['content']}"
            )

    while time.monotonic() - last_activity < idle_timeout:
        show(10)
        state = co.call("GET", f"/threads/{thread_id}")
        agent_msgs = sum(1 for m in seen if m["sender"]["kind"] == "agent")
        if state["consecutive_agent_messages"] >= state["agent_budget"] or (
            agent_msgs >= 2 and time.monotonic() - last_activity > 30
        ):
            break
    show(0)
    return seen


def _visibility_report(
    out: Console,
    acme: Company,
    globex: Company,
    a: dict[str, Any],
    g: dict[str, Any],
    net: dict[str, Any],
    thread: dict[str, Any],
) -> bool:
    out.rule("[bold]What each org can see")
    table = Table("", "Acme sees", "Globex sees")
    views = {}
    for co, side in ((acme, a), (globex, g)):
        threads = co.call("GET", "/threads")
        docs = co.call("GET", f"/agents/{side['agent']['id']}/knowledge")
        views[co.name] = {
            "agents": [x["name"] for x in co.call("GET", "/agents")],
            "threads": [x["title"] for x in threads],
            "knowledge": [d["name"] for d in docs],
            "networks": [x["name"] for x in co.call("GET", "/networks")],
        }
    for row in ("agents", "threads", "knowledge", "networks"):
        table.add_row(row, "\n".join(views["Acme"][row]), "\n".join(views["Globex"][row]))
    out.print(table)

    ok = True
    probes = [(globex, "Acme", f"/threads/{tid}", name) for name, tid in a["private"].items()]
    probes += [(acme, "Globex", f"/threads/{tid}", name) for name, tid in g["private"].items()]
    probes += [
        (globex, "Acme", f"/agents/{a['agent']['id']}/knowledge", "Acme agent knowledge"),
        (acme, "Globex", f"/agents/{g['agent']['id']}/knowledge", "Globex agent knowledge"),
    ]
    for co, owner, path, label in probes:
        status = co.http.get(path).status_code
        good = status == 404
        ok &= good
        out.print(
            f"{co.name} asks for {owner}'s {label}: "
            f"{'[green]404 not found' if good else f'[red]{status} (LEAK)'}[/]"
        )
    shared_ok = (
        "rollout-status" in views["Globex"]["threads"]
        and all(t not in views["Globex"]["threads"] for t in a["private"])
        and all(t not in views["Acme"]["threads"] for t in g["private"])
    )
    ok &= shared_ok
    out.print(
        "Both see acme-rollout and rollout-status; neither sees the other's private "
        f"threads or knowledge: {'[green]yes' if shared_ok else '[red]NO'}[/]"
    )
    return ok
