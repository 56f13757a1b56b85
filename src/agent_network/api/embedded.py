"""The embedded link: the whole platform in this process, served to SDK clients in memory.

The SDK (``agent_network.client``) stands alone and never imports the server. A
:class:`~agent_network.client.HubClient` works over any object with the
:class:`~agent_network.client.Link` interface; :class:`EmbeddedLink` is the server-side one,
the way httpx's ``ASGITransport`` serves an app without a socket::

    from agent_network.api.embedded import EmbeddedLink
    from agent_network.client import HubClient

    async with EmbeddedLink.open("net.db") as link, HubClient(link) as hc:
        ...

REST calls go through the ASGI app in memory, except a hub client's messages and new threads
(:meth:`EmbeddedLink.post`, :meth:`EmbeddedLink.create_thread`: the same credential check, body
validation, service call and response schema as ``POST /threads/{id}/messages`` and ``POST
/teams/{id}/threads``, without the HTTP round trip); each credential is authenticated
once and its principal reused by the link's calls until the access epoch moves, its known
expiry passes or ``RECHECK_EVERY`` seconds went by (the staleness bound of services/cache.py, for
removals made by another process). Envelopes are pushed: :meth:`EmbeddedLink.inbox` is a
:class:`~agent_network.services.delivery.Inbox` (the hub's subscription, filtered as the API
filters for that credential), and the durable cursors of hub clients move through
``services.delivery`` — the same rows the WebSocket protocol's ``ack`` moves. See
docs/architecture.md, "Hub clients: push, not poll".
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
import pydantic
from fastapi import FastAPI, Request

from agent_network.api.app import API_PREFIX, create_app
from agent_network.api.deps import check_credential_may, get_principal
from agent_network.api.responses import Envelope as EnvelopeSchema
from agent_network.api.responses import Thread as ThreadSchema
from agent_network.api.schemas import MessageCreate, ThreadCreate
from agent_network.client.errors import error_from_body
from agent_network.client.models import Envelope, Thread
from agent_network.client.rest import AsyncClient, ParticipantSpec, ThreadOptions, _thread_body
from agent_network.config import Settings
from agent_network.errors import (
    AgentNetworkError,
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
)
from agent_network.model.envelope import Envelope as StoredEnvelope
from agent_network.services import Principal, Services, create_admin_key
from agent_network.services.delivery import RECHECK_EVERY
from agent_network.services.delivery import Inbox as ServerInbox

LONG_POLL = 30.0  # seconds one in-process wait for new envelopes lasts (``follow``)
KEEP_PRINCIPALS = 10_000  # credentials whose principal the link keeps
KEEP_ENVELOPES = 10_000  # SDK envelopes kept to share between the inboxes of one link


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
        self._clients: dict[str, AsyncClient] = {}
        self._principals: OrderedDict[str, tuple[Principal, int, float]] = OrderedDict()
        self._envelopes: OrderedDict[str, Envelope] = OrderedDict()
        app.dependency_overrides[get_principal] = self._request_principal

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
                    token = created.secret
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
        """A REST client over the in-memory ASGI transport, acting with ``token`` (one per
        token, closed with the link)."""
        client = self._clients.get(token)
        if client is None:
            client = AsyncClient("http://local", token, transport=self._transport)
            self._clients[token] = client
        return client

    async def principal(self, token: str) -> Principal:
        """The principal of ``token``, authenticated once and reused until the access epoch
        moves, its known expiry passes or ``RECHECK_EVERY`` seconds went by (then checked
        again). AuthenticationError when it does not authenticate."""
        services = self.services
        epoch = services.ctx.access_epoch  # before the read: a removal during it makes it stale
        now = time.monotonic()
        hit = self._principals.get(token)
        if (
            hit is not None
            and hit[1] == epoch
            and now - hit[2] < RECHECK_EVERY
            and not hit[0].expired(time.time())
        ):
            return hit[0]
        principal = await services.orgs.authenticate(token)
        self._principals[token] = (principal, epoch, now)
        self._principals.move_to_end(token)
        while len(self._principals) > KEEP_PRINCIPALS:
            self._principals.popitem(last=False)
        return principal

    async def _request_principal(self, request: Request) -> Principal:
        """``get_principal`` for the app this link serves: the bearer credential through
        :meth:`principal` (once per connection, not once per call)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("send 'Authorization: Bearer <key>' with an org or admin key")
        return await self.principal(token)

    @contextlib.asynccontextmanager
    async def inbox(self, token: str, cursor: str) -> AsyncIterator[EmbeddedInbox]:
        """The :class:`EmbeddedInbox` of ``token`` on the durable ``cursor``: every envelope of
        every thread it may read, pushed by the hub (see the module docstring).
        Unauthenticated for a bad token."""
        services = self.services
        with _as_sdk_errors():
            principal = await self.principal(token)
            inbox = services.delivery.inbox(
                principal, lambda: services.orgs.authenticate(token), cursor
            )
            await inbox.__aenter__()
        try:
            yield EmbeddedInbox(self, inbox)
        finally:
            await inbox.__aexit__(None, None, None)

    def _sdk_envelope(self, env: StoredEnvelope, rendered: dict[str, Any]) -> Envelope:
        """The SDK envelope of ``env`` (validated once per link, shared by its inboxes)."""
        sdk = self._envelopes.get(env.id)
        if sdk is None:
            sdk = Envelope.model_validate(rendered)
            self._envelopes[env.id] = sdk
            if len(self._envelopes) > KEEP_ENVELOPES:
                self._envelopes.popitem(last=False)
        return sdk

    async def follow(
        self, token: str, thread_id: str, *, after: int | None = None, cursor: str | None = None
    ) -> AsyncIterator[Envelope]:
        """The envelopes of ``thread_id`` visible to ``token`` with ``seq > after`` (or after
        the durable ``cursor``; from the start when neither is given), in order, forever; a
        long-poll of the hub in process. SDK errors as over REST: Unauthenticated for a bad
        token, NotFound for a thread the token may not see."""
        services = self.services
        with _as_sdk_errors():
            principal = await self.principal(token)
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

    async def post(
        self,
        token: str,
        thread_id: str,
        content: str,
        *,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        audience: Iterable[str] | None = None,
        tool_calls: Iterable[Mapping[str, Any]] | None = None,
    ) -> Envelope:
        """Post ``content`` into ``thread_id`` as ``token``'s own subject (an agent token: its
        agent), as ``POST /threads/{thread_id}/messages`` does — the credential's permission
        for the call, the body's validation (InvalidRequest, 422, naming the fields) and the one
        post function (``ThreadService.post``) — without the HTTP round trip. Returns the
        stored envelope; SDK errors as over REST."""
        body: dict[str, Any] = {"content": content}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if causation_id is not None:
            body["causation_id"] = causation_id
        if audience is not None:
            body["audience"] = [audience] if isinstance(audience, str) else list(audience)
        if tool_calls is not None:
            body["tool_calls"] = [dict(c) for c in tool_calls]
        services = self.services
        with _as_sdk_errors():
            principal = await self._may(token, f"/threads/{thread_id}/messages")
            try:
                msg = MessageCreate.model_validate(body)
            except pydantic.ValidationError as exc:
                raise _invalid_body(exc) from None
            rendered = await services.threads.post(
                principal,
                thread_id,
                msg.content,
                agent_id=msg.agent_id,
                user_id=msg.user_id,
                idempotency_key=msg.idempotency_key,
                causation_id=msg.causation_id,
                audience=msg.audience,
                tool_calls=[c.model_dump() for c in msg.tool_calls] if msg.tool_calls else None,
            )
        return Envelope.model_validate(_as_answered(EnvelopeSchema, rendered))

    async def create_thread(
        self,
        token: str,
        team_id: str,
        title: str,
        *,
        agent_budget: int | None = None,
        visibility: Literal["members", "restricted"] = "members",
        participants: Iterable[ParticipantSpec] = (),
        options: ThreadOptions = ThreadOptions(),
    ) -> Thread:
        """Open a thread in team ``team_id`` with ``token``, as ``POST /teams/{team_id}/threads``
        does (``client.teams.create_thread`` with these arguments: the credential's
        permission, the body's validation, ``ThreadService.create``, the answer's schema)
        without the HTTP round trip. SDK errors as over REST."""
        body = _thread_body(title, agent_budget, visibility, participants, options)
        services = self.services
        with _as_sdk_errors():
            principal = await self._may(token, f"/teams/{team_id}/threads")
            try:
                spec = ThreadCreate.model_validate(body)
            except pydantic.ValidationError as exc:
                raise _invalid_body(exc) from None
            rendered = await services.threads.create(
                principal,
                team_id,
                spec.title,
                kind="team",
                agent_budget=spec.agent_budget,
                visibility=spec.visibility,
                participants=spec.participant_pairs(),
                **spec.protocol(),
            )
        return Thread.model_validate(_as_answered(ThreadSchema, rendered))

    async def _may(self, token: str, path: str) -> Principal:
        """The principal of ``token`` if its credential may make ``POST <path>`` (path below
        the API prefix), checked as the API checks every call (api/deps.py ``get_call``:
        scope first, then the credential's permission)."""
        principal = await self.principal(token)
        full = f"{API_PREFIX}{path}"
        try:
            check_credential_may(principal, "POST", full)
        except PermissionDeniedError:
            await self.services.check_path_scope(principal, full)
            raise
        return principal

    async def ack(self, token: str, thread_id: str, seq: int, cursor: str) -> None:
        """Move the durable ``cursor`` of ``token`` in ``thread_id`` forward to ``seq`` (never
        backwards) through ``services.delivery``; NotFound for a thread the token may not see,
        InvalidRequest for a ``seq`` beyond the thread's last one."""
        services = self.services
        with _as_sdk_errors():
            principal = await self.principal(token)
            await services.delivery.ack(principal, thread_id, seq, cursor)

    async def aclose(self) -> None:
        """Close the REST clients this link handed out."""
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class EmbeddedInbox:
    """A credential's :class:`~agent_network.client.hubclient.Inbox` over the embedded link:
    the server's :class:`~agent_network.services.delivery.Inbox` speaking SDK envelopes and
    errors."""

    def __init__(self, link: EmbeddedLink, inbox: ServerInbox) -> None:
        self._link = link
        self._inbox = inbox

    async def receive(self) -> list[Envelope]:
        """The next envelopes (at least one; waits). Unauthenticated once the credential no
        longer authenticates."""
        with _as_sdk_errors():
            items = await self._inbox.receive()
        return [self._link._sdk_envelope(env, rendered) for env, rendered in items]

    async def ack(self, positions: Mapping[str, int]) -> None:
        """Move the durable cursor of each thread to its seq, in one transaction (NotFound,
        InvalidRequest as the service raises them; nothing written then)."""
        with _as_sdk_errors():
            await self._inbox.ack(positions)


def _as_answered(schema: type[pydantic.BaseModel], rendered: Mapping[str, Any]) -> Any:
    """``rendered`` as the API answers it: through the route's response schema, as JSON
    (``exclude_unset``, as api/openapi.py ``ApiRoute``)."""
    return schema.model_validate(rendered).model_dump(mode="json", exclude_unset=True)


def _invalid_body(exc: pydantic.ValidationError) -> InvalidRequestError:
    """The error the API answers a body that fails its schema with (api/app.py)."""
    problems = [
        {"field": ".".join(str(p) for p in ("body", *e.get("loc", ()))), "problem": e["msg"]}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return InvalidRequestError(f"invalid request: {summary}", details={"problems": problems})


@contextlib.contextmanager
def _as_sdk_errors() -> Iterator[None]:
    """Raise a server error as the SDK error the REST API would have produced for it (the
    :class:`~agent_network.client.Link` interface speaks SDK errors over every link)."""
    try:
        yield
    except AgentNetworkError as err:
        body = {"error": {"code": err.code, "message": err.message, "details": err.details}}
        raise error_from_body(err.status, body) from err


__all__ = ["EmbeddedInbox", "EmbeddedLink"]
