"""``agent-network apply FILE_OR_FOLDER``: agents as files, applied idempotently.

Each YAML document describes one agent (shape: docs/cli.md, "Agents as files"; example:
examples/agents/acme-ops.yaml). The agent is found by its ``lookup_key`` (unique in the org:
the server's key, not its display name) and created or updated field by field; its routines
are matched by name, its rule compared with the one in force, its knowledge documents by the
SHA-256 of their content. Running the same files twice changes nothing the second time; each
object is reported as ``created``, ``updated`` (with the fields changed) or ``unchanged``.
Nothing is deleted: routines and documents the file does not name are left as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.text import Text

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    fail,
    handles_errors,
    out,
    print_json,
)

YAML_SUFFIXES = (".yaml", ".yml")


class Spec(BaseModel):
    """Base of the file's shapes: unknown fields are an error (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")


class RoutineSpec(Spec):
    """A routine of the agent, matched by ``name``."""

    name: str
    preset: str = "participate"
    event_type: str = "thread.message_added"
    config: dict[str, Any] = Field(default_factory=dict)
    status: Literal["active", "paused"] = "active"


class KnowledgeSpec(Spec):
    """A document: ``path`` (relative to the YAML file; its name is the file's name unless
    ``name`` is given) or inline ``name`` + ``content``."""

    path: str | None = None
    name: str | None = None
    content: str | None = None


class AgentSpec(Spec):
    """One agent and what hangs off it."""

    kind: Literal["agent"] = "agent"
    name: str
    lookup_key: str
    identity: str = ""
    model: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    resume: dict[str, Any] | None = None
    routines: list[RoutineSpec] = Field(default_factory=list)
    rule: dict[str, Any] | None = None
    knowledge: list[KnowledgeSpec] = Field(default_factory=list)


def spec_files(target: Path) -> list[Path]:
    """``target`` itself, or every .yaml/.yml file in the folder ``target`` (sorted, not
    recursive). Exits 2 when there is none."""
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() in YAML_SUFFIXES)
        if not files:
            fail(f"no .yaml or .yml file in {target}", 2)
        return files
    if not target.is_file():
        fail(f"no such file or directory: {target}", 2)
    return [target]


def load_specs(path: Path) -> list[AgentSpec]:
    """The agent specs of one YAML file (several documents separated by ``---`` allowed).
    Exits 2 naming the file and the field for a file that is not valid YAML or not this shape."""
    import yaml  # type: ignore[import-untyped]

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        fail(f"{path}: cannot read it as YAML: {exc}", 2)
    specs = []
    for i, doc in enumerate(docs, 1):
        try:
            specs.append(AgentSpec.model_validate(doc))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top)"
            fail(f"{path} (document {i}): {where}: {first['msg']}", 2)
    return specs


def documents(spec: AgentSpec, base: Path) -> list[dict[str, str]]:
    """The spec's documents as ``{"name", "content"}``, files read relative to ``base``. Exits
    2 for an entry with neither a readable ``path`` nor ``name`` + ``content``."""
    out_docs = []
    for entry in spec.knowledge:
        if entry.path is not None:
            file = (base / entry.path).resolve()
            try:
                content = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                content = file.read_bytes().decode("latin-1")
            except OSError as exc:
                fail(f"agent {spec.lookup_key}: knowledge {entry.path}: {exc.strerror or exc}", 2)
            out_docs.append({"name": entry.name or file.name, "content": content})
        elif entry.name and entry.content is not None:
            out_docs.append({"name": entry.name, "content": entry.content})
        else:
            fail(f"agent {spec.lookup_key}: a knowledge entry needs path, or name and content", 2)
    return out_docs


def _rule_entry(entry: str, principals: dict[str, Any]) -> str:
    """A rule list entry as the server stores it: an id stays; a name a principal of the rule
    in force carries becomes its id (``org:<name>`` for an org); anything else stays."""
    if entry in ("*", "org:self") or entry in principals:
        return entry
    for pid, who in principals.items():
        name = who.name
        if name is None:
            continue
        if (who.kind == "org" and entry == f"org:{name}") or (who.kind != "org" and entry == name):
            return str(pid)
    return entry


def rule_changes(wanted: dict[str, Any], current: Any) -> list[str]:
    """Fields of ``wanted`` (a rule as written in the file; fields left out take their
    defaults) that differ from ``current`` (the :class:`Rule` in force)."""
    from agent_network.client.models import Rule

    defaults = Rule().model_dump(exclude={"principals"})
    have = current.model_dump(exclude={"principals"})
    changed = []
    for field, default in defaults.items():
        want = wanted.get(field, default)
        if field in ("inbound_from", "outbound_to") and isinstance(want, list):
            want = [_rule_entry(str(e), current.principals) for e in want]
        if want != have.get(field):
            changed.append(field)
    return changed


class Report:
    """What apply did, one row per object: ``kind``, ``key``, ``id``, ``action``, ``changes``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, kind: str, key: str, obj_id: str | None, action: str, changes: list[str] | None = None
    ) -> None:
        self.rows.append(
            {"kind": kind, "key": key, "id": obj_id, "action": action, "changes": changes or []}
        )


def apply_agent(client: Any, spec: AgentSpec, base: Path, report: Report) -> None:
    """Create or update one agent, then its routines, rule and knowledge (see the module)."""
    docs = documents(spec, base)
    fields: dict[str, Any] = {
        "name": spec.name,
        "identity": spec.identity,
        "model": spec.model,
        "metadata": spec.metadata,
        "resume": spec.resume,
    }
    agent = next((a for a in client.agents.list() if a.lookup_key == spec.lookup_key), None)
    if agent is None:
        agent = client.agents.create(
            spec.name, spec.lookup_key, **{k: v for k, v in fields.items() if k != "name"}
        )
        report.add("agent", spec.lookup_key, agent.id, "created")
    else:
        have = agent.model_dump(mode="json")
        wanted_resume: dict[str, Any] | None = spec.resume
        if have.get("resume") is not None and spec.resume is not None:
            wanted_resume = {"capabilities": [], "domains": [], "summary": "", **spec.resume}
        wanted = {**fields, "resume": wanted_resume}
        changed = [k for k, v in wanted.items() if have.get(k) != v]
        if changed:
            agent = client.agents.update(agent.id, **{k: fields[k] for k in changed})
            report.add("agent", spec.lookup_key, agent.id, "updated", changed)
        else:
            report.add("agent", spec.lookup_key, agent.id, "unchanged")
    apply_routines(client, agent.id, spec, report)
    if spec.rule is not None:
        changed = rule_changes(spec.rule, client.agents.rule.get(agent.id))
        if changed:
            client.agents.rule.put(agent.id, spec.rule)
            report.add("rule", spec.lookup_key, agent.id, "updated", changed)
        else:
            report.add("rule", spec.lookup_key, agent.id, "unchanged")
    if docs:
        present = {d.sha256: d for d in client.agents.knowledge.list(agent.id) if d.sha256}
        new: list[dict[str, str]] = []
        for doc in docs:
            digest = hashlib.sha256(doc["content"].encode("utf-8")).hexdigest()
            if digest in present:
                report.add(
                    "document", f"{spec.lookup_key}/{doc['name']}", present[digest].id, "unchanged"
                )
            elif digest not in {hashlib.sha256(n["content"].encode()).hexdigest() for n in new}:
                new.append(doc)
        if new:
            for created in client.agents.knowledge.add(agent.id, new):
                report.add("document", f"{spec.lookup_key}/{created.name}", created.id, "created")


def apply_routines(client: Any, agent_id: str, spec: AgentSpec, report: Report) -> None:
    """Create the routines the agent lacks (by name); update config and status of the others;
    a routine whose preset or event changed is replaced (deleted, then created)."""
    have = {r.name: r for r in client.agents.routines.list(agent_id)}
    for want in spec.routines:
        key = f"{spec.lookup_key}/{want.name}"
        current = have.get(want.name)
        if current is not None and (
            current.preset_name != want.preset or current.event_type != want.event_type
        ):
            client.agents.routines.delete(agent_id, current.id)
            current = None
            replaced = True
        else:
            replaced = False
        if current is None:
            routine = client.agents.routines.create(
                agent_id,
                want.name,
                event_type=want.event_type,
                preset_name=want.preset,
                config=want.config,
            )
            if want.status == "paused":
                routine = client.agents.routines.pause(agent_id, routine.id)
            report.add(
                "routine",
                key,
                routine.id,
                "updated" if replaced else "created",
                ["preset"] if replaced else None,
            )
            continue
        changes: dict[str, Any] = {}
        if current.config != want.config:
            changes["config"] = want.config
        if current.status != want.status:
            changes["status"] = want.status
        if changes:
            client.agents.routines.update(agent_id, current.id, **changes)
            report.add("routine", key, current.id, "updated", sorted(changes))
        else:
            report.add("routine", key, current.id, "unchanged")


@handles_errors
def apply(
    target: Annotated[Path, typer.Argument(help="an agent YAML file, or a folder of them")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create or update agents, routines, rules and knowledge from YAML files, idempotently.

    Running it twice changes nothing the second time. Prints what it created, updated (and
    which fields) or left unchanged. The credential is an org key.
    """
    files = spec_files(target)
    loaded = [(path, spec) for path in files for spec in load_specs(path)]
    report = Report()
    with api(url, token) as client:
        for path, spec in loaded:
            apply_agent(client, spec, path.parent, report)
    if json_output:
        print_json(report.rows)
        return
    console = out()
    for row in report.rows:
        detail = f" ({', '.join(row['changes'])})" if row["changes"] else ""
        console.print(
            Text(f"{row['kind']:<8} {row['key']}: {row['action']}{detail}  {row['id'] or ''}")
        )
    counts = {
        a: sum(r["action"] == a for r in report.rows) for a in ("created", "updated", "unchanged")
    }
    console.print(Text(", ".join(f"{n} {a}" for a, n in counts.items())))


def register(app: typer.Typer) -> None:
    """Add ``apply`` to ``app``."""
    app.command("apply")(apply)
