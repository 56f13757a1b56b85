"""People under ``/app/people``: the org's people, adding one (with ``auto_ack``), turning a
person's ``auto_ack`` on or off, deleting one, and issuing a person a sign-in token (a user
token, shown once, with a copy button and a sign-in link whose key travels in the URL fragment,
which browsers never send to a server). Each is the same services call as its API route
(``POST /users``, ``PATCH``/``DELETE /users/{id}``, ``POST /credentials``).
Design: docs/webapp.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from agent_network.api.deps import check_credential_may
from agent_network.api.schemas import UserCreate
from agent_network.errors import AgentNetworkError
from agent_network.web.agent_pages import _field_of, _org_viewer, _validated
from agent_network.web.pages import PageRoute, Viewer, _checked_form, _section, not_found
from agent_network.web.rendering import page, redirect

router = APIRouter(route_class=PageRoute, include_in_schema=False)


async def _people(
    request: Request,
    viewer: Viewer,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    issued: dict[str, Any] | None = None,
) -> Response:
    p, s = viewer.principal, viewer.services
    people, people_error = await _section(viewer, "/api/v1/users", lambda: s.orgs.list_users(p))
    return page(
        request,
        "people.html",
        session=viewer.session,
        status=status,
        people=people,
        people_error=people_error,
        errors=errors or {},
        issued=issued,
        can_issue=viewer.may("POST", "/api/v1/credentials") and p.kind == "org",
    )


@router.get("/app/people")
async def people_page(request: Request) -> Response:
    """The org's people, a form to add one and a button per person to issue a sign-in token."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _people(request, viewer)


@router.post("/app/people")
async def add_person(request: Request) -> Response:
    """Add a person (fields ``name``, ``email``; as ``POST /users``)."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    try:
        check_credential_may(viewer.principal, "POST", "/api/v1/users")
        body = _validated(
            UserCreate,
            {
                "name": form.get("name", ""),
                "email": form.get("email") or None,
                "auto_ack": bool(form.get("auto_ack")),
            },
        )
        await viewer.services.orgs.create_user(
            viewer.principal, body["name"], body.get("email"), auto_ack=body.get("auto_ack", False)
        )
    except AgentNetworkError as exc:
        return await _people(
            request, viewer, status=exc.status, errors={_field_of(exc): exc.message}
        )
    return redirect(request, "/app/people")


@router.post("/app/people/{user_id}/token")
async def issue_token(request: Request, user_id: str) -> Response:
    """Issue a user token for the person (as ``POST /credentials`` with ``user_token``); the
    secret is shown once on the answer page."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    person = await s.orgs.get_user(p, user_id)  # out of scope: the not-found page
    try:
        check_credential_may(p, "POST", "/api/v1/credentials")
        made = await s.credentials.issue(
            p, kind="user_token", subject_id=user_id, name=f"web sign-in for {person['name']}"
        )
    except AgentNetworkError as exc:
        return await _people(
            request, viewer, status=exc.status, errors={f"token:{user_id}": exc.message}
        )
    issued = {"person": person, "secret": made["secret"]}
    return await _people(request, viewer, status=201, issued=issued)


@router.post("/app/people/{user_id}/{action}")
async def person_action(request: Request, user_id: str, action: str) -> Response:
    """``auto-ack`` (field ``on``: ``1`` turns the person's ``auto_ack`` on, else off; as
    ``PATCH /users/{id}``) or ``delete`` (as ``DELETE /users/{id}``: their past messages stay
    in the threads). A refusal is shown next to the person's row; another org's person is the
    not-found page."""
    if action not in ("auto-ack", "delete"):
        return not_found(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    await s.orgs.get_user(p, user_id)  # out of scope: the not-found page
    try:
        if action == "auto-ack":
            check_credential_may(p, "PATCH", f"/api/v1/users/{user_id}")
            await s.orgs.update_user(p, user_id, {"auto_ack": form.get("on") == "1"})
        else:
            check_credential_may(p, "DELETE", f"/api/v1/users/{user_id}")
            await s.orgs.delete_user(p, user_id)
    except AgentNetworkError as exc:
        return await _people(
            request, viewer, status=exc.status, errors={f"token:{user_id}": exc.message}
        )
    return redirect(request, "/app/people")
