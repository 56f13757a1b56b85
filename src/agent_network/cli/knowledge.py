"""``knowledge``: documents of the caller's org or of one agent (add, list, delete, search).

``knowledge add`` reads every file first (UTF-8; a file that is not UTF-8 is read as Latin-1,
with a note naming it; a binary file is refused by name before anything is sent), skips files
whose content the org (or the agent) already holds (same SHA-256, as ``GET /knowledge``
reports it) and files repeated in the same call, then uploads the rest in batches under a Rich
progress bar.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    err,
    fail,
    handles_errors,
    out,
    print_json,
    show,
    typer_app,
)

knowledge_app = typer_app(
    "Knowledge of the caller's org or of one agent: add, list, delete, search."
)

KNOWLEDGE_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
DOCUMENT_COLUMNS = ["id", "name", "agent_id", "chunks", "created_at"]
BATCH_DOCUMENTS = 50
BATCH_CHARACTERS = 4_000_000

AgentOption = Annotated[
    str | None, typer.Option("--agent", help="agent id (default: org-wide knowledge)")
]


@dataclass(frozen=True)
class TextFile:
    """A file read for upload: its ``path``, ``content``, ``sha256`` and the ``encoding`` used."""

    path: Path
    content: str
    sha256: str
    encoding: str


def files_below(paths: list[Path]) -> list[Path]:
    """The files named, with every .md/.markdown/.txt/.rst file below each folder named (sorted).
    Exits 2 naming a path that does not exist."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in KNOWLEDGE_SUFFIXES
            )
        elif p.is_file():
            files.append(p)
        else:
            fail(f"no such file or directory: {p}", 2)
    return files


def read_text(path: Path) -> TextFile:
    """Read ``path`` as UTF-8, else as Latin-1 (every byte is a Latin-1 character); exits 2
    naming a file that holds NUL bytes (binary, not text) or cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", 2)
    if b"\x00" in raw:
        fail(f"{path} is not a text file (it holds NUL bytes): leave it out", 2)
    try:
        content, encoding = raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        content, encoding = raw.decode("latin-1"), "latin-1"
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return TextFile(path, content, digest, encoding)


def batches(files: list[TextFile]) -> Iterator[list[TextFile]]:
    """``files`` in upload batches (at most :data:`BATCH_DOCUMENTS` documents and about
    :data:`BATCH_CHARACTERS` characters each)."""
    batch: list[TextFile] = []
    size = 0
    for f in files:
        if batch and (len(batch) >= BATCH_DOCUMENTS or size + len(f.content) > BATCH_CHARACTERS):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += len(f.content)
    if batch:
        yield batch


def existing_hashes(client: Any, agent: str | None) -> dict[str, str]:
    """sha256 -> document id of the documents already in the scope (org-wide, or the agent's)."""
    docs = client.agents.knowledge.list(agent) if agent else client.knowledge.list()
    return {d.sha256: d.id for d in docs if d.sha256}


def upload(
    client: Any, read: list[TextFile], agent: str | None, *, quiet: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Upload the files of ``read`` whose content the scope (the org, or ``agent``) lacks, in
    batches under a progress bar on stderr (none when ``quiet``). Returns the documents added
    (with their ``path``) and the files skipped (with the ``document_id`` holding the same
    content). Raises the SDK's ApiError of a refused batch (the batches before it stay)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    added: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    present = existing_hashes(client, agent)
    todo: list[TextFile] = []
    for f in read:
        if f.sha256 in present:
            skipped.append({"path": str(f.path), "document_id": present[f.sha256]})
        else:
            present[f.sha256] = f"(this upload: {f.path})"
            todo.append(f)
    progress = Progress(
        TextColumn("uploading"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=err(),
        disable=quiet or not todo,
        transient=False,
    )
    with progress:
        task = progress.add_task("", total=len(todo))
        for batch in batches(todo):
            progress.update(task, description=batch[-1].path.name)
            docs = [{"name": f.path.name, "content": f.content} for f in batch]
            result = (
                client.agents.knowledge.add(agent, docs) if agent else client.knowledge.add(docs)
            )
            for f, doc in zip(batch, result, strict=True):
                added.append({"path": str(f.path), **doc.model_dump(mode="json")})
            progress.advance(task, len(batch))
    return added, skipped


@knowledge_app.command("add")
@handles_errors
def knowledge_add(
    paths: Annotated[list[Path], typer.Argument(help="text/markdown files or folders")],
    agent: AgentOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
    key: Annotated[
        str | None, typer.Option("--key", hidden=True, help="deprecated: use --token")
    ] = None,
) -> None:
    """Upload files (folders: every .md/.markdown/.txt/.rst file below them), with progress.

    A file whose content is there already (same SHA-256) is skipped, so adding the same
    folder twice uploads nothing the second time.
    """
    files = files_below(paths)
    if not files:
        fail("no text or markdown files found", 2)
    read = [read_text(f) for f in files]
    for f in read:
        if f.encoding != "utf-8":
            err().print(f"note: {f.path} is not UTF-8; read as Latin-1", markup=False)
    from agent_network.client import ApiError

    with api(url, token or key) as client:
        try:
            added, skipped = upload(client, read, agent, quiet=json_output)
        except ApiError as exc:
            if key is not None:  # the old --key interface reported "<status>: ..." on stdout
                typer.echo(f"{exc.status}: {exc.message}")
            raise
    if json_output:
        print_json({"added": added, "skipped": skipped})
        return
    console = out()
    for doc in added:
        console.print(Text(f"added   {doc['id']}  {doc['path']}  ({doc['chunks']} chunks)"))
    for item in skipped:
        console.print(Text(f"skipped {item['path']}: same content as {item['document_id']}"))
    console.print(Text(f"{len(added)} added, {len(skipped)} skipped (already there)"))


@knowledge_app.command("list")
@handles_errors
def knowledge_list(
    agent: AgentOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """The org-wide documents, or one agent's (--agent)."""
    with api(url, token) as client:
        docs = client.agents.knowledge.list(agent) if agent else client.knowledge.list()
    show(docs, DOCUMENT_COLUMNS, json_output=json_output)


@knowledge_app.command("delete")
@handles_errors
def knowledge_delete(
    document_id: Annotated[str, typer.Argument(help="the document's id (doc_...)")],
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a document (org-wide or an agent's)."""
    with api(url, token) as client:
        client.knowledge.delete(document_id)
    if json_output:
        print_json({"deleted": document_id})
    else:
        out().print(Text(f"deleted {document_id}"))


@knowledge_app.command("search")
@handles_errors
def knowledge_search(
    query: Annotated[str, typer.Argument(help="free text")],
    agent: Annotated[
        str | None, typer.Option("--agent", help="also search this agent's own documents")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=50, help="chunks returned")] = 5,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Best chunks of the caller org's knowledge for a query."""
    with api(url, token) as client:
        hits = client.knowledge.search(query, agent_id=agent, limit=limit)
    if json_output:
        print_json(hits)
        return
    console = out()
    for hit in hits:
        console.print(
            Text.assemble(
                (f"{hit.document} ({hit.document_id})", "bold"), f"  score {hit.score:.2f}"
            )
        )
        console.print(Text(hit.text))
        console.print(Text(""))


def register(app: typer.Typer) -> None:
    """Add the ``knowledge`` group to ``app``."""
    app.add_typer(knowledge_app, name="knowledge")
