"""``threads``: threads on a running server, over the API (list, show, post, follow, verify).

Message text is printed as text, never parsed as Rich markup (``[/]`` in a message is shown
as written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.text import Text

from agent_network.cli.common import (
    JsonOption,
    TokenOption,
    UrlOption,
    api,
    api_errors,
    connection,
    fail,
    handles_errors,
    out,
    plain,
    print_json,
    show,
    show_record,
    typer_app,
)

threads_app = typer_app("Threads on a running server, through the API.")

THREAD_COLUMNS = ["id", "title", "team_id", "adapter", "status", "last_seq"]
ThreadId = Annotated[str, typer.Argument(help="the thread's id (thr_...)")]


def envelope_line(env: Any) -> Text:
    """One envelope as a line: seq, sender (org), then the message text as plain text or, for
    a thread event, its type and data dimmed."""
    sender = env.sender
    who = f"{sender.name} ({sender.org_name})" if sender.org_name else sender.name
    line = Text.assemble((f"{env.seq:>4}", "dim"), " ", (who, "bold"), ": ")
    if env.type == "message":
        line.append(env.content or "")
    else:
        line.append(f"{env.type} {json.dumps(env.data, default=str)}", style="dim")
    return line


@threads_app.command("list")
@handles_errors
def threads_list(
    url: UrlOption = None, token: TokenOption = None, json_output: JsonOption = False
) -> None:
    """Every thread the caller can see."""
    with api(url, token) as client:
        show(client.threads.list(), THREAD_COLUMNS, json_output=json_output)


def _member(text: str, option: str) -> tuple[str, str]:
    """``agent:ID`` / ``user:ID`` as a pair; exits 2 naming ``option`` otherwise."""
    kind, _, ident = text.partition(":")
    if kind not in ("agent", "user") or not ident:
        fail(f"{option} takes agent:ID or user:ID, not {text!r}", 2)
    return kind, ident


def _graph_file(path: Path) -> dict[str, Any]:
    """A workflow graph (``TransitionGraph.to_dict()``) from a YAML or JSON file; exits 2
    naming the file when it cannot be read or is not a mapping."""
    import yaml  # type: ignore[import-untyped]

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        fail(f"{path}: cannot read the graph: {exc}", 2)
    if not isinstance(data, dict):
        fail(f"{path}: a graph is a mapping (TransitionGraph.to_dict())", 2)
    return data


@threads_app.command("create")
@handles_errors
def threads_create(
    title: Annotated[str, typer.Argument(help="the thread's title")],
    team: Annotated[str | None, typer.Option("--team", help="open it in this team (id)")] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="open it in this network (id)")
    ] = None,
    adapter: Annotated[
        str,
        typer.Option(
            help="protocol: open, conversation, consulting, discussion, workflow, round_robin "
            "(a workflow over the participants in turn; needs --max-turns) or a custom adapter"
        ),
    ] = "open",
    participant: Annotated[
        list[str] | None,
        typer.Option(
            "--participant", "-p", help="agent:ID or user:ID; repeatable, in speaking order"
        ),
    ] = None,
    initiator: Annotated[
        str | None,
        typer.Option(help="agent:ID or user:ID who opens it [default: the first participant]"),
    ] = None,
    no_acks: Annotated[
        bool, typer.Option("--no-acks", help="start at once: nobody needs to acknowledge")
    ] = False,
    ttl: Annotated[float | None, typer.Option(help="seconds until it closes")] = None,
    ack_timeout: Annotated[float | None, typer.Option(help="seconds the invitees have")] = None,
    max_turns: Annotated[
        int | None, typer.Option(min=1, help="round_robin: close after this many messages")
    ] = None,
    graph: Annotated[
        Path | None, typer.Option(help="workflow: the transition graph, a YAML or JSON file")
    ] = None,
    visibility: Annotated[
        str, typer.Option(help="members (every member reads it) or restricted (participants)")
    ] = "members",
    agent_budget: Annotated[
        int | None, typer.Option(min=0, help="agent messages in a row without a person's")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Open a thread in a team (--team) or a network (--network), exactly one: an open thread,
    or a protocol thread with --adapter and its participants and knobs."""
    if (team is None) == (network is None):
        fail("give exactly one of --team or --network", 2)
    if visibility not in ("members", "restricted"):
        fail("--visibility is members or restricted", 2)
    members = [_member(x, "--participant") for x in participant or []]
    first = _member(initiator, "--initiator") if initiator else None
    knobs: dict[str, Any] = {}
    if adapter == "round_robin":
        if max_turns is None:
            fail("--adapter round_robin needs --max-turns", 2)
        from agent_network.protocol.adapters.graph import TransitionGraph

        lead = first or (members[0] if members else None)
        speakers = ([lead[1]] if lead else []) + [m[1] for m in members if m != lead]
        if len(speakers) < 2:
            fail("--adapter round_robin needs two --participant or more", 2)
        adapter = "workflow"
        knobs["graph"] = TransitionGraph.round_robin(speakers, max_turns=max_turns).to_dict()
    elif graph is not None:
        knobs["graph"] = _graph_file(graph)
    with api(url, token) as client:
        thread = client.threads.create(
            title,
            team_id=team,
            network_id=network,
            adapter=adapter,
            participants=members,
            initiator=first,
            invitees=[] if no_acks else None,
            ttl=ttl,
            ack_timeout=ack_timeout,
            visibility=visibility,  # type: ignore[arg-type]
            agent_budget=agent_budget,
            **knobs,
        )
    show(thread, THREAD_COLUMNS, json_output=json_output)


@threads_app.command("show")
@handles_errors
def threads_show(
    thread_id: ThreadId,
    after: Annotated[int, typer.Option(help="only envelopes with a larger seq")] = 0,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """A thread's state (status, adapter, whose turn, pending acks) and its history."""
    with api(url, token) as client:
        thread = client.threads.get(thread_id)
        history = list(client.threads.history(thread_id, after=after))
    if json_output:
        print_json({"thread": thread, "envelopes": history})
        return
    show_record(thread, json_output=False)
    console = out()
    console.print(Text(""))
    for env in history:
        console.print(envelope_line(env))


@threads_app.command("post")
@handles_errors
def threads_post(
    thread_id: ThreadId,
    content: Annotated[str, typer.Argument(help="the message text")],
    agent: Annotated[str | None, typer.Option("--agent", help="post as this agent (id)")] = None,
    user: Annotated[str | None, typer.Option("--user", help="post as this user (id)")] = None,
    audience: Annotated[
        list[str] | None,
        typer.Option(
            "--audience", help="participant id who receives it; repeatable [default: all]"
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="the same key again returns the first message")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Post a message as one of the caller's agents or users (a token posts as itself)."""
    _as_one(agent, user)
    with api(url, token) as client:
        env = client.threads.post(
            thread_id,
            content,
            agent_id=agent,
            user_id=user,
            audience=audience,
            idempotency_key=idempotency_key,
        )
    if json_output:
        print_json(env)
    else:
        out().print(envelope_line(env))


AsAgent = Annotated[str | None, typer.Option("--agent", help="as this agent of yours (id)")]
AsUser = Annotated[str | None, typer.Option("--user", help="as this user of yours (id)")]
ReasonOption = Annotated[str | None, typer.Option(help="why, in a few words (kept in the thread)")]


def _as_one(agent: str | None, user: str | None) -> None:
    if agent is not None and user is not None:
        fail("give at most one of --agent or --user", 2)


@threads_app.command("ack")
@handles_errors
def threads_ack(
    thread_id: ThreadId,
    agent: AsAgent = None,
    user: AsUser = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Accept an invitation to a protocol thread as one of your agents or users (a token: as
    itself); the last ack makes the thread active."""
    _as_one(agent, user)
    with api(url, token) as client:
        thread = client.threads.ack(thread_id, agent_id=agent, user_id=user)
    show(thread, THREAD_COLUMNS, json_output=json_output)


@threads_app.command("reject")
@handles_errors
def threads_reject(
    thread_id: ThreadId,
    agent: AsAgent = None,
    user: AsUser = None,
    reason: ReasonOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Decline an invitation to a protocol thread: it closes (invite_rejected)."""
    _as_one(agent, user)
    with api(url, token) as client:
        thread = client.threads.reject(thread_id, agent_id=agent, user_id=user, reason=reason)
    show(thread, THREAD_COLUMNS, json_output=json_output)


@threads_app.command("close")
@handles_errors
def threads_close(
    thread_id: ThreadId,
    reason: ReasonOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Close a thread (a participant's org, or for an open thread the org that made it or
    hosts its team)."""
    with api(url, token) as client:
        thread = client.threads.close(thread_id, reason=reason)
    show(thread, THREAD_COLUMNS, json_output=json_output)


@threads_app.command("follow")
@handles_errors
def threads_follow(
    thread_id: ThreadId,
    after: Annotated[
        int, typer.Option(help="replay envelopes after this seq first (0: the whole history)")
    ] = 0,
    count: Annotated[
        int | None, typer.Option(min=1, help="stop after this many envelopes [default: never]")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Live tail over the WebSocket: replay, then print each envelope as it is committed.

    Reconnects by itself; stops with Ctrl-C, after --count envelopes, or when the thread
    closes.
    """
    from agent_network.client import AsyncClient

    conn = connection(url, token)

    async def follow() -> None:
        seen = 0
        async with AsyncClient(conn.url, conn.token) as client, client.realtime() as rt:
            room = await rt.join(thread_id, after=after)
            async for env in room:
                if json_output:
                    typer.echo(json.dumps(plain(env), ensure_ascii=False))
                else:
                    out().print(envelope_line(env))
                seen += 1
                if (count is not None and seen >= count) or env.type == "thread.closed":
                    return

    with api_errors(conn.url):
        try:
            anyio.run(follow)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


@threads_app.command("verify")
def threads_verify(
    thread_id: ThreadId,
    url: UrlOption = None,
    token: TokenOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check a thread's hash chain here, not on the server.

    Fetches every envelope the credential may read (GET /threads/{id}/envelopes, paged), with a
    stub for each one its audience hides, and recomputes every hash locally with
    agent_network.client.verify_chain (docs/security.md, "The hash chain, byte for byte").
    Exit status 0 when the chain holds; 1 when it breaks or the thread cannot be read (unknown,
    out of scope, bad credential, server unreachable); 2 without a credential.
    """
    from pydantic import ValidationError

    from agent_network.client import ApiError, AsyncClient, TransportError, verify_chain

    conn = connection(url, token)

    async def fetch() -> list[Any]:
        async with AsyncClient(conn.url, conn.token) as client:
            return [e async for e in client.threads.chain(thread_id)]

    console = out()
    try:
        chain = anyio.run(fetch)
    except ValidationError as exc:  # the server sent what no envelope looks like: broken
        reason = f"the server sent a malformed envelope: {exc.errors()[0]['msg']}"
        if json_output:
            print_json({"thread_id": thread_id, "ok": False, "reason": reason})
        else:
            console.print(
                Text.assemble(("chain broken", "red"), f" in thread {thread_id}: {reason}")
            )
        raise typer.Exit(1) from None
    except (ApiError, TransportError) as exc:
        code = getattr(exc, "code", "transport_error")
        if json_output:
            error = {"code": code, "message": str(exc)}
            print_json({"thread_id": thread_id, "ok": False, "error": error})
        else:
            console.print(Text.assemble((f"cannot read thread {thread_id}", "red"), f": {exc}"))
        raise typer.Exit(1) from None
    report = verify_chain(chain)
    if json_output:
        print_json({**report.as_dict(), "thread_id": thread_id})
        raise typer.Exit(0 if report.ok else 1)
    if report.ok:
        console.print(
            Text.assemble(
                ("chain intact", "green"),
                f": thread {thread_id}, {report.checked} envelopes verified here "
                f"({report.checked - report.stubs} recomputed, {report.stubs} hidden from this "
                f"credential checked by their links), last hash {report.last_hash}",
            )
        )
        raise typer.Exit(0)
    console.print(
        Text.assemble(
            (f"chain broken at seq {report.first_bad_seq}", "red"),
            f" of thread {thread_id}: {report.reason}",
        )
    )
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``threads`` group to ``app``."""
    app.add_typer(threads_app, name="threads")


__all__ = ["envelope_line", "fail", "register"]
