"""Credentials under ``/app/credentials``: the org's org keys, user tokens and agent tokens
(live, expired and revoked; never a secret), issuing one (its secret shown once, with a copy
button), rotating one (a new secret, the old one revoked in the same transaction), renewing
one (a new expiry) and revoking one. Each is the same services call as its API route
(``GET/POST /credentials``, ``POST /credentials/{id}/rotate|renew``,
``DELETE /credentials/{id}``) after the API's credential
rule: only an org key manages credentials, so a user token sees why instead of the list.
Design: docs/webapp.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from agent_network.api.deps import check_credential_may
from agent_network.api.schemas import CredentialCreate
from agent_network.errors import AgentNetworkError, NotFoundError
from agent_network.web.agent_pages import FieldError, _org_viewer, _validated
from agent_network.web.pages import PageRoute, Viewer, _checked_form, _section, not_found
from agent_network.web.rendering import page, redirect

router = APIRouter(route_class=PageRoute, include_in_schema=False)

KINDS = {
    "user_token": "user token (a person signs in: web app, SDK, CLI)",
    "agent_token": "agent token (a runner acts as the agent)",
    "org_key": "org key (everything the org may do)",
}
WANTS = {
    "user_token": ("usr_", "a person: choose one"),
    "agent_token": ("agt_", "an agent: choose one"),
}
MAX_HOURS = 10 * 365 * 24
API = "/api/v1/credentials"


def _state(row: dict[str, Any], now: datetime) -> str:
    """``live``, ``revoked`` or ``expired``."""
    if row.get("revoked_at"):
        return "revoked"
    expires = row.get("expires_at")
    if expires and datetime.fromisoformat(str(expires)) <= now:
        return "expired"
    return "live"


def _hours(text: str) -> float | None:
    """Seconds of an "expires after (hours)" field; None when empty (never expires)."""
    if not text.strip():
        return None
    try:
        hours = float(text)
    except ValueError:
        raise FieldError("expires_in", "expiry must be a number of hours (empty: never)") from None
    if not 0 < hours <= MAX_HOURS:
        raise FieldError("expires_in", f"expiry must be between 1 second and {MAX_HOURS} hours")
    return max(hours * 3600, 1.0)


async def _page(
    request: Request,
    viewer: Viewer,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    issued: dict[str, Any] | None = None,
    draft: dict[str, str] | None = None,
) -> Response:
    p, s = viewer.principal, viewer.services
    rows, rows_error = await _section(viewer, API, lambda: s.credentials.list_credentials(p))
    agents, _ = await _section(viewer, "/api/v1/agents", lambda: s.agents.list_agents(p))
    people, _ = await _section(viewer, "/api/v1/users", lambda: s.orgs.list_users(p))
    names = {a["id"]: f"{a['name']} (agent)" for a in agents}
    names.update({u["id"]: f"{u['name']} (person)" for u in people})
    names[p.org_id or ""] = "the org"
    now = datetime.now(UTC)
    shown = [
        {**row, "state": _state(row, now), "subject": names.get(row.get("subject_id") or "", "")}
        for row in reversed(rows)  # newest first
    ]
    return page(
        request,
        "credentials.html",
        session=viewer.session,
        status=status,
        credentials=shown,
        credentials_error=rows_error,
        kinds=KINDS,
        agents=agents,
        people=people,
        current=p.key_id,
        errors=errors or {},
        issued=issued,
        draft=draft or {},
        may_write=viewer.may("POST", API),
    )


@router.get("/app/credentials")
async def credentials_page(request: Request) -> Response:
    """The org's credentials (newest first, with their state), a form to issue one, and a
    rotate and a revoke button per live one."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _page(request, viewer)


@router.post("/app/credentials")
async def issue(request: Request) -> Response:
    """Issue a credential: ``kind`` (org_key, user_token, agent_token), ``subject_id`` (the
    person or agent of a token), ``name``, ``read_only`` (checkbox) and ``expires_hours``
    (empty: never), validated by the API's ``CredentialCreate``. The secret is shown once on
    the answer page (201); a refusal next to its field."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    kind = form.get("kind", "")
    try:
        check_credential_may(viewer.principal, "POST", API)
        subject = form.get("subject_id", "").strip() or None
        if kind == "org_key":
            subject = None  # an org key acts for the org: the subject field does not apply
        elif kind in WANTS and (subject is None or not subject.startswith(WANTS[kind][0])):
            raise FieldError("subject_id", f"a {kind.replace('_', ' ')} acts as {WANTS[kind][1]}")
        body = _validated(
            CredentialCreate,
            {
                "kind": kind,
                "subject_id": subject,
                "name": form.get("name", "").strip(),
                "scopes": ["read"] if form.get("read_only") else ["read", "write"],
                "expires_in": _hours(form.get("expires_hours", "")),
            },
        )
        try:
            made = await viewer.services.credentials.issue(viewer.principal, **body)
        except NotFoundError:
            raise FieldError("subject_id", "no such person or agent in your org") from None
    except AgentNetworkError as exc:
        field = exc.field if isinstance(exc, FieldError) else "issue"
        if field == "expires_in":
            field = "expires_hours"
        return await _page(
            request, viewer, status=exc.status, errors={field: exc.message}, draft=form
        )
    return await _page(request, viewer, status=201, issued={**made, "action": "issued"})


@router.post("/app/credentials/{credential_id}/{action}")
async def act(request: Request, credential_id: str, action: str) -> Response:
    """``rotate`` (a new secret, shown once; the old credential revoked), ``renew`` (field
    ``hours``: it expires that many hours from now) or ``revoke``; a refusal is shown next to
    the row's buttons. Another org's credential: the not-found
    page."""
    if action not in ("rotate", "renew", "revoke"):
        return not_found(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    try:
        if action == "rotate":
            check_credential_may(p, "POST", f"{API}/{credential_id}/rotate")
            made = await s.credentials.rotate(p, credential_id)
        elif action == "renew":
            check_credential_may(p, "POST", f"{API}/{credential_id}/renew")
            try:
                seconds = _hours(form.get("hours", ""))
            except FieldError:
                seconds = None
            if seconds is None:
                raise FieldError(
                    "hours", f"renew: give the hours until it expires (at most {MAX_HOURS})"
                )
            await s.credentials.renew(p, credential_id, seconds)
            return redirect(request, "/app/credentials")
        else:
            check_credential_may(p, "DELETE", f"{API}/{credential_id}")
            await s.credentials.revoke(p, credential_id)
    except NotFoundError:
        raise  # another org's credential, or none: the not-found page
    except AgentNetworkError as exc:
        return await _page(
            request, viewer, status=exc.status, errors={f"row:{credential_id}": exc.message}
        )
    if action == "revoke":
        if credential_id == p.key_id:
            # the key this session signed in with is gone: the next page asks to sign in
            return redirect(request, "/app/login")
        return redirect(request, "/app/credentials")
    replaced = {**made, "action": "rotated", "old_id": credential_id}
    return await _page(request, viewer, status=201, issued=replaced)
