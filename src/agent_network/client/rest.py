"""The async REST client: :class:`AsyncClient` and its resource groups.

``AsyncClient(base_url, token)`` talks to ``<base_url>/api/v1`` with ``Authorization: Bearer
<token>``. ``await client.request(method, path, json=..., params=...)`` is the raw call every
resource method is built on; the resource groups (``client.threads``, ``client.agents``...) give
one typed method per REST endpoint, each declared once with :func:`endpoint` (HTTP method, path
template, response model), which also lists it in :data:`ENDPOINTS`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json as jsonlib
import string
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Concatenate, Literal, ParamSpec, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter

from agent_network.client.errors import TransportError, error_from_body
from agent_network.client.models import (
    Agent,
    Assignment,
    AuditRecord,
    Claim,
    ClaimCompleted,
    Credential,
    Document,
    DoneTriggers,
    EgressPolicy,
    Envelope,
    EnvelopePage,
    EnvelopeStub,
    Health,
    Invite,
    IssuedCredential,
    JoinResult,
    Member,
    Org,
    OrgCreated,
    ReleasedClaims,
    Resume,
    RevealedSecret,
    Routine,
    Rule,
    SearchHit,
    Secret,
    Team,
    Thread,
    Tool,
    TriageRouted,
    User,
    VerifyReport,
    Visa,
)

if TYPE_CHECKING:
    from agent_network.client.realtime import Realtime

API_PREFIX = "/api/v1"
NEXT_CURSOR_HEADER = "X-Next-Cursor"
PAGE_LIMIT = 1000
"""Items per page the SDK asks for when it follows a list's cursor (the server's maximum)."""

Params = Mapping[str, Any]
T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R", bound="Resource")


# ---------------------------------------------------------------------------------------------
# Transport


def _clean_params(params: Params | None) -> dict[str, Any] | None:
    """Drop ``None`` values; booleans as ``true``/``false``; lists stay lists (repeated keys)."""
    if params is None:
        return None
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return out


def raise_for_error(response: httpx.Response) -> None:
    """Raise the :class:`ApiError` for an error ``response`` (status >= 400); else nothing."""
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    raise error_from_body(
        response.status_code,
        body,
        retry_after_header=response.headers.get("Retry-After"),
        fallback=response.text[:500] or response.reason_phrase,
    )


def decode(response: httpx.Response) -> Any:
    """The decoded JSON of a success ``response``, or ``None`` for an empty body (204).

    Raises :class:`ApiError` for an error answer, :class:`TransportError` for a success answer
    whose body is not JSON.
    """
    raise_for_error(response)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise TransportError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code} with a body that is not JSON"
        ) from exc


def _path(path: str) -> str:
    return path if path.startswith("/") else f"/{path}"


class AsyncClient:
    """Async client of one Agent Network server, authenticated by one key.

    ``base_url`` is the server root (``http://127.0.0.1:8321``); ``token`` an org key, a user or
    agent token or the admin key; ``timeout`` the per-request timeout in seconds; ``transport``
    an optional httpx transport (tests, ASGI). Use as ``async with AsyncClient(...) as client``
    (or call :meth:`aclose`). Resource groups: ``orgs``, ``users``, ``agents`` (with
    ``routines``, ``rule``, ``knowledge``, ``secrets``), ``teams``, ``networks`` (with
    ``invites``, ``visas``), ``threads``, ``knowledge``, ``credentials``, ``policy``,
    ``audit``, ``runners``; realtime rooms via :meth:`realtime`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.page_limit = PAGE_LIMIT  # items per page when a list method follows the cursor
        self._http = httpx.AsyncClient(
            base_url=f"{self.base_url}{API_PREFIX}",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )
        self.orgs = Orgs(self)
        self.users = Users(self)
        self.agents = Agents(self)
        self.teams = Teams(self)
        self.networks = Networks(self)
        self.threads = Threads(self)
        self.knowledge = Knowledge(self)
        self.credentials = Credentials(self)
        self.policy = Policy(self)
        self.audit = Audit(self)
        self.runners = Runners(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpx's per-request timeout)
    ) -> Any:
        """Send one request and return its decoded JSON (``None`` for an empty body).

        ``path`` is relative to ``/api/v1`` (``"/threads/thr_…"``); ``json`` the body (omitted
        when ``None``); ``params`` the query (``None`` values dropped); ``timeout`` overrides the
        client's timeout (seconds). Raises :class:`ApiError` (the subclass for its code, e.g.
        :class:`NotFound`) for any error answer, :class:`TransportError` when the server cannot
        be reached or the connection breaks.
        """
        return decode(await self._send(method, path, json=json, params=params, timeout=timeout))

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpx's per-request timeout)
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"params": _clean_params(params)}
        if json is not None:
            kwargs["json"] = json
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            return await self._http.request(method, _path(path), **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"{method} {path}: {exc!r}") from exc

    async def request_all(
        self,
        path: str,
        *,
        params: Params | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpx's per-request timeout)
    ) -> list[Any]:
        """``GET`` every page of a paginated list and return all its items, in order.

        Each answer's ``X-Next-Cursor`` header (absent on the last page) is sent back as the
        ``cursor`` query parameter; ``limit`` defaults to :attr:`page_limit` (1-1000) per page.
        Errors as :meth:`request`.
        """
        query: dict[str, Any] = {"limit": self.page_limit, **(params or {})}
        items: list[Any] = []
        while True:
            response = await self._send("GET", path, params=query, timeout=timeout)
            page = decode(response)
            if not isinstance(page, list):
                raise TransportError(f"GET {path} answered {type(page).__name__}, not a list")
            items.extend(page)
            cursor = response.headers.get(NEXT_CURSOR_HEADER)
            if not cursor:
                return items
            query["cursor"] = cursor

    async def stream_lines(
        self, method: str, path: str, *, params: Params | None = None
    ) -> AsyncIterator[Any]:
        """Yield each non-empty line of a JSON Lines answer, decoded, as it arrives.

        Raises :class:`ApiError` for an error answer (before the first item),
        :class:`TransportError` when the connection breaks.
        """
        try:
            async with self._http.stream(
                method, _path(path), params=_clean_params(params)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield jsonlib.loads(line)
        except httpx.TransportError as exc:
            raise TransportError(f"{method} {path}: {exc!r}") from exc

    async def health(self) -> Health:
        """``GET /health``: liveness of the server (no credential needed)."""
        return Health.model_validate(await self.request("GET", "/health"))

    def realtime(
        self,
        *,
        heartbeat_timeout: float | None = None,
        reconnect: bool = True,
        max_backoff: float = 10.0,
        open_timeout: float = 10.0,
    ) -> Realtime:
        """A realtime connection (``async with client.realtime() as rt``) over ``/api/v1/ws``.

        See :class:`agent_network.client.realtime.Realtime` for the arguments.
        """
        from agent_network.client.realtime import Realtime

        return Realtime(
            self.base_url,
            self.token,
            heartbeat_timeout=heartbeat_timeout,
            reconnect=reconnect,
            max_backoff=max_backoff,
            open_timeout=open_timeout,
            request_timeout=self.timeout,
        )


# ---------------------------------------------------------------------------------------------
# Endpoint declarations


@dataclass(frozen=True)
class Endpoint:
    """One REST endpoint the SDK covers: ``method``, ``path`` (template relative to
    ``/api/v1``) and ``name`` (the SDK method, e.g. ``Threads.post``)."""

    method: str
    path: str
    name: str


ENDPOINTS: list[Endpoint] = []
"""Every REST endpoint covered by a resource method (filled as the classes are defined)."""


@dataclass
class Req:
    """What an endpoint method returns to :func:`endpoint`: the body, the query, a timeout."""

    json: Any = None
    params: Params | None = None
    timeout: float | None = None


BASE = "{base}"
"""The placeholder a path of a shared resource class starts with: each subclass's ``base``
(``/teams``, ``/networks``), see :class:`TeamLike`."""


def _fill(template: str, fields: list[str], bound: Mapping[str, Any], base: str) -> str:
    values: dict[str, str] = {}
    for name in fields:
        value = bound.get(name)
        if not isinstance(value, str) or value in ("", ".", ".."):
            raise ValueError(f"{name} must be a non-empty string id, got {value!r}")
        values[name] = quote(value, safe="")
    if template.startswith(BASE):
        values["base"] = base
    return template.format(**values)


def endpoint(
    method: str, path: str, parse: Callable[[Any], T], *, paged: bool = False
) -> Callable[
    [Callable[Concatenate[R, P], Req]], Callable[Concatenate[R, P], Coroutine[Any, Any, T]]
]:
    """Turn a method building a :class:`Req` into the async call of ``method path``.

    The placeholders of ``path`` (``{thread_id}``) are filled from the method's arguments of the
    same name (URL-quoted; an empty or non-string id raises ``ValueError`` before any request);
    the answer is passed through ``parse`` (a model's ``model_validate`` or :func:`list_of`).
    The endpoint is recorded in :data:`ENDPOINTS`; a path starting with :data:`BASE` belongs to a
    shared base class and is recorded once per subclass, with the subclass's ``base``. A
    ``paged`` endpoint (a ``GET`` list with cursor pagination) follows the cursor to the last
    page and parses all the items (:meth:`AsyncClient.request_all`).
    """
    fields = [f for _, f, _, _ in string.Formatter().parse(path) if f and f != "base"]

    def decorate(
        build: Callable[Concatenate[R, P], Req],
    ) -> Callable[Concatenate[R, P], Coroutine[Any, Any, T]]:
        signature = inspect.signature(build)
        missing = [f for f in fields if f not in signature.parameters]
        if missing:
            raise TypeError(f"{build.__qualname__} lacks parameters {missing} of {path}")
        if not path.startswith(BASE):
            ENDPOINTS.append(Endpoint(method, path, build.__qualname__))

        @functools.wraps(build)
        async def call(self: R, /, *args: P.args, **kwargs: P.kwargs) -> T:
            bound = signature.bind(self, *args, **kwargs).arguments
            url = _fill(path, fields, bound, getattr(self, "base", ""))
            req = build(self, *args, **kwargs)
            if paged:
                every = await self._client.request_all(url, params=req.params, timeout=req.timeout)
                return parse(every)
            answer = await self._client.request(
                method, url, json=req.json, params=req.params, timeout=req.timeout
            )
            return parse(answer)

        call.__dict__["endpoint"] = (method, path)
        return call

    return decorate


def covers(method: str, path: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Record a hand-written method (streaming, dispatching) as covering ``method path``."""

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        ENDPOINTS.append(Endpoint(method, path, fn.__qualname__))
        return fn

    return decorate


def list_of(model: type[T]) -> Callable[[Any], list[T]]:
    """A parser validating a JSON list of ``model``."""
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]

    def parse(value: Any) -> list[T]:
        result: list[T] = adapter.validate_python(value)
        return result

    return parse


def nothing(_: Any) -> None:
    """The parser of ``204 No Content`` answers."""
    return None


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""Default of PATCH arguments: the field is left out (unchanged). ``None`` clears a nullable one."""


def _patch(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not UNSET}


def _documents(documents: Iterable[Mapping[str, Any] | tuple[str, str]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for doc in documents:
        if isinstance(doc, tuple):
            name, content = doc
            out.append({"name": name, "content": content})
        else:
            out.append(dict(doc))
    return out


ParticipantSpec = tuple[str, str] | Mapping[str, str] | Agent | User


def _participants(items: Iterable[ParticipantSpec]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for item in items:
        if isinstance(item, Agent):
            out.append({"kind": "agent", "id": item.id})
        elif isinstance(item, User):
            out.append({"kind": "user", "id": item.id})
        elif isinstance(item, tuple):
            out.append({"kind": item[0], "id": item[1]})
        else:
            out.append({"kind": item["kind"], "id": item["id"]})
    return out


def _sender(agent_id: str | None, user_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if agent_id is not None:
        body["agent_id"] = agent_id
    if user_id is not None:
        body["user_id"] = user_id
    return body


class Resource:
    """Base of the resource groups: holds the :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client


# ---------------------------------------------------------------------------------------------
# Orgs and users


class Orgs(Resource):
    """``client.orgs``: org creation (admin key) and the caller's own org."""

    @endpoint("POST", "/orgs", OrgCreated.model_validate)
    def create(self, name: str) -> Req:
        """Create an org (admin key only); the answer carries its first ``key`` (shown once)."""
        return Req({"name": name})

    @endpoint("GET", "/orgs/me", Org.model_validate)
    def me(self) -> Req:
        """The org the credential belongs to."""
        return Req()

    @endpoint("GET", "/orgs", list_of(Org), paged=True)
    def list(self) -> Req:
        """Every org, oldest first (admin key only)."""
        return Req()

    @endpoint("POST", "/orgs/{org_id}/keys", IssuedCredential.model_validate)
    def issue_key(self, org_id: str, *, name: str = "issued by the platform admin") -> Req:
        """Issue a new org key for ``org_id`` (admin key only: the way back in for an org that
        lost its key); the ``secret`` is in this answer only."""
        return Req({"name": name})


class Users(Resource):
    """``client.users``: the people of the caller's org."""

    @endpoint("POST", "/users", User.model_validate)
    def create(self, name: str, *, email: str | None = None, auto_ack: bool = False) -> Req:
        """Create a person in the caller's org; ``auto_ack`` makes them acknowledge
        invitations to protocol threads automatically."""
        return Req({"name": name, "email": email, "auto_ack": auto_ack})

    @endpoint("GET", "/users", list_of(User), paged=True)
    def list(self) -> Req:
        """The caller org's users."""
        return Req()

    @endpoint("GET", "/users/{user_id}", User.model_validate)
    def get(self, user_id: str) -> Req:
        """One user (NotFound outside the caller's org)."""
        return Req()

    @endpoint("PATCH", "/users/{user_id}", User.model_validate)
    def update(
        self,
        user_id: str,
        *,
        name: str | _Unset = UNSET,
        email: str | _Unset | None = UNSET,
        auto_ack: bool | _Unset = UNSET,
    ) -> Req:
        """Change a user's name, email (``email=None`` clears it) and/or ``auto_ack``."""
        return Req(_patch(name=name, email=email, auto_ack=auto_ack))

    @endpoint("DELETE", "/users/{user_id}", nothing)
    def delete(self, user_id: str) -> Req:
        """Delete a user; their past messages stay in the threads' history."""
        return Req()


# ---------------------------------------------------------------------------------------------
# Agents and their routines, rule, knowledge, secrets


class Routines(Resource):
    """``client.agents.routines``: event-driven behaviours of an agent."""

    @endpoint("POST", "/agents/{agent_id}/routines", Routine.model_validate)
    def create(
        self,
        agent_id: str,
        name: str,
        *,
        event_type: str = "thread.message_added",
        handler_type: str = "preset",
        preset_name: str | None = "participate",
        config: Mapping[str, Any] | None = None,
    ) -> Req:
        """Attach a routine (default: the ``participate`` preset on new messages)."""
        return Req(
            {
                "name": name,
                "event_type": event_type,
                "handler_type": handler_type,
                "preset_name": preset_name,
                "config": dict(config or {}),
            }
        )

    @endpoint("GET", "/agents/{agent_id}/routines", list_of(Routine), paged=True)
    def list(self, agent_id: str) -> Req:
        """An agent's routines."""
        return Req()

    @endpoint("PATCH", "/agents/{agent_id}/routines/{routine_id}", Routine.model_validate)
    def update(
        self,
        agent_id: str,
        routine_id: str,
        *,
        name: str | _Unset = UNSET,
        config: Mapping[str, Any] | _Unset = UNSET,
        status: Literal["active", "paused"] | _Unset = UNSET,
    ) -> Req:
        """Rename, reconfigure, pause or activate a routine."""
        return Req(_patch(name=name, config=config, status=status))

    @endpoint("POST", "/agents/{agent_id}/routines/{routine_id}/pause", Routine.model_validate)
    def pause(self, agent_id: str, routine_id: str) -> Req:
        """Pause a routine: it stops reacting."""
        return Req()

    @endpoint("POST", "/agents/{agent_id}/routines/{routine_id}/activate", Routine.model_validate)
    def activate(self, agent_id: str, routine_id: str) -> Req:
        """Activate a paused routine."""
        return Req()

    @endpoint("DELETE", "/agents/{agent_id}/routines/{routine_id}", nothing)
    def delete(self, agent_id: str, routine_id: str) -> Req:
        """Remove a routine."""
        return Req()


class Rules(Resource):
    """``client.agents.rule``: the governance rule of an agent."""

    @endpoint("GET", "/agents/{agent_id}/rule", Rule.model_validate)
    def get(self, agent_id: str) -> Req:
        """The agent's rule (the defaults when none was set)."""
        return Req()

    @endpoint("PUT", "/agents/{agent_id}/rule", Rule.model_validate)
    def put(
        self, /, agent_id: str, rule: Rule | Mapping[str, Any] | None = None, **fields: Any
    ) -> Req:
        """Replace the rule with ``rule`` (a :class:`Rule` or dict) and/or keyword ``fields``
        (``rate={"messages": 5, "per_seconds": 60}``, ``inbox_cap=10``...); fields left out
        take their defaults. ``inbound_from`` / ``outbound_to`` take ids, ``org:self``, ``*``
        or names, which the server resolves to ids (the returned rule shows both).
        InvalidRequest (422) for an unknown field or a bad value, UnresolvedPrincipal (422)
        for a name that names nobody or several principals."""
        body: dict[str, Any] = {}
        if isinstance(rule, Rule):
            body.update(rule.model_dump(exclude_unset=True, exclude={"principals"}))
        elif rule is not None:
            body.update(rule)
        body.update(fields)
        return Req(body)


class AgentKnowledge(Resource):
    """``client.agents.knowledge``: documents attached to one agent."""

    @endpoint("POST", "/agents/{agent_id}/knowledge", list_of(Document))
    def add(self, agent_id: str, documents: Iterable[Mapping[str, Any] | tuple[str, str]]) -> Req:
        """Attach documents (``{"name", "content"}`` dicts or ``(name, content)`` tuples),
        all or nothing."""
        return Req({"documents": _documents(documents)})

    @endpoint("GET", "/agents/{agent_id}/knowledge", list_of(Document), paged=True)
    def list(self, agent_id: str) -> Req:
        """Documents attached to the agent."""
        return Req()


class Secrets(Resource):
    """``client.agents.secrets``: encrypted secrets of an agent (values are never returned)."""

    @endpoint("PUT", "/agents/{agent_id}/secrets/{name}", Secret.model_validate)
    def put(self, agent_id: str, name: str, value: str) -> Req:
        """Set (create or replace) a secret."""
        return Req({"value": value})

    @endpoint("GET", "/agents/{agent_id}/secrets", list_of(Secret), paged=True)
    def list(self, agent_id: str) -> Req:
        """Names and times of the agent's secrets."""
        return Req()

    @endpoint("DELETE", "/agents/{agent_id}/secrets/{name}", nothing)
    def delete(self, agent_id: str, name: str) -> Req:
        """Delete a secret."""
        return Req()


class Agents(Resource):
    """``client.agents``: the caller org's agents, plus ``routines``, ``rule``, ``knowledge``
    and ``secrets`` sub-groups."""

    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client)
        self.routines = Routines(client)
        self.rule = Rules(client)
        self.knowledge = AgentKnowledge(client)
        self.secrets = Secrets(client)

    @endpoint("POST", "/agents", Agent.model_validate)
    def create(
        self,
        name: str,
        lookup_key: str,
        *,
        identity: str = "",
        model: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        resume: Mapping[str, Any] | Resume | None = None,
    ) -> Req:
        """Create an agent; ``lookup_key`` is unique in the org (Conflict otherwise);
        ``model`` (e.g. ``"test"``, ``"local:smollm2"``) ``None`` uses the server's default;
        ``resume``: ``{"capabilities": [...], "domains": [...], "summary": "..."}``."""
        return Req(
            {
                "name": name,
                "lookup_key": lookup_key,
                "identity": identity,
                "model": model,
                "metadata": dict(metadata or {}),
                "resume": _resume(resume),
            }
        )

    @endpoint("GET", "/agents", list_of(Agent), paged=True)
    def list(self) -> Req:
        """The caller org's agents."""
        return Req()

    @endpoint("GET", "/agents/{agent_id}", Agent.model_validate)
    def get(self, agent_id: str) -> Req:
        """One agent of the caller's org."""
        return Req()

    @endpoint("PATCH", "/agents/{agent_id}", Agent.model_validate)
    def update(
        self,
        agent_id: str,
        *,
        name: str | _Unset = UNSET,
        lookup_key: str | _Unset = UNSET,
        identity: str | _Unset = UNSET,
        model: str | _Unset | None = UNSET,
        metadata: Mapping[str, Any] | _Unset = UNSET,
        resume: Mapping[str, Any] | Resume | _Unset | None = UNSET,
    ) -> Req:
        """Change fields of an agent (``model=None`` resets it to the server default,
        ``resume=None`` clears the resume)."""
        return Req(
            _patch(
                name=name,
                lookup_key=lookup_key,
                identity=identity,
                model=model,
                metadata=metadata,
                resume=resume if resume is UNSET else _resume(resume),
            )
        )

    @endpoint("DELETE", "/agents/{agent_id}", nothing)
    def delete(self, agent_id: str) -> Req:
        """Delete an agent: it leaves every team and network and its routines stop."""
        return Req()


# ---------------------------------------------------------------------------------------------
# Teams and networks


def _resume(resume: Mapping[str, Any] | Resume | None) -> dict[str, Any] | None:
    if resume is None:
        return None
    if isinstance(resume, BaseModel):
        return resume.model_dump(include={"capabilities", "domains", "summary"})
    return dict(resume)


def _participant(item: ParticipantSpec) -> dict[str, str]:
    return _participants([item])[0]


def _jsonable(item: Any, method: str) -> Any:
    """``item.<method>()`` for objects of the protocol API (Expectation.to_data,
    TransitionGraph.to_dict), else ``item`` as given (already JSON)."""
    convert = getattr(item, method, None)
    return convert() if callable(convert) else item


@dataclass(frozen=True)
class ThreadOptions:
    """The protocol knobs of a new thread (see :meth:`Threads.create`)."""

    adapter: str = "open"
    initiator: ParticipantSpec | None = None
    invitees: Iterable[ParticipantSpec] | None = None
    ttl: float | None = None
    ack_timeout: float | None = None
    expectations: Iterable[Any] = ()
    names: Mapping[str, str] | None = None
    graph: Any = None
    order: Sequence[str] | None = None
    knobs: Mapping[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The JSON fields (only those given)."""
        out: dict[str, Any] = {}
        if self.adapter != "open":
            out["adapter"] = self.adapter
        if self.initiator is not None:
            out["initiator"] = _participant(self.initiator)
        if self.invitees is not None:
            out["invitees"] = _participants(self.invitees)
        if self.ttl is not None:
            out["ttl"] = self.ttl
        if self.ack_timeout is not None:
            out["ack_timeout"] = self.ack_timeout
        expectations = [_jsonable(e, "to_data") for e in self.expectations]
        if expectations:
            out["expectations"] = expectations
        if self.names is not None:
            out["names"] = dict(self.names)
        if self.graph is not None:
            out["graph"] = _jsonable(self.graph, "to_dict")
        if self.order is not None:
            out["order"] = list(self.order)
        if self.knobs:
            out["knobs"] = dict(self.knobs)
        return out


def _thread_body(
    title: str,
    agent_budget: int | None,
    visibility: Literal["members", "restricted"],
    participants: Iterable[ParticipantSpec],
    options: ThreadOptions,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": title,
        "visibility": visibility,
        "participants": _participants(participants),
        **options.body(),
    }
    if agent_budget is not None:
        body["agent_budget"] = agent_budget
    return body


class TeamLike(Resource):
    """What :class:`Teams` and :class:`Networks` share: the same calls on ``base`` (``/teams``
    or ``/networks``), all answering :class:`~agent_network.client.models.Team` objects.

    A subclass sets ``base``; every endpoint declared here is recorded in :data:`ENDPOINTS`
    once per subclass, under the subclass's path and name.
    """

    base: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.base:
            raise TypeError(f"{cls.__name__} must set base (the collection path, e.g. /teams)")
        for name, attr in vars(TeamLike).items():
            spec = getattr(attr, "endpoint", None)
            if spec is not None:
                method, path = spec
                ENDPOINTS.append(
                    Endpoint(method, path.replace(BASE, cls.base, 1), f"{cls.__name__}.{name}")
                )

    @endpoint("POST", "{base}", Team.model_validate)
    def create(self, name: str, *, description: str = "") -> Req:
        """Create one: a team in the caller's org, a network hosted by it."""
        return Req({"name": name, "description": description})

    @endpoint("GET", "{base}", list_of(Team), paged=True)
    def list(self) -> Req:
        """The teams the caller can see; the networks its org hosts or belongs to."""
        return Req()

    @endpoint("GET", "{base}/{team_id}", Team.model_validate)
    def get(self, team_id: str) -> Req:
        """One team or network."""
        return Req()

    @endpoint("PATCH", "{base}/{team_id}", Team.model_validate)
    def update(
        self, team_id: str, *, name: str | _Unset = UNSET, description: str | _Unset = UNSET
    ) -> Req:
        """Rename or re-describe it (a network: host only)."""
        return Req(_patch(name=name, description=description))

    @endpoint("POST", "{base}/{team_id}/members", Member.model_validate)
    def add_member(
        self,
        team_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        role: Literal["owner", "admin", "member"] = "member",
    ) -> Req:
        """Add one of the caller org's agents (``agent_id``) or users (``user_id``)."""
        return Req({"agent_id": agent_id, "user_id": user_id, "role": role})

    @endpoint("GET", "{base}/{team_id}/members", list_of(Member), paged=True)
    def members(self, team_id: str) -> Req:
        """Its members (of a network: of every member org)."""
        return Req()

    @endpoint("DELETE", "{base}/{team_id}/members/{member_kind}/{member_id}", nothing)
    def remove_member(
        self, team_id: str, member_kind: Literal["agent", "user"], member_id: str
    ) -> Req:
        """Remove a member (``member_kind`` ``agent`` or ``user``; from a network: one of the
        caller org's)."""
        return Req()

    @endpoint("PATCH", "{base}/{team_id}/members/{member_kind}/{member_id}", Member.model_validate)
    def set_role(
        self,
        team_id: str,
        member_kind: Literal["agent", "user"],
        member_id: str,
        role: Literal["owner", "admin", "member"],
    ) -> Req:
        """Change a member's role (see docs/security.md, Team roles; in a network the host org
        sets any role, a member org ``member`` only)."""
        return Req({"role": role})

    @endpoint("POST", "{base}/{team_id}/threads", Thread.model_validate)
    def create_thread(
        self,
        team_id: str,
        title: str,
        *,
        agent_budget: int | None = None,
        visibility: Literal["members", "restricted"] = "members",
        participants: Iterable[ParticipantSpec] = (),
        adapter: str = "open",
        initiator: ParticipantSpec | None = None,
        invitees: Iterable[ParticipantSpec] | None = None,
        ttl: float | None = None,
        ack_timeout: float | None = None,
        expectations: Iterable[Any] = (),
        names: Mapping[str, str] | None = None,
        graph: Any = None,
        order: Sequence[str] | None = None,
        knobs: Mapping[str, Any] | None = None,
    ) -> Req:
        """Open a thread in it (see :meth:`Threads.create`)."""
        options = ThreadOptions(
            adapter, initiator, invitees, ttl, ack_timeout, expectations, names, graph, order, knobs
        )
        return Req(_thread_body(title, agent_budget, visibility, participants, options))

    @endpoint("GET", "{base}/{team_id}/threads", list_of(Thread), paged=True)
    def threads(self, team_id: str) -> Req:
        """Its threads visible to the caller."""
        return Req()


class Teams(TeamLike):
    """``client.teams``: org-internal teams, their members and threads."""

    base = "/teams"

    @endpoint("DELETE", "/teams/{team_id}", nothing)
    def delete(self, team_id: str) -> Req:
        """Delete a team (its threads leave listings; their WAL is kept)."""
        return Req()


class Invites(Resource):
    """``client.networks.invites``: join codes of a network (host org only)."""

    @endpoint("POST", "/networks/{network_id}/invites", Invite.model_validate)
    def create(
        self,
        network_id: str,
        *,
        expires_in: float = 7 * 24 * 3600,
        max_uses: int | None = None,
    ) -> Req:
        """Create a join code valid ``expires_in`` seconds for at most ``max_uses`` joins;
        ``join_code`` is only in this answer."""
        return Req({"expires_in": expires_in, "max_uses": max_uses})

    @endpoint("GET", "/networks/{network_id}/invites", list_of(Invite), paged=True)
    def list(self, network_id: str) -> Req:
        """The network's invites (uses, expiry, revocation; never the code)."""
        return Req()

    @endpoint("DELETE", "/networks/{network_id}/invites/{invite_id}", nothing)
    def revoke(self, network_id: str, invite_id: str) -> Req:
        """Revoke an invite: its code admits nobody any more."""
        return Req()


class Visas(Resource):
    """``client.networks.visas``: the orgs admitted into a network."""

    @endpoint("GET", "/networks/{network_id}/visas", list_of(Visa), paged=True)
    def list(self, network_id: str) -> Req:
        """All visas for the host org; only its own for a member org."""
        return Req()

    @endpoint("DELETE", "/networks/{network_id}/visas/{visa_id}", nothing)
    def revoke(self, network_id: str, visa_id: str) -> Req:
        """Revoke an org's visa (host only): its agents and users leave the network at once."""
        return Req()


class Networks(TeamLike):
    """``client.networks``: cross-org networks, with ``invites`` and ``visas`` sub-groups."""

    base = "/networks"

    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client)
        self.invites = Invites(client)
        self.visas = Visas(client)

    @endpoint("POST", "/networks/join", JoinResult.model_validate)
    def join(
        self, code: str, *, agent_ids: Sequence[str] = (), user_ids: Sequence[str] = ()
    ) -> Req:
        """Join with a code, attaching only the agents and users named. InviteInvalid for a
        wrong, expired, revoked or used-up code; RateLimited (``retry_after``) when trying
        too often."""
        return Req({"code": code, "agent_ids": list(agent_ids), "user_ids": list(user_ids)})

    @endpoint("POST", "/networks/{network_id}/leave", Visa.model_validate)
    def leave(self, network_id: str) -> Req:
        """The caller's org leaves the network; returns the ended visa."""
        return Req()

    @endpoint("POST", "/networks/{network_id}/close", Team.model_validate)
    def close(self, network_id: str) -> Req:
        """Close the network (host only): its threads become read-only."""
        return Req()


# ---------------------------------------------------------------------------------------------
# Threads


class Threads(Resource):
    """``client.threads``: create, read, post, page through history, verify."""

    @covers("POST", "/teams/{team_id}/threads")
    @covers("POST", "/networks/{team_id}/threads")
    async def create(
        self,
        title: str,
        *,
        team_id: str | None = None,
        network_id: str | None = None,
        agent_budget: int | None = None,
        visibility: Literal["members", "restricted"] = "members",
        participants: Iterable[ParticipantSpec] = (),
        adapter: str = "open",
        initiator: ParticipantSpec | None = None,
        invitees: Iterable[ParticipantSpec] | None = None,
        ttl: float | None = None,
        ack_timeout: float | None = None,
        expectations: Iterable[Any] = (),
        names: Mapping[str, str] | None = None,
        graph: Any = None,
        order: Sequence[str] | None = None,
        knobs: Mapping[str, Any] | None = None,
    ) -> Thread:
        """Open a thread in a team (``team_id``) or a network (``network_id``), exactly one.

        ``agent_budget``: consecutive agent messages allowed without a human one (server default
        when ``None``); ``visibility="restricted"`` limits it to ``participants`` (``(kind,
        id)`` tuples, ``{"kind", "id"}`` dicts, or :class:`Agent`/:class:`User` models).
        ``adapter`` (default ``open``; ``conversation``, ``consulting``, ``discussion``,
        ``workflow`` or a custom one) picks the protocol; a protocol thread needs
        ``participants`` (its speakers, whatever the visibility) and takes ``initiator``
        (default: the first participant), ``invitees`` (default: everyone but the initiator;
        ``[]``: no acks), ``ttl``/``ack_timeout`` (seconds), ``expectations`` (dicts or
        ``agent_network.protocol`` Expectations), ``names`` (name -> participant id), ``graph``
        (a TransitionGraph or its dict), ``order`` (discussion) and ``knobs`` (custom adapter
        knobs). InvalidRequest (422) names a bad knob; nothing is written then.
        ValueError when not exactly one of ``team_id``/``network_id`` is given.
        """
        if (team_id is None) == (network_id is None):
            raise ValueError("give exactly one of team_id or network_id")
        group = self._client.teams if team_id is not None else self._client.networks
        target = team_id if team_id is not None else network_id
        assert target is not None
        return await group.create_thread(
            target,
            title,
            agent_budget=agent_budget,
            visibility=visibility,
            participants=participants,
            adapter=adapter,
            initiator=initiator,
            invitees=invitees,
            ttl=ttl,
            ack_timeout=ack_timeout,
            expectations=expectations,
            names=names,
            graph=graph,
            order=order,
            knobs=knobs,
        )

    @endpoint("GET", "/threads", list_of(Thread), paged=True)
    def list(self) -> Req:
        """Every thread the caller can see (its teams' and networks')."""
        return Req()

    @endpoint("GET", "/threads/{thread_id}", Thread.model_validate)
    def get(self, thread_id: str) -> Req:
        """A thread with its state (``status``, ``last_seq``, budget)."""
        return Req()

    @endpoint("PATCH", "/threads/{thread_id}", Thread.model_validate)
    def update(
        self,
        thread_id: str,
        *,
        agent_budget: int | _Unset = UNSET,
        visibility: Literal["members"] | _Unset = UNSET,
    ) -> Req:
        """Set the runaway budget and/or widen a restricted thread to ``members``."""
        return Req(_patch(agent_budget=agent_budget, visibility=visibility))

    @endpoint("POST", "/threads/{thread_id}/participants", Thread.model_validate)
    def add_participants(self, thread_id: str, participants: Iterable[ParticipantSpec]) -> Req:
        """Add participants to a restricted thread (members of its team or network)."""
        return Req({"participants": _participants(participants)})

    @endpoint("POST", "/threads/{thread_id}/messages", Envelope.model_validate)
    def post(
        self,
        thread_id: str,
        content: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        audience: Iterable[str] | None = None,
        tool_calls: Iterable[Mapping[str, Any]] | None = None,
    ) -> Req:
        """Post a message as one of the caller's agents (``agent_id``) or users (``user_id``);
        a token posts as its own subject. Returns the committed envelope; the same
        ``idempotency_key`` from the same sender returns the original envelope.
        ``causation_id``: the id of the envelope of this thread the message answers.
        ``audience``: ids of the participants (agents, users) who receive it (``None``:
        everyone; InvalidAudience for ids outside the thread). ``tool_calls``: ``[{name,
        args?, result?}]`` (``agent_network.protocol.tool_call`` builds one), stored in the
        message's ``data["tool_calls"]``; a workflow routes on a Handoff/Finish result."""
        body: dict[str, Any] = {"content": content}
        for name, value in (
            ("agent_id", agent_id),
            ("user_id", user_id),
            ("idempotency_key", idempotency_key),
            ("causation_id", causation_id),
        ):
            if value is not None:
                body[name] = value
        if audience is not None:
            body["audience"] = [audience] if isinstance(audience, str) else list(audience)
        if tool_calls is not None:
            body["tool_calls"] = [dict(c) for c in tool_calls]
        return Req(body)

    @endpoint("POST", "/threads/{thread_id}/ack", Thread.model_validate)
    def ack(
        self, thread_id: str, *, agent_id: str | None = None, user_id: str | None = None
    ) -> Req:
        """Accept an invitation to a protocol thread as one of the caller's agents or users
        (a token: itself); the last ack makes it ``active``. ProtocolViolation without a
        pending invitation."""
        return Req(_sender(agent_id, user_id))

    @endpoint("POST", "/threads/{thread_id}/reject", Thread.model_validate)
    def reject(
        self,
        thread_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        reason: str | None = None,
    ) -> Req:
        """Decline an invitation: the thread closes with ``invite_rejected``."""
        body = _sender(agent_id, user_id)
        if reason is not None:
            body["reason"] = reason
        return Req(body)

    @endpoint("POST", "/threads/{thread_id}/close", Thread.model_validate)
    def close(self, thread_id: str, *, reason: str | None = None) -> Req:
        """Close a thread (a participant, or an org key of an org with a participant; an
        open thread: the org that created it or hosts its team). ThreadClosed when it is
        already closing or closed."""
        return Req({"reason": reason} if reason is not None else {})

    @endpoint("POST", "/threads/{thread_id}/context", Thread.model_validate)
    def set_context(
        self,
        thread_id: str,
        values: Mapping[str, Any],
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
    ) -> Req:
        """Set workflow context keys (the turn does not advance); the sender is the caller's
        participant (an org key with several participants names ``agent_id``/``user_id``)."""
        return Req({"values": dict(values), **_sender(agent_id, user_id)})

    @endpoint("GET", "/threads/{thread_id}/tools", list_of(Tool))
    def tools(self, thread_id: str, *, agent_id: str | None = None) -> Req:
        """The workflow tools the caller's agent gets in this thread now (``[]`` outside
        workflows); an agent token may leave ``agent_id`` out."""
        return Req(params={"agent_id": agent_id})

    @endpoint("GET", "/threads/{thread_id}/messages", EnvelopePage.model_validate)
    def messages(self, thread_id: str, *, after: int = 0, limit: int = 100, wait: float = 0) -> Req:
        """Messages with ``seq > after`` among the next ``limit`` envelopes (a page may hold
        fewer messages, even none, while ``next_after`` moves on); ``wait`` seconds (<= 60)
        long-polls until one arrives. Page on with ``after=page.next_after``."""
        return Req(
            params={"after": after, "limit": limit, "wait": wait},
            timeout=self._client.timeout + wait,
        )

    @endpoint("GET", "/threads/{thread_id}/envelopes", EnvelopePage.model_validate)
    def envelopes(
        self, thread_id: str, *, after: int = 0, limit: int = 100, wait: float = 0
    ) -> Req:
        """Every envelope (messages and thread events) with ``seq > after``; ``wait`` seconds
        (<= 60) long-polls until one arrives. Page on with ``after=page.next_after``. An
        envelope hidden from the caller by its audience is an :class:`EnvelopeStub` (seq, hash,
        prev_hash only); ``page.envelopes`` leaves the stubs out."""
        return Req(
            params={"after": after, "limit": limit, "wait": wait},
            timeout=self._client.timeout + wait,
        )

    async def history(
        self, thread_id: str, *, after: int = 0, messages_only: bool = False, page: int = 500
    ) -> AsyncIterator[Envelope]:
        """Yield every envelope (or only messages) with ``seq > after`` that exists now and
        the caller may see, in order, fetching ``page`` at a time (stubs of hidden envelopes
        left out: :meth:`chain` yields them too)."""
        async for env in self._pages(thread_id, after, messages_only, page):
            if isinstance(env, Envelope):
                yield env

    async def chain(
        self, thread_id: str, *, after: int = 0, page: int = 1000
    ) -> AsyncIterator[Envelope | EnvelopeStub]:
        """Yield the thread's whole chain with ``seq > after`` as it exists now, in order: every
        envelope the caller may see, and an :class:`EnvelopeStub` for each one its audience
        hides — the input of :func:`agent_network.client.verify_chain`. NotFound outside the
        caller's scope."""
        async for env in self._pages(thread_id, after, False, page):
            yield env

    async def _pages(
        self, thread_id: str, after: int, messages_only: bool, page: int
    ) -> AsyncIterator[Envelope | EnvelopeStub]:
        while True:
            if messages_only:
                result = await self.messages(thread_id, after=after, limit=page)
            else:
                result = await self.envelopes(thread_id, after=after, limit=page)
            for env in result.items:
                yield env
            if result.next_after <= after:
                return  # (a page may hold no message yet move on: limit counts envelopes)
            after = result.next_after

    @endpoint("GET", "/threads/{thread_id}/verify", VerifyReport.model_validate)
    def verify(self, thread_id: str) -> Req:
        """Recompute the thread's hash chain; ``ok`` False names ``first_bad_seq``."""
        return Req()


# ---------------------------------------------------------------------------------------------
# Knowledge, credentials, policy, audit


class Knowledge(Resource):
    """``client.knowledge``: org-wide documents and search over the caller's knowledge."""

    @endpoint("POST", "/knowledge", list_of(Document))
    def add(self, documents: Iterable[Mapping[str, Any] | tuple[str, str]]) -> Req:
        """Attach org-wide documents (dicts or ``(name, content)`` tuples), all or nothing."""
        return Req({"documents": _documents(documents)})

    @endpoint("GET", "/knowledge", list_of(Document), paged=True)
    def list(self) -> Req:
        """The org's org-wide documents."""
        return Req()

    @endpoint("GET", "/knowledge/search", list_of(SearchHit))
    def search(self, q: str, *, agent_id: str | None = None, limit: int = 5) -> Req:
        """Best chunks of the caller org's knowledge (and ``agent_id``'s own) for ``q``."""
        return Req(params={"q": q, "agent_id": agent_id, "limit": limit})

    @endpoint("DELETE", "/knowledge/{document_id}", nothing)
    def delete(self, document_id: str) -> Req:
        """Delete a document (org-wide or an agent's)."""
        return Req()


class Credentials(Resource):
    """``client.credentials``: org keys, user tokens and agent tokens."""

    @endpoint("POST", "/credentials", IssuedCredential.model_validate)
    def issue(
        self,
        kind: Literal["org_key", "user_token", "agent_token"],
        *,
        subject_id: str | None = None,
        name: str = "",
        scopes: Sequence[Literal["read", "write"]] = ("read", "write"),
        expires_in: float | None = None,
    ) -> Req:
        """Issue a credential (``subject_id``: the user or agent a token acts as; ``expires_in``:
        seconds until it stops authenticating, None: never); the answer's ``secret`` is shown
        only once."""
        body: dict[str, Any] = {
            "kind": kind,
            "subject_id": subject_id,
            "name": name,
            "scopes": list(scopes),
        }
        if expires_in is not None:
            body["expires_in"] = expires_in
        return Req(body)

    @endpoint("GET", "/credentials", list_of(Credential), paged=True)
    def list(self) -> Req:
        """The org's credentials, without secrets."""
        return Req()

    @endpoint("DELETE", "/credentials/{credential_id}", Credential.model_validate)
    def revoke(self, credential_id: str) -> Req:
        """Revoke a credential at once."""
        return Req()

    @endpoint("POST", "/credentials/{credential_id}/renew", Credential.model_validate)
    def renew(self, credential_id: str, expires_in: float) -> Req:
        """Move a live credential's expiry to ``expires_in`` seconds from now; InvalidRequest
        when it is revoked or expired already."""
        return Req({"expires_in": expires_in})

    @endpoint("POST", "/credentials/{credential_id}/rotate", IssuedCredential.model_validate)
    def rotate(self, credential_id: str) -> Req:
        """Replace a credential by a new secret and revoke the old one, atomically."""
        return Req()


class Policy(Resource):
    """``client.policy``: the org's egress policy."""

    @endpoint("GET", "/policy/egress", EgressPolicy.model_validate)
    def egress(self) -> Req:
        """The org's egress rules."""
        return Req()

    @endpoint("PUT", "/policy/egress", EgressPolicy.model_validate)
    def set_egress(
        self,
        rules: Iterable[Mapping[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        acknowledge_loosening: bool = False,
    ) -> Req:
        """Replace the egress policy: rules (``{"name", "kind", "action", "pattern"?}`` each)
        and ``defaults`` (``{"org_secrets", "key_formats": "refuse"|"redact"|"off",
        "team_threads": bool}``; None: the built-in defaults). Turning a default off needs
        ``acknowledge_loosening=True`` (InvalidRequest ``loosening_not_acknowledged``
        otherwise); InvalidRequest for a bad rule (e.g. a catastrophic regex)."""
        body: dict[str, Any] = {"rules": [dict(r) for r in rules]}
        if defaults is not None:
            body["defaults"] = dict(defaults)
        if acknowledge_loosening:
            body["acknowledge_loosening"] = True
        return Req(body)


def _audit_params(
    since: str | None,
    until: str | None,
    action: str | None,
    principal_id: str | None,
    resource_id: str | None,
    outcome: str | None,
    after_id: int,
) -> dict[str, Any]:
    return {
        "since": since,
        "until": until,
        "action": action,
        "principal_id": principal_id,
        "resource_id": resource_id,
        "outcome": outcome,
        "after_id": after_id,
    }


class Audit(Resource):
    """``client.audit``: the caller org's audit log (org key)."""

    @covers("GET", "/audit")
    async def list(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        action: str | None = None,
        principal_id: str | None = None,
        resource_id: str | None = None,
        outcome: Literal["accepted", "refused"] | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """The matching records with an ``id`` above ``after_id``, oldest first, following the
        cursor (``X-Next-Cursor``) page by page as every other list does.

        ``since``/``until``: ISO-8601; ``action``: exact or ``prefix*``; ``limit``: at most
        this many records (None: every one; pages hold :attr:`AsyncClient.page_limit`, or
        ``limit`` when smaller). ``after_id`` (the last record's ``id`` seen) resumes a walk.
        Raises ValueError for ``limit`` < 1 (before any request), InvalidRequest for a bad
        filter, other ApiError/TransportError as :meth:`AsyncClient.request`.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        params: dict[str, Any] = _audit_params(
            since, until, action, principal_id, resource_id, outcome, after_id
        )
        records: list[AuditRecord] = []
        while True:
            want = self._client.page_limit
            if limit is not None:
                want = min(want, limit - len(records))
            response = await self._client._send("GET", "/audit", params={**params, "limit": want})
            page = decode(response)
            if not isinstance(page, list):
                raise TransportError(f"GET /audit answered {type(page).__name__}, not a list")
            records.extend(AuditRecord.model_validate(row) for row in page)
            cursor = response.headers.get(NEXT_CURSOR_HEADER)
            if not cursor or (limit is not None and len(records) >= limit):
                return records
            # the cursor carries the position: after_id with a cursor is refused (422)
            params = {**params, "after_id": None, "cursor": cursor}

    @covers("GET", "/audit/export")
    async def export(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        action: str | None = None,
        principal_id: str | None = None,
        resource_id: str | None = None,
        outcome: Literal["accepted", "refused"] | None = None,
        after_id: int = 0,
    ) -> AsyncIterator[AuditRecord]:
        """Yield every matching record as it streams from ``GET /audit/export`` (JSON Lines),
        oldest first. Same filters as :meth:`list`."""
        params = _audit_params(since, until, action, principal_id, resource_id, outcome, after_id)
        async for row in self._client.stream_lines("GET", "/audit/export", params=params):
            yield AuditRecord.model_validate(row)


class Runners(Resource):
    """``client.runners``: what a remote runner works on, and leases on triggers (claims)."""

    @endpoint("GET", "/runners/assignments", list_of(Assignment))
    def assignments(self) -> Req:
        """The agents this credential runs (an active ``participate`` or ``triage`` routine),
        the threads each follows per routine, and their triage routines."""
        return Req()

    @endpoint("POST", "/claims", Claim.model_validate)
    def claim(
        self,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        *,
        lease_seconds: float = 10.0,
        job: bool = False,
    ) -> Req:
        """Claim the trigger ``trigger_seq`` for ``agent_id`` for ``lease_seconds`` (renews a
        lease already ours). ClaimHeld (``retry_after``) while another runner holds it,
        ClaimDone when it is done. ``job``: the granted claim carries what answering needs
        (``Claim.job``, a :class:`RunnerJob`; None when the agent is not to answer now)."""
        body: dict[str, Any] = {
            "agent_id": agent_id,
            "thread_id": thread_id,
            "trigger_seq": trigger_seq,
            "runner_id": runner_id,
            "lease_seconds": lease_seconds,
        }
        if job:
            body["job"] = True
        return Req(body)

    @endpoint("POST", "/claims/complete", ClaimCompleted.model_validate)
    def complete(
        self,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        *,
        dropped: str | None = None,
        detail: str | None = None,
    ) -> Req:
        """Mark a trigger done (answered or deliberately skipped). ``dropped``: why the runner
        leaves it unanswered, which the server audits — ``inbox_cap`` (``rule.refused``),
        ``failed`` (``routine.failed``; ``detail``: how, at most 500 characters) or
        ``empty_reply`` (``routine.skipped``)."""
        body: dict[str, Any] = {
            "agent_id": agent_id,
            "thread_id": thread_id,
            "trigger_seq": trigger_seq,
            "runner_id": runner_id,
        }
        if dropped is not None:
            body["dropped"] = dropped
        if detail is not None:
            body["detail"] = detail
        return Req(body)

    @endpoint("POST", "/runners/secrets", RevealedSecret.model_validate)
    def secret(
        self, agent_id: str, thread_id: str, trigger_seq: int, runner_id: str, name: str
    ) -> Req:
        """Secret ``name`` of ``agent_id`` for the tools of its own runner, which holds a live
        claim (``runner_id``) on trigger ``trigger_seq`` of ``thread_id``; audited, never
        logged. Only the agent's own token is answered (PermissionDenied for an org key,
        NotFound for another agent's token or no such secret, ClaimRequired without a live
        claim)."""
        return Req(
            {
                "agent_id": agent_id,
                "thread_id": thread_id,
                "trigger_seq": trigger_seq,
                "runner_id": runner_id,
                "name": name,
            }
        )

    @endpoint("POST", "/runners/triage", TriageRouted.model_validate)
    def triage(
        self,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
        *,
        answer: str | None = None,
    ) -> Req:
        """Route the intake request ``trigger_seq`` of ``thread_id`` for ``agent_id``'s triage
        routine with ``answer``, the model's classification (None: the keywords decide); the
        server forwards it and replies in intake. Needs a live claim of ``runner_id``
        (ClaimRequired otherwise; ClaimHeld, ClaimDone as :meth:`claim`); InvalidRequest when
        the envelope is no request of a triage routine of the agent."""
        return Req(
            {
                "agent_id": agent_id,
                "thread_id": thread_id,
                "trigger_seq": trigger_seq,
                "runner_id": runner_id,
                "answer": answer,
            }
        )

    @endpoint("POST", "/claims/release", ReleasedClaims.model_validate)
    def release(self, runner_id: str) -> Req:
        """End the live leases ``runner_id`` holds on this credential's agents (a runner
        stopping cleanly), so other runners take those triggers over at once."""
        return Req({"runner_id": runner_id})

    @endpoint("GET", "/claims/done", DoneTriggers.model_validate)
    def done(self, agent_id: str, thread_id: str) -> Req:
        """The trigger seqs of a thread that are done for an agent."""
        return Req(params={"agent_id": agent_id, "thread_id": thread_id})


ENDPOINTS.append(Endpoint("GET", "/health", "AsyncClient.health"))

__all__ = [
    "API_PREFIX",
    "ENDPOINTS",
    "UNSET",
    "AsyncClient",
    "Endpoint",
    "Req",
    "decode",
    "endpoint",
    "raise_for_error",
]
