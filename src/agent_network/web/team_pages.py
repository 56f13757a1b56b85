"""Teams and networks under ``/app/teams`` and ``/app/networks``: create, members with roles,
threads (open ones, and protocol threads: adapter, participants and knobs); for networks also
invites (a join code shown once, with a copy button, expiry and
uses), joining with a code (choosing which agents and people to attach), visas (revoke) and
closing. Every action is the same services call as its API route, after the API's credential
rule; a refusal is shown next to the field or button that caused it. Design: docs/webapp.md.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from agent_network.api.deps import check_credential_may
from agent_network.api.schemas import ThreadCreate
from agent_network.errors import AgentNetworkError, InvalidRequestError, NotFoundError
from agent_network.protocol.adapters import adapter_names
from agent_network.protocol.adapters.graph import TransitionGraph
from agent_network.web.pages import (
    PageRoute,
    Viewer,
    _checked_form,
    _section,
    _to_login,
    not_found,
    viewer_of,
)
from agent_network.web.rendering import form_list, page, redirect

router = APIRouter(route_class=PageRoute, include_in_schema=False)

Kind = Literal["team", "network"]
KINDS: dict[str, Kind] = {"teams": "team", "networks": "network"}
ROLES = ("member", "admin", "owner")
MAX_INVITE_HOURS = 90 * 24
ROUND_ROBIN = "round_robin"
ADAPTER_LABELS = {
    "open": "open: any member, any time",
    "conversation": "conversation: two participants, free turns",
    "consulting": "consulting: one question, one reply, then it closes",
    "discussion": "discussion: participants speak in turn",
    ROUND_ROBIN: "round robin (workflow): in turn, closes after N messages",
    "workflow": "workflow: who speaks next follows a transition graph (JSON)",
}
THREAD_FIELDS = (
    "title",
    "adapter",
    "initiator",
    "visibility",
    "agent_budget",
    "ttl",
    "ack_timeout",
    "max_turns",
    "graph",
    "expectations",
    "no_acks",
)


class ThreadFieldError(InvalidRequestError):
    """A protocol-thread form value the API would refuse, with the field it belongs to."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def adapter_choices() -> dict[str, str]:
    """The adapters the thread form offers (value -> label): the built-in ones with their
    meaning, round robin (a workflow made from the participants), then any custom adapter."""
    names = [n for n in adapter_names() if n not in ADAPTER_LABELS]
    return {**ADAPTER_LABELS, **{n: f"{n} (custom adapter)" for n in sorted(names)}}


def _number(field: str, text: str, *, whole: bool = False) -> float | int | None:
    if not text.strip():
        return None
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ThreadFieldError(field, f"{field}: {kind}, or empty") from None


def _json_field(field: str, text: str, kind: type) -> Any:
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ThreadFieldError(field, f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        what = "an object" if kind is dict else "a list"
        raise ThreadFieldError(field, f"{field} must be a JSON {what}")
    return value


def _pair(field: str, text: str) -> dict[str, str]:
    kind, _, ident = text.partition(":")
    if kind not in ("agent", "user") or not ident:
        raise ThreadFieldError(field, "choose an agent or a person")
    return {"kind": kind, "id": ident}


def thread_request(form: dict[str, str], chosen: list[str]) -> ThreadCreate:
    """The ``POST /{teams|networks}/{id}/threads`` body of the thread form: ``title``,
    ``adapter`` (or ``round_robin``: a workflow whose graph is
    ``TransitionGraph.round_robin`` over the participants, initiator first, closing after
    ``max_turns`` messages), ``chosen`` participants (``kind:id``), ``initiator``
    (``kind:id``, default the first participant), ``visibility``, ``agent_budget``, ``ttl``
    and ``ack_timeout`` (seconds), ``graph`` (workflow, JSON object), ``expectations`` (JSON
    list) and ``no_acks`` (nobody must ack: ``invitees=[]``). Validated by the API's
    ``ThreadCreate``; ThreadFieldError names the field of the first problem."""
    adapter = form.get("adapter", "open") or "open"
    participants = [_pair("participants", c) for c in chosen]
    initiator = _pair("initiator", form["initiator"]) if form.get("initiator") else None
    data: dict[str, Any] = {
        "title": form.get("title", "").strip(),
        "adapter": "workflow" if adapter == ROUND_ROBIN else adapter,
        "visibility": form.get("visibility") or "members",
        "participants": participants,
        "agent_budget": _number("agent_budget", form.get("agent_budget", ""), whole=True),
        "ttl": _number("ttl", form.get("ttl", "")),
        "ack_timeout": _number("ack_timeout", form.get("ack_timeout", "")),
        "expectations": _json_field("expectations", form.get("expectations", ""), list) or [],
    }
    if initiator is not None:
        data["initiator"] = initiator
    if form.get("no_acks"):
        data["invitees"] = []
    if adapter == ROUND_ROBIN:
        turns = _number("max_turns", form.get("max_turns", ""), whole=True)
        if not isinstance(turns, int) or turns < 1:
            raise ThreadFieldError("max_turns", "a round robin needs max turns (1 or more)")
        ids = [p["id"] for p in participants]
        lead = initiator["id"] if initiator else (ids[0] if ids else None)
        speakers = ([lead] if lead else []) + [i for i in ids if i != lead]
        if len(speakers) < 2:
            raise ThreadFieldError("participants", "a round robin needs two participants or more")
        data["graph"] = TransitionGraph.round_robin(speakers, max_turns=turns).to_dict()
    elif adapter == "workflow":
        data["graph"] = _json_field("graph", form.get("graph", ""), dict)
        if data["graph"] is None:
            raise ThreadFieldError("graph", "a workflow needs its transition graph (JSON)")
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return ThreadCreate.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"]]
        field = loc[0] if loc and loc[0] in (*THREAD_FIELDS, "participants") else "thread"
        raise ThreadFieldError(field, f"{'.'.join(loc) or 'thread'}: {first['msg']}") from None


def _thread_error_field(exc: AgentNetworkError) -> str:
    """The form field a refusal of a protocol thread is about (by the knob it names)."""
    if isinstance(exc, ThreadFieldError):
        return exc.field
    text = exc.message.lower()
    for word, field in ERROR_WORDS:
        if word in text:
            return field
    return "thread"


ERROR_WORDS = (
    ("participants", "participants"),
    ("initiator", "initiator"),
    ("invitee", "no_acks"),
    ("participant", "participants"),
    ("graph", "graph"),
    ("ack_timeout", "ack_timeout"),
    ("ttl", "ttl"),
    ("expectation", "expectations"),
    ("budget", "agent_budget"),
    ("order", "adapter"),
    ("title", "title"),
    ("adapter", "adapter"),
)
"""(word in a refusal, form field it is shown next to), first match wins."""


async def _org_viewer(request: Request) -> Viewer | Response:
    viewer = await viewer_of(request)
    if viewer is None:
        return _to_login(request)
    if viewer.principal.kind == "admin":
        return not_found(request)
    return viewer


def _kinds_of(request: Request) -> str:
    """``teams`` or ``networks``: the second segment of the page's path."""
    return request.url.path.split("/")[2]


def _kind(kinds: str) -> Kind:
    kind = KINDS.get(kinds)
    if kind is None:
        raise NotFoundError("page", kinds)
    return kind


def _api(kinds: str, rest: str = "") -> str:
    return f"/api/v1/{kinds}{rest}"


def _check(viewer: Viewer, method: str, path: str) -> None:
    """The API's credential rule for the equivalent API call (PermissionDeniedError)."""
    check_credential_may(viewer.principal, method, path)


async def _own_people_and_agents(viewer: Viewer) -> tuple[list[Any], list[Any]]:
    p, s = viewer.principal, viewer.services
    agents, _ = await _section(viewer, "/api/v1/agents", lambda: s.agents.list_agents(p))
    people, _ = await _section(viewer, "/api/v1/users", lambda: s.orgs.list_users(p))
    return agents, people


# ---------------------------------------------------------------------- lists


async def _list_page(
    request: Request, viewer: Viewer, kinds: str, *, status: int = 200, **errors: Any
) -> Response:
    kind = _kind(kinds)
    p, s = viewer.principal, viewer.services
    items, items_error = await _section(viewer, _api(kinds), lambda: s.teams.list_teams(p, kind))
    agents, people = await _own_people_and_agents(viewer) if kind == "network" else ([], [])
    errors.setdefault("name_error", None)
    errors.setdefault("join_error", None)
    errors.setdefault("draft", {})
    return page(
        request,
        "teams.html",
        session=viewer.session,
        status=status,
        kind=kind,
        kinds=kinds,
        items=items,
        items_error=items_error,
        org_id=p.org_id,
        agents=agents,
        people=people,
        **errors,
    )


@router.get("/app/teams")
@router.get("/app/networks")
async def list_page(request: Request) -> Response:
    """Teams (or networks) the credential sees, a form to create one and, for networks, a form
    to join one with a code."""
    kinds = _kinds_of(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _list_page(request, viewer, kinds)


@router.post("/app/teams")
@router.post("/app/networks")
async def create(request: Request) -> Response:
    """Create a team or network (fields ``name``, ``description``) hosted by the org."""
    kinds = _kinds_of(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    name = form.get("name", "")
    try:
        _check(viewer, "POST", _api(kinds))
        made = await viewer.services.teams.create(
            viewer.principal, _kind(kinds), name, form.get("description", "")
        )
    except AgentNetworkError as exc:
        return await _list_page(
            request,
            viewer,
            kinds,
            status=exc.status,
            name_error=exc.message,
            draft={"name": name},
        )
    return redirect(request, f"/app/{kinds}/{made['id']}")


@router.post("/app/networks/join")
async def join(request: Request) -> Response:
    """Join a network with a code (field ``code``), attaching the chosen ``agent_ids`` and
    ``user_ids`` (repeated fields); a refusal is shown next to the code."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    code = form.get("code", "").strip()
    try:
        _check(viewer, "POST", "/api/v1/networks/join")
        if not code:
            raise InvalidRequestError("enter the join code you were given")
        joined = await viewer.services.teams.join(
            viewer.principal,
            code,
            agent_ids=await form_list(request, "agent_ids"),
            user_ids=await form_list(request, "user_ids"),
            client=request.client.host if request.client else None,
        )
    except AgentNetworkError as exc:
        return await _list_page(
            request, viewer, "networks", status=exc.status, join_error=exc.message
        )
    return redirect(request, f"/app/networks/{joined['network']['id']}")


# ---------------------------------------------------------------------- one team or network


async def _detail(
    request: Request,
    viewer: Viewer,
    kinds: str,
    team_id: str,
    *,
    status: int = 200,
    invite: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    thread_draft: dict[str, Any] | None = None,
) -> Response:
    kind = _kind(kinds)
    p, s = viewer.principal, viewer.services
    team = await s.teams.get(p, kind, team_id)
    hosted = team["org_id"] == p.org_id
    members, members_error = await _section(
        viewer, _api(kinds, f"/{team_id}/members"), lambda: s.teams.list_members(p, kind, team_id)
    )
    threads, threads_error = await _section(
        viewer, _api(kinds, f"/{team_id}/threads"), lambda: s.threads.list_threads(p, team_id)
    )
    invites: list[dict[str, Any]] = []
    visas: list[dict[str, Any]] = []
    invites_error = visas_error = None
    if kind == "network":
        if hosted:
            invites, invites_error = await _section(
                viewer,
                _api(kinds, f"/{team_id}/invites"),
                lambda: s.teams.list_invites(p, team_id),
            )
        visas, visas_error = await _section(
            viewer, _api(kinds, f"/{team_id}/visas"), lambda: s.teams.list_visas(p, team_id)
        )
    agents, people = await _own_people_and_agents(viewer)
    present = {(m["kind"], m["id"]) for m in members}
    addable = [("agent", a) for a in agents if ("agent", a["id"]) not in present] + [
        ("user", u) for u in people if ("user", u["id"]) not in present
    ]
    return page(
        request,
        "team.html",
        session=viewer.session,
        status=status,
        kind=kind,
        kinds=kinds,
        team=team,
        hosted=hosted,
        org_id=p.org_id,
        members=members,
        members_error=members_error,
        threads=sorted(threads, key=lambda t: str(t["created_at"]), reverse=True),
        threads_error=threads_error,
        invites=invites,
        invites_error=invites_error,
        visas=visas,
        visas_error=visas_error,
        addable=addable,
        roles=ROLES,
        invite=invite,
        error=error or {},
        adapters=adapter_choices(),
        own_members=[m for m in members if m["org_id"] == p.org_id],
        thread_draft=thread_draft or {"chosen": []},
    )


@router.get("/app/teams/{team_id}")
@router.get("/app/networks/{team_id}")
async def detail(request: Request, team_id: str) -> Response:
    """One team or network: members with roles, threads; for a network its invites (host),
    visas and the close button. Not found when out of scope."""
    kinds = _kinds_of(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _detail(request, viewer, kinds, team_id)


@router.post("/app/teams/{team_id}/{action}")
@router.post("/app/networks/{team_id}/{action}")
async def act(request: Request, team_id: str, action: str) -> Response:
    """An action on a team or network, each the API call of the same name:
    ``members`` (add ``member`` = ``kind:id`` with ``role``), ``role`` (``member``, ``role``),
    ``remove`` (``member``), ``threads`` (open a thread: ``title``), and for networks
    ``invites`` (``hours``, ``max_uses``), ``revoke-invite`` (``invite_id``), ``revoke-visa``
    (``visa_id``), ``leave`` and ``close``. A refusal is shown next to its form."""
    kinds = _kinds_of(request)
    if action not in ACTIONS:
        return not_found(request)
    kind = _kind(kinds)
    if action in NETWORK_ONLY and kind != "network":
        return not_found(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    await s.teams.get(p, kind, team_id)  # out of scope: the not-found page
    method, api_path = ACTIONS[action]
    try:
        _check(viewer, method, _api(kinds, f"/{team_id}{api_path}"))
        if action == "threads" and form.get("protocol"):
            return await _protocol_thread(request, viewer, kinds, team_id, form)
        if action == "threads":
            made = await s.threads.create(p, team_id, form.get("title", "").strip(), kind=kind)
            return redirect(request, f"/app/threads/{made['id']}")
        if action == "invites":
            invite = await s.teams.create_invite(
                p,
                team_id,
                expires_in=_hours(form.get("hours", "")) * 3600,
                max_uses=_uses(form.get("max_uses", "")),
            )
            return await _detail(request, viewer, kinds, team_id, status=201, invite=invite)
        await _do(viewer, kind, team_id, action, form)
    except AgentNetworkError as exc:
        return await _detail(
            request,
            viewer,
            kinds,
            team_id,
            status=exc.status,
            error={"action": action, "key": _error_key(action, form), "message": exc.message},
        )
    if action == "leave":
        return redirect(request, f"/app/{kinds}")
    return redirect(request, f"/app/{kinds}/{team_id}")


async def _protocol_thread(
    request: Request, viewer: Viewer, kinds: str, team_id: str, form: dict[str, str]
) -> Response:
    """Open a thread from the protocol form (:func:`thread_request`); a refusal is shown next
    to the field it is about, with the form as it was sent."""
    chosen = await form_list(request, "participants")
    try:
        body = thread_request(form, chosen)
        made = await viewer.services.threads.create(
            viewer.principal,
            team_id,
            body.title,
            kind=_kind(kinds),
            agent_budget=body.agent_budget,
            visibility=body.visibility,
            participants=body.participant_pairs(),
            **body.protocol(),
        )
    except AgentNetworkError as exc:
        draft = {k: form.get(k, "") for k in THREAD_FIELDS}
        return await _detail(
            request,
            viewer,
            kinds,
            team_id,
            status=exc.status,
            error={"action": "protocol", "key": _thread_error_field(exc), "message": exc.message},
            thread_draft={**draft, "chosen": chosen},
        )
    return redirect(request, f"/app/threads/{made['id']}")


ACTIONS: dict[str, tuple[str, str]] = {
    "members": ("POST", "/members"),
    "role": ("PATCH", "/members/x/y"),
    "remove": ("DELETE", "/members/x/y"),
    "threads": ("POST", "/threads"),
    "invites": ("POST", "/invites"),
    "revoke-invite": ("DELETE", "/invites/x"),
    "revoke-visa": ("DELETE", "/visas/x"),
    "leave": ("POST", "/leave"),
    "close": ("POST", "/close"),
}
NETWORK_ONLY = {"invites", "revoke-invite", "revoke-visa", "leave", "close"}


def _error_key(action: str, form: dict[str, str]) -> str:
    """Which row's form an error belongs to (the member, invite or visa), so it is shown there."""
    return form.get("member") or form.get("invite_id") or form.get("visa_id") or action


def _member(form: dict[str, str]) -> tuple[str, str]:
    kind, _, member_id = form.get("member", "").partition(":")
    if kind not in ("agent", "user") or not member_id:
        raise InvalidRequestError("choose an agent or a person")
    return kind, member_id


def _hours(text: str) -> float:
    try:
        hours = float(text or "168")
    except ValueError:
        raise InvalidRequestError("expiry must be a number of hours") from None
    if not 0 < hours <= MAX_INVITE_HOURS:
        raise InvalidRequestError(f"expiry must be between 1 minute and {MAX_INVITE_HOURS} hours")
    return hours


def _uses(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        uses = int(text)
    except ValueError:
        raise InvalidRequestError("uses must be a whole number (or empty for unlimited)") from None
    return uses


async def _do(viewer: Viewer, kind: Kind, team_id: str, action: str, form: dict[str, str]) -> None:
    p, s = viewer.principal, viewer.services
    if action == "members":
        member_kind, member_id = _member(form)
        ids = {"agent_id": member_id} if member_kind == "agent" else {"user_id": member_id}
        await s.teams.add_member(p, kind, team_id, role=form.get("role", "member"), **ids)
    elif action == "role":
        member_kind, member_id = _member(form)
        await s.teams.set_role(p, kind, team_id, member_kind, member_id, form.get("role", ""))
    elif action == "remove":
        member_kind, member_id = _member(form)
        await s.teams.remove_member(p, kind, team_id, member_kind, member_id)
    elif action == "revoke-invite":
        await s.teams.revoke_invite(p, team_id, form.get("invite_id", ""))
    elif action == "revoke-visa":
        await s.teams.revoke_visa(p, team_id, form.get("visa_id", ""))
    elif action == "leave":
        await s.teams.leave(p, team_id)
    elif action == "close":
        await s.teams.close_network(p, team_id)
