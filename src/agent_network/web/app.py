"""Mount the web app on the API's FastAPI app: static assets, pages, offline API docs."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from agent_network.web.agent_pages import router as agent_router
from agent_network.web.audit_pages import router as audit_router
from agent_network.web.credential_pages import router as credential_router
from agent_network.web.knowledge_pages import router as knowledge_router
from agent_network.web.pages import router
from agent_network.web.people_pages import router as people_router
from agent_network.web.sessions import SessionStore
from agent_network.web.team_pages import router as team_router
from agent_network.web.thread_pages import router as thread_router

STATIC_DIR = Path(__file__).parent / "static"
STATIC_URL = "/app/static"


def mount_web(app: FastAPI, *, docs_url: str) -> None:
    """Add the web app to ``app``: ``/app/static`` (packaged assets), the pages of
    :mod:`agent_network.web.pages` under ``/app`` (with an in-memory session store in
    ``app.state.web_sessions``), and the Swagger UI at ``docs_url`` served from the packaged
    assets (no CDN, so it works offline). Call it after the API routers are included; the app
    must be built with ``docs_url=None`` (FastAPI's own docs page loads its script from a CDN).
    """
    app.state.web_sessions = SessionStore()
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="web-static")

    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(docs_url, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{STATIC_URL}/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/swagger/favicon-32x32.png",
            # no badge fetched from the public validator: the page works offline
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.include_router(thread_router)
    app.include_router(team_router)
    app.include_router(agent_router)
    app.include_router(people_router)
    app.include_router(audit_router)
    app.include_router(credential_router)
    app.include_router(knowledge_router)
    app.include_router(router)  # last: it ends with the catch-all not-found route
