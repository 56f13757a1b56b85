"""The live thread view under ``/app/threads/{id}``: history pages, the protocol state panel
with its ack/reject/close buttons, "verify history", posting (with an audience), and the
single-use WebSocket ticket the page's script (``static/thread.js``) uses to follow the thread
live over the realtime protocol. Every action is the same services call as its API route.
Design: docs/webapp.md, "The live thread view".
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from agent_network.api.deps import check_credential_may
from agent_network.api.realtime import RealtimeProtocol
from agent_network.errors import AgentNetworkError, InvalidRequestError, PermissionDeniedError
from agent_network.web.pages import (
    PageRoute,
    Viewer,
    _checked_form,
    _to_login,
    not_found,
    viewer_of,
)
from agent_network.web.rendering import SECURITY_HEADERS, form_list, page, redirect
from agent_network.web.sessions import SessionStore

router = APIRouter(route_class=PageRoute, include_in_schema=False)

PAGE_SIZE = 50
WS_URL = "/api/v1/ws"


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def _thread_viewer(request: Request) -> Viewer | Response:
    """The signed-in org or person; the login redirect, or not found for the platform admin
    (who sees no thread)."""
    viewer = await viewer_of(request)
    if viewer is None:
        return _to_login(request)
    if viewer.principal.kind == "admin":
        return not_found(request)
    return viewer


async def _own_ids(viewer: Viewer) -> set[str]:
    """The agents and people this credential acts as: a token's own subject; an org key's
    agents and users (as far as it may list them)."""
    p, s = viewer.principal, viewer.services
    if p.kind != "org":
        return {p.subject_id} if p.subject_id else set()
    ids: set[str] = set()
    if viewer.may("GET", "/api/v1/agents"):
        ids |= {a["id"] for a in await s.agents.list_agents(p)}
    if viewer.may("GET", "/api/v1/users"):
        ids |= {u["id"] for u in await s.orgs.list_users(p)}
    return ids


async def _state_context(
    viewer: Viewer,
    thread: dict[str, Any],
    *,
    action_error: dict[str, str] | None = None,
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the protocol state panel shows: whose turn (by name), the pending acks the viewer
    may answer, whether it may close, the last action's error and the verify result."""
    names = {x["id"]: x["name"] for x in thread["participants"]}
    speaker = thread["expected_speaker"]
    tid = thread["id"]
    own = await _own_ids(viewer)
    answerable = [
        x
        for x in thread["pending_acks"]
        if x["id"] in own and viewer.may("POST", f"/api/v1/threads/{tid}/ack")
    ]
    shown = {f"{a}:{x['kind']}:{x['id']}" for x in answerable for a in ("ack", "reject")}
    loose = (
        action_error["message"]
        if action_error
        and action_error["action"] not in shown
        and action_error["action"] not in ("close", "verify")
        else None
    )
    return {
        "thread": thread,
        "answer_error": loose,
        "turn": names.get(speaker, speaker) if speaker else None,
        "answerable": answerable,
        "can_close": thread["status"] not in ("closing", "closed")
        and viewer.may("POST", f"/api/v1/threads/{tid}/close"),
        "action_error": action_error,
        "verified": verified,
    }


async def _audience_options(viewer: Viewer, thread: dict[str, Any]) -> list[dict[str, Any]]:
    """Whom a post may be addressed to: the thread's participants, else the members of its
    team or network (as far as the viewer may list them)."""
    if thread["participants"]:
        return list(thread["participants"])
    p, s = viewer.principal, viewer.services
    kinds: tuple[tuple[Literal["team", "network"], str], ...] = (
        ("team", "teams"),
        ("network", "networks"),
    )
    for kind, path in kinds:
        if not viewer.may("GET", f"/api/v1/{path}/{thread['team_id']}/members"):
            continue
        try:
            return await s.teams.list_members(p, kind, thread["team_id"])
        except AgentNetworkError:
            continue
    return []


async def thread_view(
    request: Request,
    viewer: Viewer,
    thread_id: str,
    after: int | None,
    *,
    status: int = 200,
    post_error: str | None = None,
    draft: str = "",
    action_error: dict[str, str] | None = None,
    verified: dict[str, Any] | None = None,
) -> Response:
    """The whole thread page (see :func:`thread_page`); NotFoundError when out of scope."""
    p, s = viewer.principal, viewer.services
    thread = await s.threads.get(p, thread_id)
    last = int(thread["last_seq"])
    start = max(0, last - PAGE_SIZE) if after is None else min(max(0, after), last)
    if not viewer.may("GET", f"/api/v1/threads/{thread_id}/messages"):
        raise PermissionDeniedError(f"{p.credential_name} cannot read this thread's messages")
    got = await s.threads.envelopes(p, thread_id, after=start, limit=PAGE_SIZE)
    end = int(got["next_after"])
    can_post = viewer.may("POST", f"/api/v1/threads/{thread_id}/messages")
    senders = await s.orgs.list_users(p) if can_post and p.kind == "org" else []
    audience = await _audience_options(viewer, thread)
    orgs = {m["org_id"]: m["org_name"] for m in audience if m.get("org_name")}
    orgs |= {m["sender"]["org_id"]: m["sender"]["org_name"] for m in got["items"] if "sender" in m}
    return page(
        request,
        "thread.html",
        session=viewer.session,
        status=status,
        messages=got["items"],
        older=max(0, start - PAGE_SIZE) if start > 0 else None,
        newer=end if end < last else None,
        page_start=start,
        page_end=end,
        live=end >= last,
        can_post=can_post,
        senders=senders,
        audience=audience if can_post else [],
        orgs=orgs,
        post_error=post_error,
        draft=draft,
        **await _state_context(viewer, thread, action_error=action_error, verified=verified),
    )


async def _state_answer(
    request: Request,
    viewer: Viewer,
    thread_id: str,
    *,
    status: int = 200,
    action_error: dict[str, str] | None = None,
    verified: dict[str, Any] | None = None,
) -> Response:
    """After an action: the state panel alone for htmx (swapped in place), else the page."""
    if not _is_htmx(request):
        return await thread_view(
            request,
            viewer,
            thread_id,
            None,
            status=status,
            action_error=action_error,
            verified=verified,
        )
    thread = await viewer.services.threads.get(viewer.principal, thread_id)
    return page(
        request,
        "thread_state.html",
        session=viewer.session,
        status=status,
        **await _state_context(viewer, thread, action_error=action_error, verified=verified),
    )


@router.get("/app/threads/{thread_id}")
async def thread_page(request: Request, thread_id: str, after: int | None = None) -> Response:
    """A thread: its protocol state, its history ``PAGE_SIZE`` sequence numbers a page (the
    newest page unless ``after`` is given, with links to older and newer pages) and a form to
    post. On the newest page the script follows the thread live. Not found when out of scope."""
    viewer = await _thread_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await thread_view(request, viewer, thread_id, after)


@router.get("/app/threads/{thread_id}/state")
async def thread_state(request: Request, thread_id: str) -> Response:
    """The protocol state panel alone (the script reloads it when a thread event arrives)."""
    viewer = await _thread_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    thread = await viewer.services.threads.get(viewer.principal, thread_id)
    return page(
        request,
        "thread_state.html",
        session=viewer.session,
        **await _state_context(viewer, thread),
    )


@router.post("/app/threads/{thread_id}/messages")
async def post_message(request: Request, thread_id: str) -> Response:
    """Post a message (fields ``content``, for an org key ``user_id`` — the person it posts
    as — and optionally ``audience``, repeated) through the API's post path; a refusal is shown
    next to the form with the text kept. (The script posts over the WebSocket instead, and
    falls back to this form when it is not connected.)"""
    viewer = await _thread_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    await s.threads.get(p, thread_id)  # out of scope: the not-found page
    content = form.get("content", "")
    user_id = (form.get("user_id") or None) if p.kind == "org" else None
    audience = [a for a in await form_list(request, "audience") if a] or None
    try:
        check_credential_may(p, "POST", f"/api/v1/threads/{thread_id}/messages")
        if not content.strip():
            raise InvalidRequestError("write a message first")
        if p.kind == "org" and user_id is None:
            raise InvalidRequestError("choose the person to post as")
        await s.threads.post(p, thread_id, content, user_id=user_id, audience=audience)
    except AgentNetworkError as exc:
        return await thread_view(
            request,
            viewer,
            thread_id,
            None,
            status=exc.status,
            post_error=exc.message,
            draft=content,
        )
    return redirect(request, f"/app/threads/{thread_id}#post")


@router.post("/app/threads/{thread_id}/{action}")
async def thread_action(request: Request, thread_id: str, action: str) -> Response:
    """``ack`` / ``reject`` (field ``member``: ``kind:id`` of the invitee answering, and for
    reject an optional ``reason``), ``close`` (optional ``reason``) or ``verify`` (recompute
    the hash chain). The same services calls as the API; an error is shown next to the
    button that caused it."""
    if action not in ("ack", "reject", "close", "verify"):
        return not_found(request)
    viewer = await _thread_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    await s.threads.get(p, thread_id)  # out of scope: the not-found page
    method = "GET" if action == "verify" else "POST"
    member = form.get("member", "")
    try:
        check_credential_may(p, method, f"/api/v1/threads/{thread_id}/{action}")
        reason = form.get("reason", "").strip() or None
        if action == "verify":
            report = await s.threads.verify(p, thread_id)
            verified = {
                "ok": report.ok,
                "checked": report.checked,
                "first_bad_seq": report.first_bad_seq,
                "reason": report.reason,
            }
            return await _state_answer(request, viewer, thread_id, verified=verified)
        if action == "close":
            await s.threads.close(p, thread_id, reason=reason)
        else:
            kind, _, member_id = member.partition(":")
            if kind not in ("agent", "user") or not member_id:
                raise InvalidRequestError("choose whom to answer the invitation as")
            ids = {"agent_id": member_id} if kind == "agent" else {"user_id": member_id}
            if p.kind != "org":
                ids = {}  # a token answers as itself
            if action == "ack":
                await s.threads.ack(p, thread_id, **ids)
            else:
                await s.threads.reject(p, thread_id, reason=reason, **ids)
    except AgentNetworkError as exc:
        where = f"{action}:{member}" if action in ("ack", "reject") else action
        return await _state_answer(
            request,
            viewer,
            thread_id,
            status=exc.status,
            action_error={"action": where, "message": exc.message},
        )
    return await _state_answer(request, viewer, thread_id)


@router.post("/app/ws-ticket")
async def ws_ticket(request: Request) -> Response:
    """A single-use WebSocket ticket for the session's credential (valid 30 s, refused after
    sign-out): JSON ``{"ticket", "url"}``; the page sends ``{"type": "auth", "token":
    ticket}`` as the socket's first frame. Needs the session and its CSRF token (header
    ``X-CSRF-Token``)."""
    viewer = await _thread_viewer(request)
    if isinstance(viewer, Response):
        return JSONResponse({"error": "sign in first"}, status_code=401, headers=SECURITY_HEADERS)
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    realtime: RealtimeProtocol = request.app.state.realtime
    store: SessionStore = request.app.state.web_sessions
    session_id = viewer.session.id
    ticket = realtime.tickets.issue(
        viewer.session.secret, lambda: store.get(session_id) is not None
    )
    return JSONResponse({"ticket": ticket, "url": WS_URL}, headers=SECURITY_HEADERS)
