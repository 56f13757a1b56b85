"""``agents`` and ``routines``: the caller org's agents and their routines, over the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    cell,
    fail,
    handles_errors,
    out,
    plain,
    print_json,
    report_done,
    show,
    show_record,
    typer_app,
)

agents_app = typer_app("The caller org's agents.")
routines_app = typer_app("Routines of an agent: what it does on events (participate, triage).")

AGENT_COLUMNS = ["id", "name", "lookup_key", "model", "created_at"]
ROUTINE_COLUMNS = ["id", "agent_id", "name", "event_type", "preset_name", "status"]
UNSET: Any = None


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object (None stays None); exits 2 naming ``option`` otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{option} is not valid JSON: {exc}", 2)
    if not isinstance(value, dict):
        fail(f"{option} must be a JSON object", 2)
    return value


AgentId = Annotated[str, typer.Argument(help="the agent's id (agt_...)")]
IdentityOption = Annotated[str | None, typer.Option(help="who the agent is (system prompt)")]
ModelOption = Annotated[
    str | None, typer.Option(help="model, e.g. 'test' or 'local:smollm2' [default: server's]")
]
MetadataOption = Annotated[str | None, typer.Option(help="metadata as a JSON object")]
ResumeOption = Annotated[
    str | None,
    typer.Option(help='resume as JSON: {"capabilities": [...], "domains": [...], "summary": ""}'),
]


@agents_app.command("list")
@handles_errors
def agents_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """The caller org's agents."""
    with api(url, token) as client:
        show(client.agents.list(), AGENT_COLUMNS, json_output=json_output)


@agents_app.command("show")
@handles_errors
def agents_show(
    agent_id: AgentId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """One agent, every field."""
    with api(url, token) as client:
        show_record(client.agents.get(agent_id), json_output=json_output)


@agents_app.command("create")
@handles_errors
def agents_create(
    name: Annotated[str, typer.Argument(help="display name")],
    lookup_key: Annotated[str, typer.Argument(help="unique key in the org, e.g. 'ops'")],
    identity: IdentityOption = None,
    model: ModelOption = None,
    metadata: MetadataOption = None,
    resume: ResumeOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create an agent (conflict when the lookup key is taken: use 'apply' to update)."""
    with api(url, token) as client:
        agent = client.agents.create(
            name,
            lookup_key,
            identity=identity or "",
            model=model,
            metadata=json_object(metadata, "--metadata"),
            resume=json_object(resume, "--resume"),
        )
    show(agent, AGENT_COLUMNS, json_output=json_output)


@agents_app.command("update")
@handles_errors
def agents_update(
    agent_id: AgentId,
    name: Annotated[str | None, typer.Option(help="new display name")] = None,
    lookup_key: Annotated[str | None, typer.Option(help="new lookup key")] = None,
    identity: IdentityOption = None,
    model: ModelOption = None,
    metadata: MetadataOption = None,
    resume: ResumeOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change the fields given; the others stay."""
    from agent_network.client import UNSET as SDK_UNSET

    fields: dict[str, Any] = {
        "name": name,
        "lookup_key": lookup_key,
        "identity": identity,
        "model": model,
        "metadata": json_object(metadata, "--metadata"),
        "resume": json_object(resume, "--resume"),
    }
    changes = {k: (SDK_UNSET if v is None else v) for k, v in fields.items()}
    if all(v is SDK_UNSET for v in changes.values()):
        fail("nothing to change: give at least one option", 2)
    with api(url, token) as client:
        show(client.agents.update(agent_id, **changes), AGENT_COLUMNS, json_output=json_output)


@agents_app.command("delete")
@handles_errors
def agents_delete(
    agent_id: AgentId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete an agent: it leaves every team and network and its routines stop."""
    with api(url, token) as client:
        client.agents.delete(agent_id)
    report_done({"deleted": agent_id}, f"deleted {agent_id}", json_output=json_output)


@routines_app.command("list")
@handles_errors
def routines_list(
    agent_id: AgentId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """An agent's routines."""
    with api(url, token) as client:
        show(client.agents.routines.list(agent_id), ROUTINE_COLUMNS, json_output=json_output)


@routines_app.command("add")
@handles_errors
def routines_add(
    agent_id: AgentId,
    name: Annotated[str, typer.Argument(help="the routine's name")],
    preset: Annotated[str, typer.Option(help="preset: participate or triage")] = "participate",
    event_type: Annotated[str, typer.Option(help="event it reacts to")] = "thread.message_added",
    config: Annotated[str | None, typer.Option(help="config as a JSON object")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Attach a preset routine to an agent (active at once)."""
    with api(url, token) as client:
        routine = client.agents.routines.create(
            agent_id,
            name,
            event_type=event_type,
            preset_name=preset,
            config=json_object(config, "--config"),
        )
    show(routine, ROUTINE_COLUMNS, json_output=json_output)


RoutineId = Annotated[str, typer.Argument(help="the routine's id (rtn_...)")]


@routines_app.command("activate")
@handles_errors
def routines_activate(
    agent_id: AgentId,
    routine_id: RoutineId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Activate a paused routine."""
    with api(url, token) as client:
        routine = client.agents.routines.activate(agent_id, routine_id)
    show(routine, ROUTINE_COLUMNS, json_output=json_output)


@routines_app.command("pause")
@handles_errors
def routines_pause(
    agent_id: AgentId,
    routine_id: RoutineId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Pause a routine: it stops reacting until activated."""
    with api(url, token) as client:
        routine = client.agents.routines.pause(agent_id, routine_id)
    show(routine, ROUTINE_COLUMNS, json_output=json_output)


@routines_app.command("delete")
@handles_errors
def routines_delete(
    agent_id: AgentId,
    routine_id: RoutineId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a routine from an agent."""
    with api(url, token) as client:
        client.agents.routines.delete(agent_id, routine_id)
    report_done({"deleted": routine_id}, f"deleted routine {routine_id}", json_output=json_output)


# ---------------------------------------------------------------------------------------------
# agents rule


rule_app = typer_app("An agent's rule: who may trigger it, whom it may address, its limits.")
agents_app.add_typer(rule_app, name="rule")

RULE_FIELDS = (
    "inbound_from",
    "outbound_to",
    "rate",
    "inbox_cap",
    "max_concurrent_threads",
    "allowed_adapters",
    "delegation_depth",
)


def read_rule_file(path: Path) -> dict[str, Any]:
    """The rule in a YAML or JSON file (JSON is YAML too): a mapping of rule fields, or
    ``{"rule": {...}}`` as in an ``apply`` file. Exits 2 naming the file for an unreadable
    file, bad YAML/JSON, or a document that is not a mapping; the server checks the fields."""
    import yaml  # type: ignore[import-untyped]

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        fail(f"{path}: cannot read the rule: {exc}", 2)
    if isinstance(data, dict) and set(data) == {"rule"}:
        data = data["rule"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(f"{path}: a rule is a mapping of fields ({', '.join(RULE_FIELDS)})", 2)
    return {str(k): v for k, v in data.items()}


def _show_rule(rule: Any, json_output: bool) -> None:
    if json_output:
        print_json(rule)
        return
    from rich.text import Text

    data = plain(rule)
    principals = data.get("principals") or {}
    console = out()
    for name in RULE_FIELDS:
        value = data.get(name)
        if name in ("inbound_from", "outbound_to") and isinstance(value, list):
            shown = [_entry_label(str(e), principals) for e in value]
            console.print(Text(f"{name}: {', '.join(shown) if shown else '(nobody)'}"))
        else:
            console.print(Text(f"{name}: {cell(value) if value is not None else 'no limit'}"))


def _entry_label(entry: str, principals: dict[str, Any]) -> str:
    who = principals.get(entry)
    if not who or not who.get("name"):
        return entry
    org = f", {who['org_name']}" if who.get("org_name") and who.get("kind") != "org" else ""
    return f"{entry} ({who['kind']} {who['name']}{org})"


@rule_app.command("show")
@handles_errors
def rule_show(
    agent_id: AgentId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """The agent's rule (the defaults when none was set), each id with who it is."""
    with api(url, token) as client:
        _show_rule(client.agents.rule.get(agent_id), json_output)


@rule_app.command("set")
@handles_errors
def rule_set(
    agent_id: AgentId,
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            "-f",
            help="the rule as YAML or JSON (fields left out take their defaults)",
            show_default=False,
        ),
    ],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Replace the agent's rule with the file's (org key). Names in inbound_from/outbound_to
    are resolved to ids by the server; the rule in force is printed."""
    rule = read_rule_file(file)
    with api(url, token) as client:
        _show_rule(client.agents.rule.put(agent_id, rule), json_output)


def register(app: typer.Typer) -> None:
    """Add the ``agents`` (with ``agents rule``) and ``routines`` groups to ``app``."""
    app.add_typer(agents_app, name="agents")
    app.add_typer(routines_app, name="routines")
