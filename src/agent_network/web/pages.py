"""The web app's pages under ``/app``: sign-in, org home, thread history, platform admin.

Every page authenticates the session's credential through the same service the API uses
(``OrgService.authenticate``) and asks the API's one rule, ``check_credential_may``, whether
that credential may make the equivalent API call; ids are scoped by the services, so a page
about something out of scope is the same "not found" page as one about a missing id.
Design: docs/webapp.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from agent_network.api.deps import check_credential_may
from agent_network.errors import (
    AgentNetworkError,
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
)
from agent_network.services import Services
from agent_network.services.principal import Principal
from agent_network.web.rendering import BadForm, page, read_form, redirect, sent_csrf
from agent_network.web.sessions import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    SessionStore,
    WebSession,
    new_token,
    same_token,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

RECENT_THREADS = 20
LOGIN = "/app/login"
HOME = "/app/"
ADMIN = "/app/admin"


class PageRoute(APIRoute):
    """A route whose failures are pages: out of scope or missing -> the not-found page (404),
    a refused call -> an error page with the API's message and status, anything unexpected ->
    a plain 500 page (logged here; never a traceback in the browser)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except NotFoundError:
                return not_found(request)
            except RequestValidationError:
                return not_found(request)
            except BadForm as exc:
                return page(request, "error.html", status=400, title="Bad form", message=str(exc))
            except AgentNetworkError as exc:
                return page(
                    request, "error.html", status=exc.status, title="Refused", message=exc.message
                )
            except Exception:
                log.exception("web page %s %s failed", request.method, request.url.path)
                return page(
                    request,
                    "error.html",
                    status=500,
                    title="Something went wrong",
                    message="The server could not show this page. Try again in a moment.",
                )

        return wrapped


router = APIRouter(route_class=PageRoute, include_in_schema=False)


def not_found(request: Request) -> Response:
    """The one "not found" page: for a missing id, an id out of scope and an unknown URL."""
    return page(request, "not_found.html", status=404)


def sessions_of(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.web_sessions
    return store


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@dataclass
class Viewer:
    """The signed-in person of a request: their session, principal and the services."""

    session: WebSession
    principal: Principal
    services: Services

    def may(self, method: str, api_path: str) -> bool:
        """Whether this credential may make the API call ``method api_path`` at all."""
        try:
            check_credential_may(self.principal, method, api_path)
        except PermissionDeniedError:
            return False
        return True


async def viewer_of(request: Request) -> Viewer | None:
    """The request's signed-in viewer, or None: no cookie, an unknown or ended session, or a
    credential that no longer authenticates (revoked, expired, subject deleted), which also
    ends the session."""
    store = sessions_of(request)
    session = store.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    services = services_of(request)
    try:
        principal = await services.orgs.authenticate(session.secret)
    except AuthenticationError:
        store.drop(session.id)
        return None
    return Viewer(session, principal, services)


def _to_login(request: Request) -> Response:
    response = redirect(request, LOGIN)
    response.delete_cookie(SESSION_COOKIE, path="/app")
    return response


async def _form_with_csrf(
    request: Request, expected: str | None, session: WebSession | None
) -> dict[str, str] | Response:
    """The form of a state-changing request, or the 403 page when it does not carry the
    ``expected`` CSRF token (checked first: a body that is not a form the app sends counts as
    one without a token); BadForm (400) for a bad body that carries the right token."""
    try:
        form, bad = await read_form(request), None
    except BadForm as exc:
        form, bad = {}, exc
    if not same_token(expected, sent_csrf(request, form)):
        return csrf_refused(request, session)
    if bad is not None:
        raise bad
    return form


async def _checked_form(request: Request, viewer: Viewer) -> dict[str, str] | Response:
    """:func:`_form_with_csrf` with the viewer's session token."""
    return await _form_with_csrf(request, viewer.session.csrf, viewer.session)


def csrf_refused(request: Request, session: WebSession | None) -> Response:
    """403: a form or htmx request without this session's CSRF token."""
    return page(
        request,
        "error.html",
        session=session,
        status=403,
        title="Form refused",
        message=(
            "This form was not sent from this app's page (its security token is missing or "
            "out of date). Reload the page and try again."
        ),
    )


async def _section(
    viewer: Viewer, api_path: str, load: Callable[[], Awaitable[list[T]]]
) -> tuple[list[T], str | None]:
    """One list of a page: its items, or an explanation of why this credential cannot see it
    (the API's own message) shown in its place."""
    if not viewer.may("GET", api_path):
        return [], f"{viewer.principal.credential_name} cannot list these; use an org key"
    try:
        return await load(), None
    except AgentNetworkError as exc:
        return [], exc.message


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


# ---------------------------------------------------------------------- sign-in


@router.get("/app/login")
async def login_form(request: Request) -> Response:
    """The sign-in form (a fresh login CSRF token in a cookie and a hidden field)."""
    if await viewer_of(request) is not None:
        return redirect(request, HOME)
    return _login_page(request, signed_out=request.query_params.get("signed_out") == "1")


def _login_page(
    request: Request, *, error: str | None = None, status: int = 200, signed_out: bool = False
) -> Response:
    token = new_token()
    response = page(
        request, "login.html", status=status, login_csrf=token, error=error, signed_out=signed_out
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        path="/app/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        max_age=3600,
    )
    return response


@router.post("/app/login")
async def login(request: Request) -> Response:
    """Sign in with an org key, a user token or the platform admin key (field ``key``)."""
    form = await _form_with_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE), None)
    if isinstance(form, Response):
        return form
    key = form.get("key", "").strip()
    if not key:
        return _login_page(request, error="Enter a key or token.", status=422)
    try:
        principal = await services_of(request).orgs.authenticate(key)
    except AuthenticationError as exc:
        return _login_page(request, error=exc.message, status=401)
    if principal.kind == "agent":
        return _login_page(
            request,
            error="An agent token is for runners; sign in with an org key or a user token.",
            status=403,
        )
    store = sessions_of(request)
    store.drop(request.cookies.get(SESSION_COOKIE))
    session = store.create(key, principal.kind)
    response = redirect(request, ADMIN if principal.kind == "admin" else HOME)
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        path="/app",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/app/login")
    return response


@router.post("/app/logout")
async def logout(request: Request) -> Response:
    """Sign out: the session record is dropped, so its cookie no longer works anywhere."""
    store = sessions_of(request)
    session = store.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return _to_login(request)
    form = await _form_with_csrf(request, session.csrf, session)
    if isinstance(form, Response):
        return form
    store.drop(session.id)
    response = redirect(request, LOGIN + "?signed_out=1")
    response.delete_cookie(SESSION_COOKIE, path="/app")
    return response


# ---------------------------------------------------------------------- org pages


@router.get("/app")
@router.get("/app/")
async def home(request: Request) -> Response:
    """The org home: agents, people, teams, networks and recent threads (each list as far as
    the credential may read it)."""
    viewer = await viewer_of(request)
    if viewer is None:
        return _to_login(request)
    if viewer.principal.kind == "admin":
        return redirect(request, ADMIN)
    p, s = viewer.principal, viewer.services
    org = await s.orgs.get_org(p)
    agents, agents_error = await _section(viewer, "/api/v1/agents", lambda: s.agents.list_agents(p))
    people, people_error = await _section(viewer, "/api/v1/users", lambda: s.orgs.list_users(p))
    teams, teams_error = await _section(
        viewer, "/api/v1/teams", lambda: s.teams.list_teams(p, "team")
    )
    networks, networks_error = await _section(
        viewer, "/api/v1/networks", lambda: s.teams.list_teams(p, "network")
    )
    threads, threads_error = await _section(
        viewer, "/api/v1/threads", lambda: s.threads.list_threads(p)
    )
    recent = sorted(threads, key=lambda t: str(t["created_at"]), reverse=True)[:RECENT_THREADS]
    places = {t["id"]: t["name"] for t in [*teams, *networks]}
    return page(
        request,
        "home.html",
        session=viewer.session,
        org=org,
        agents=agents,
        agents_error=agents_error,
        people=people,
        people_error=people_error,
        teams=teams,
        teams_error=teams_error,
        networks=networks,
        networks_error=networks_error,
        threads=recent,
        threads_error=threads_error,
        places=places,
    )


# ---------------------------------------------------------------------- platform admin


async def _admin(request: Request) -> Viewer | Response:
    viewer = await viewer_of(request)
    if viewer is None:
        return _to_login(request)
    if viewer.principal.kind != "admin":
        return not_found(request)  # the admin pages do not exist for an org's credentials
    return viewer


async def _admin_page(
    request: Request, viewer: Viewer, *, status: int = 200, **context: Any
) -> Response:
    orgs = await viewer.services.orgs.list_orgs(viewer.principal)
    context.setdefault("created", None)
    context.setdefault("issued", None)
    context.setdefault("name_error", None)
    context.setdefault("key_error", None)
    return page(request, "admin.html", session=viewer.session, status=status, orgs=orgs, **context)


@router.get("/app/admin")
async def admin_home(request: Request) -> Response:
    """The platform admin's page: every org, a form to create one, and a button per org to
    issue it a new org key."""
    viewer = await _admin(request)
    if isinstance(viewer, Response):
        return viewer
    return await _admin_page(request, viewer)


@router.post("/app/admin/orgs")
async def admin_create_org(request: Request) -> Response:
    """Create an org (field ``name``); its first key is shown once on the answer page."""
    viewer = await _admin(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    try:
        created = await viewer.services.orgs.create_org(viewer.principal, form.get("name", ""))
    except AgentNetworkError as exc:
        return await _admin_page(request, viewer, status=exc.status, name_error=exc.message)
    return await _admin_page(request, viewer, status=201, created=created)


@router.post("/app/admin/orgs/{org_id}/keys")
async def admin_issue_key(request: Request, org_id: str) -> Response:
    """Issue a new org key for ``org_id``; shown once on the answer page."""
    viewer = await _admin(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    try:
        issued = await viewer.services.orgs.issue_org_key(viewer.principal, org_id)
    except NotFoundError:
        raise
    except AgentNetworkError as exc:
        return await _admin_page(
            request, viewer, status=exc.status, key_error={"org_id": org_id, "message": exc.message}
        )
    return await _admin_page(request, viewer, status=201, issued=issued)


# ---------------------------------------------------------------------- everything else


@router.api_route("/app/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown(request: Request, rest: str) -> Response:
    """Any other URL under /app: the not-found page."""
    return not_found(request)
