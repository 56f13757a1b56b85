"""Page rendering for the web app: the Jinja2 environment, security headers, form parsing."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agent_network import __version__
from agent_network.web.sessions import CSRF_FIELD, CSRF_HEADER, WebSession

# No inline script or style anywhere: every script and stylesheet is a file under /app/static.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_FORM_FIELDS = 50

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("agent_network.web", "templates"),
    autoescape=True,  # every {{ value }} is HTML-escaped: a posted <script> shows as text
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class BadForm(Exception):
    """The request body is not a form this app sends (wrong type, too many fields, bad
    encoding)."""


def page(
    request: Request,
    template: str,
    *,
    session: WebSession | None = None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Render ``template`` with ``context`` (plus ``session``, ``csrf`` and ``version``) as an
    HTML response carrying the security headers (CSP without inline script, no caching)."""
    html = _env.get_template(template).render(
        request_path=request.url.path,
        session=session,
        csrf=session.csrf if session else "",
        version=__version__,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def redirect(request: Request, url: str) -> Response:
    """A 303 to ``url``; for an htmx request an ``HX-Redirect`` so the whole page moves."""
    if request.headers.get("hx-request") == "true":
        return Response(status_code=204, headers={"HX-Redirect": url, **SECURITY_HEADERS})
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


async def read_form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (last value wins).

    Raises BadForm for another content type, more than ``MAX_FORM_FIELDS`` fields or a body
    that is not UTF-8. (The app's own forms are all URL-encoded; the body size is already
    capped by the API's body limit.)
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise BadForm("the app's forms are sent as application/x-www-form-urlencoded")
    body = await request.body()
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadForm(f"the form could not be read: {exc}") from exc
    return dict(pairs)


async def form_list(request: Request, name: str) -> list[str]:
    """Every value of the repeated form field ``name`` (e.g. a multiple select), in order; call
    after :func:`read_form` accepted the body (it is read again from Starlette's cache)."""
    text = (await request.body()).decode("utf-8", errors="replace")
    pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    return [v for k, v in pairs if k == name]


def sent_csrf(request: Request, form: dict[str, str]) -> str | None:
    """The CSRF token a request carries: the form's hidden field, else the htmx header."""
    return form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
