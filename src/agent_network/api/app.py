"""The FastAPI application: lifespan owns the engine, the hub and the in-process runner."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent_network import __version__
from agent_network.api.limits import BodyLimitMiddleware
from agent_network.api.openapi import ApiRoute, operation_id
from agent_network.api.pagination import NEXT_CURSOR_HEADER
from agent_network.api.realtime import RealtimeProtocol
from agent_network.api.requests import RequestIdMiddleware, request_id_of
from agent_network.api.responses import Health
from agent_network.api.routes import (
    agents,
    credentials,
    knowledge,
    orgs,
    policy,
    realtime,
    runners,
    teams,
    threads,
)
from agent_network.config import Settings
from agent_network.errors import AgentNetworkError
from agent_network.hub import Hub
from agent_network.runtime.model_supervisor import worker_status
from agent_network.runtime.runner import Runner
from agent_network.services import ServiceContext, Services
from agent_network.store.engine import create_engine, database_url, upgrade_schema

API_PREFIX = "/api/v1"


def _error(
    request: Request, status: int, code: str, message: str, details: Any = None
) -> JSONResponse:
    """The project's error body ``{"error": {"code", "message"[, "details"], "request_id"}}``;
    a 401 also says how to authenticate (``WWW-Authenticate: Bearer``, RFC 6750)."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    request_id = request_id_of(request.scope)
    if request_id is not None:
        body["request_id"] = request_id
    response = JSONResponse({"error": body}, status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="agent-network"'
    return response


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: from the environment).

    On startup the schema is upgraded, the hub started and (if ``settings.run_routines``) the
    runner started; on shutdown they stop in reverse order. ``app.state.services``,
    ``app.state.realtime`` (the WebSocket protocol engine) and ``app.state.runner`` are
    available while it runs.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(database_url(settings.database))
        await upgrade_schema(engine)
        try:
            async with Hub.open(engine) as hub, anyio.create_task_group() as tg:
                ctx = ServiceContext(engine, hub, settings)
                app.state.services = Services.create(ctx)
                app.state.realtime = RealtimeProtocol(
                    ctx, threads=app.state.services.threads, orgs=app.state.services.orgs
                )
                await tg.start(app.state.realtime.run)
                app.state.runner = None
                if settings.run_routines:
                    runner = Runner(ctx, rules=app.state.services.rules)
                    await tg.start(runner.run)
                    app.state.runner = runner
                yield
                await app.state.realtime.shutdown()
                tg.cancel_scope.cancel()
        finally:
            await engine.dispose()

    app = FastAPI(
        title="Agent Network",
        version=__version__,
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served from packaged assets by the web app (offline)
        generate_unique_id_function=operation_id,
    )

    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # off unless configured: browsers on other origins get no access
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", NEXT_CURSOR_HEADER, "Link"],
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id

    @app.exception_handler(AgentNetworkError)
    async def _domain_error(request: Request, exc: AgentNetworkError) -> JSONResponse:
        response = _error(request, exc.status, exc.code, exc.message, exc.details)
        retry_after = exc.details.get("retry_after")
        if isinstance(retry_after, int | float):
            response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        return _error(request, 422, "invalid_request", f"invalid request: {summary}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}.get(
            exc.status_code, "http_error"
        )
        return _error(request, exc.status_code, code, str(exc.detail))

    meta = APIRouter(tags=["meta"], route_class=ApiRoute)

    @meta.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "version", "model_worker": {"state", "model",
        "restarts", "last_failure"}}`` once the hub is running; ``model_worker`` describes this
        process's local model worker (``state``: stopped, starting, ready, busy, backoff)."""
        return {"status": "ok", "version": __version__, "model_worker": worker_status()}

    for router in (
        meta,
        orgs.router,
        credentials.router,
        agents.router,
        knowledge.router,
        policy.router,
        teams.teams_router,
        teams.networks_router,
        threads.router,
        runners.router,
        realtime.router,
    ):
        app.include_router(router, prefix=API_PREFIX)

    from agent_network.web import mount_web  # the top layer; imported here: web imports api

    mount_web(app, docs_url=f"{API_PREFIX}/docs")
    return app
