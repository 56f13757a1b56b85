"""The embedded link: the whole platform in this process, served to SDK clients in memory.

The SDK (``agent_network.client``) stands alone and never imports the server. A
:class:`~agent_network.client.HubClient` works over any object with the
:class:`~agent_network.client.Link` interface; :class:`EmbeddedLink` is the server-side one,
the way httpx's ``ASGITransport`` serves an app without a socket::

    from agent_network.api.embedded import EmbeddedLink
    from agent_network.client import HubClient

    async with EmbeddedLink.open("net.db") as link, HubClient(link) as hc:
        ...

REST calls go through the ASGI app in memory, live envelopes come from the hub's long-poll
(``ThreadService.envelopes``), and the durable cursors of hub clients move through
``services.delivery`` — the same rows the WebSocket protocol's ``ack`` moves.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
from fastapi import FastAPI

from agent_network.api.app import create_app
from agent_network.client.errors import error_from_body
from agent_network.client.models import Envelope
from agent_network.client.rest import AsyncClient
from agent_network.config import Settings
from agent_network.errors import AgentNetworkError
from agent_network.services import Services, create_admin_key

LONG_POLL = 30.0  # seconds one in-process wait for new envelopes lasts


class EmbeddedLink:
    """The platform in this process, reached without sockets (see the module docstring).

    Open it with :meth:`open`; ``token`` is the org key the link acts with (created on first
    open when none is given: read ``link.token`` to keep it for the next run). ``app`` is the
    running FastAPI app.
    """

    def __init__(self, app: FastAPI, token: str) -> None:
        self.app = app
        self.token = token
        self._transport = httpx.ASGITransport(app=app)
        self._clients: list[AsyncClient] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        database: str | Path | None = None,
        *,
        token: str | None = None,
        org_name: str = "local",
        run_routines: bool = False,
        model: str | None = None,
    ) -> AsyncIterator[EmbeddedLink]:
        """Start store, hub and services on ``database`` (a SQLite path or database URL; default
        a temporary file removed on exit) and yield the link; everything stops on exit.

        ``token``: an org key of that database to act with; without it a new org ``org_name`` is
        created. ``run_routines`` also starts the in-process runner (participate routines);
        ``model`` is the server's default model for them.
        """
        with contextlib.ExitStack() as stack:
            if database is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="an-local-"))
                database = Path(tmp) / "agent-network.db"
            settings = Settings(database=str(database), run_routines=run_routines, model=model)
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                if token is None:
                    admin = await create_admin_key(app.state.services.ctx.engine)
                    async with cls(app, admin).rest(admin) as root:
                        created = await root.orgs.create(org_name)
                    token = created.key
                link = cls(app, token)
                try:
                    yield link
                finally:
                    await link.aclose()

    @property
    def services(self) -> Services:
        """The services of the running app."""
        services: Services = self.app.state.services
        return services

    def rest(self, token: str) -> AsyncClient:
        """A REST client over the in-memory ASGI transport, acting with ``token`` (closed with
        the link)."""
        client = AsyncClient("http://local", token, transport=self._transport)
        self._clients.append(client)
        return client

    async def follow(
        self, token: str, thread_id: str, *, after: int | None = None, cursor: str | None = None
    ) -> AsyncIterator[Envelope]:
        """The envelopes of ``thread_id`` visible to ``token`` with ``seq > after`` (or after
        the durable ``cursor``; from the start when neither is given), in order, forever; a
        long-poll of the hub in process. SDK errors as over REST: Unauthenticated for a bad
        token, NotFound for a thread the token may not see."""
        services = self.services
        with _as_sdk_errors():
            principal = await services.orgs.authenticate(token)
            if after is None:
                after = 0
                if cursor is not None:
                    after = await services.delivery.cursor(principal, thread_id, cursor)
        while True:
            with _as_sdk_errors():
                page = await services.threads.envelopes(
                    principal,
                    thread_id,
                    after=after,
                    limit=500,
                    wait=LONG_POLL,
                    messages_only=False,
                )
            for item in page["items"]:
                if not item.get("stub"):  # a stub (hidden by its audience) carries nothing
                    yield Envelope.model_validate(item)
            after = max(after, int(page["next_after"]))

    async def ack(self, token: str, thread_id: str, seq: int, cursor: str) -> None:
        """Move the durable ``cursor`` of ``token`` in ``thread_id`` forward to ``seq`` (never
        backwards) through ``services.delivery``; NotFound for a thread the token may not see,
        InvalidRequest for a ``seq`` beyond the thread's last one."""
        services = self.services
        with _as_sdk_errors():
            principal = await services.orgs.authenticate(token)
            await services.delivery.ack(principal, thread_id, seq, cursor)

    async def aclose(self) -> None:
        """Close the REST clients this link handed out."""
        for client in self._clients:
            await client.aclose()
        self._clients.clear()


@contextlib.contextmanager
def _as_sdk_errors() -> Iterator[None]:
    """Raise a server error as the SDK error the REST API would have produced for it (the
    :class:`~agent_network.client.Link` interface speaks SDK errors over every link)."""
    try:
        yield
    except AgentNetworkError as err:
        body = {"error": {"code": err.code, "message": err.message, "details": err.details}}
        raise error_from_body(err.status, body) from err


__all__ = ["EmbeddedLink"]
