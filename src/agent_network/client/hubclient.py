"""Hub clients: a Python API for code-defined agents and people.

The shape follows the hub-and-channel seed (``003``): a :class:`HubClient` per process holds one
*link* to the hub and registers agents (:class:`Passport`, :class:`Resume`, rule) as
:class:`AgentClient` objects, which open threads, send envelopes with an audience, handle
incoming envelopes with a callback, wait for an event and read the WAL. A
:class:`HumanClient` is a participant without a model: push (``on_envelope``) and pull
(:meth:`HumanClient.next_envelope`).

Two links, one API (switching is one constructor argument)::

    async with EmbeddedLink.open("net.db") as link:       # the platform in this process
        ...
    async with WsLink.connect(url, org_key) as link:      # a remote server over WebSocket
        ...
    async with HubClient(link) as hc:
        alice = await hc.register(Passport(name="alice"), handler=answer)

- ``EmbeddedLink`` (``agent_network.api.embedded``, part of the server, not of this SDK) runs
  the whole server in this process with no socket: REST calls go through the ASGI app in memory
  and live envelopes come from the hub's subscription. It is the default for tests, notebooks
  and single-process deployments.
- :class:`WsLink` talks to a remote server: REST over HTTP, live envelopes over the WebSocket
  protocol (``docs/protocol.md``, the ``watch`` frame) with reconnect and resume.

A HubClient takes any object with the :class:`Link` interface; this module never imports the
server.

Every agent and person acts with **its own** token (issued by the org key when registered and
revoked when the HubClient closes), so an AgentClient can only ever act as itself and sees only
the threads its agent takes part in — exactly what a remote runner would see. The tokens expire
(``token_ttl``, default 15 minutes) and the HubClient renews them while it runs, so a process
killed with SIGKILL leaves no token that works for longer than that.

Protocol threads (``docs/protocols.md``): :meth:`AgentClient.open` takes ``adapter``
(``consulting``, ``conversation``, ``discussion``, ``workflow``...), ``ttl``, ``ack_timeout``,
``expectations`` and a workflow ``graph``; invited agents ack automatically when their rule
admits the adapter and the initiator, people with :meth:`HumanClient.ack` /
:meth:`HumanClient.reject` (or automatically with their ``auto_ack`` setting); either side
closes with ``close``. :meth:`Channel.send` takes an ``audience`` and workflow ``tool_calls``;
:meth:`Channel.info` shows the protocol state (status, pending acks, expected speaker, close
reason, workflow turns and context). The hub refuses what the protocol does not allow (e.g.
``NotYourTurn``); a handler's refused reply is logged, not raised.

Delivery is pushed, never polled: each agent and person receives every thread it may read from
its own :class:`Inbox` on the link (threads others add it to later included), and a worker per
thread hands the envelopes to its handler in order, ending after ``thread.closed``. Delivery is
at-least-once and resumable: the inbox resumes each thread after a durable cursor named
``hubclient``; an envelope is acknowledged after its handler returned, in batches (at most every
``ACK_DELAY`` seconds, and on exit), so a crashed process resumes after the last acknowledged
envelope. Replies are idempotent on (agent, trigger) — the key
``reply:<agent id>:<trigger envelope id>`` — so a redelivered trigger never produces a second
reply. Design: docs/architecture.md, "Hub clients: push, not poll".
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import BaseModel

from agent_network.client.errors import (
    ApiError,
    ClientError,
    NotFound,
    TransportError,
    Unauthenticated,
)
from agent_network.client.models import Agent, Envelope, Resume, Thread, Tool, User
from agent_network.client.rest import AsyncClient, ParticipantSpec, ThreadOptions

log = logging.getLogger(__name__)

HUBCLIENT_CURSOR = "hubclient"
ACK_DELAY = 0.25  # seconds: handled envelopes are acknowledged in batches at most this often
KEEP_THREADS = 1000  # threads whose received envelopes a participant keeps for wait_for
KEEP_POSITIONS = 100_000  # threads whose last received seq a participant remembers
DEFAULT_TEAM = "hub"
TOKEN_TTL = 900.0  # seconds a HubClient's tokens live without renewal (renewed every 300 s)

Handler = Callable[["Envelope", "Channel"], "str | Awaitable[str | None] | None"]
EnvelopeCallback = Callable[["Envelope"], "Awaitable[None] | None"]


class Passport(BaseModel):
    """An agent's stable identity: ``name`` (shown in threads), ``lookup_key`` (unique in the
    org; default: ``name`` lower-cased with spaces as dashes), ``identity`` (its system prompt),
    ``model`` (for its routines; ``None``: the server default)."""

    name: str
    lookup_key: str | None = None
    identity: str = ""
    model: str | None = None

    def key(self) -> str:
        """The lookup key registration uses."""
        return self.lookup_key or "-".join(self.name.lower().split())


def _stored_resume(agent: Agent) -> Resume:
    """The resume stored for ``agent``: its ``resume`` field, else the ``metadata.resume`` of
    agents registered before resumes had a field of their own, else an empty one."""
    if agent.resume is not None:
        stored = agent.resume
        return Resume(
            capabilities=stored.capabilities, domains=stored.domains, summary=stored.summary
        )
    old = agent.metadata.get("resume")
    if isinstance(old, dict):
        with contextlib.suppress(ValueError):
            return Resume.model_validate(
                {k: v for k, v in old.items() if k in ("capabilities", "domains", "summary")}
            )
    return Resume()


# --------------------------------------------------------------------------- links


class Inbox(Protocol):
    """What a link pushes to one credential: every envelope of every thread it may read.

    ``receive()`` waits for the next envelopes (at least one; in ``seq`` order per thread,
    without gap or duplicate; threads the credential is given access to later included, from
    their durable cursor); ``ack(positions)`` moves the durable cursor of each thread named to
    its seq, in one call. Failures as for :class:`Link`; ``Unauthenticated`` once the
    credential was revoked or expired.
    """

    async def receive(self) -> list[Envelope]: ...

    async def ack(self, positions: Mapping[str, int]) -> None: ...


class Link(Protocol):
    """What a HubClient needs from a transport.

    ``rest(token)`` is a REST client acting with ``token``; ``inbox(token, cursor)`` an async
    context manager yielding the :class:`Inbox` of ``token``, resuming each thread after the
    durable ``cursor``; ``follow`` yields the envelopes of ``thread_id`` visible to ``token``
    with ``seq > after`` (or after the durable ``cursor``), in order, forever; ``ack`` moves that
    cursor; ``post`` posts a message as ``token``'s own subject (``POST
    /threads/{id}/messages``) and ``create_thread`` opens a thread in a team (``POST
    /teams/{id}/threads``; both without HTTP over the embedded link); ``token`` is the org key
    the link was opened with. Failures are SDK errors
    (:class:`~agent_network.client.ApiError` subclasses,
    :class:`~agent_network.client.TransportError`) or ``OSError``/``httpx.HTTPError``.
    Implementations: :class:`WsLink` here, ``agent_network.api.embedded.EmbeddedLink`` on the
    server side (the platform in process).
    """

    token: str

    def rest(self, token: str) -> AsyncClient: ...

    def inbox(self, token: str, cursor: str) -> contextlib.AbstractAsyncContextManager[Inbox]: ...

    def follow(
        self, token: str, thread_id: str, *, after: int | None = None, cursor: str | None = None
    ) -> AsyncIterator[Envelope]: ...

    async def ack(self, token: str, thread_id: str, seq: int, cursor: str) -> None: ...

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
    ) -> Envelope: ...

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
    ) -> Thread: ...


class WsLink:
    """A remote server: REST over HTTP and live envelopes over its WebSocket endpoint.

    Open it with :meth:`connect` (``url`` the server root such as ``http://127.0.0.1:8321``,
    ``token`` an org key). One realtime connection per token, opened on first use by a task the
    link owns (so it is entered and left in the same task), all closed on exit.
    """

    def __init__(self, url: str, token: str, tg: TaskGroup) -> None:
        self.url = url
        self.token = token
        self._tg = tg
        self._clients: dict[str, AsyncClient] = {}
        self._realtimes: dict[str, Any] = {}
        self._lock = anyio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, token: str) -> AsyncIterator[WsLink]:
        """Yield a link to the server at ``url``; every connection closes on exit."""
        async with anyio.create_task_group() as tg:
            link = cls(url, token, tg)
            try:
                yield link
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    for client in link._clients.values():
                        await client.aclose()

    def rest(self, token: str) -> AsyncClient:
        """The REST client acting with ``token`` (one per token, closed with the link)."""
        client = self._clients.get(token)
        if client is None:
            client = AsyncClient(self.url, token)
            self._clients[token] = client
        return client

    async def _realtime(self, token: str) -> Any:
        async with self._lock:
            rt = self._realtimes.get(token)
            if rt is None:
                rt = await self._tg.start(self._hold_realtime, token)
                self._realtimes[token] = rt
            return rt

    async def _hold_realtime(
        self, token: str, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.rest(token).realtime() as rt:
            task_status.started(rt)
            await anyio.sleep_forever()

    async def follow(
        self, token: str, thread_id: str, *, after: int | None = None, cursor: str | None = None
    ) -> AsyncIterator[Envelope]:
        """Join the thread over the WebSocket (resuming from ``after`` or ``cursor``)."""
        rt = await self._realtime(token)
        room = await (
            rt.join(thread_id, after=after)
            if after is not None or cursor is None
            else rt.join(thread_id, cursor=cursor)
        )
        async for env in room:
            yield env

    @contextlib.asynccontextmanager
    async def inbox(self, token: str, cursor: str) -> AsyncIterator[Inbox]:
        """The :class:`Inbox` of ``token``: the ``watch`` of its realtime connection on the
        durable ``cursor`` (every thread it may read, pushed; docs/protocol.md)."""
        rt = await self._realtime(token)
        yield await rt.watch(cursor)

    async def ack(self, token: str, thread_id: str, seq: int, cursor: str) -> None:
        """Acknowledge over the WebSocket (the cursor the thread was joined with)."""
        rt = await self._realtime(token)
        room = rt.rooms.get(thread_id)
        if room is not None:
            await room.ack(seq, cursor=cursor)

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
        """Post over REST (``POST /threads/{thread_id}/messages``) with ``token``."""
        return await self.rest(token).threads.post(
            thread_id,
            content,
            idempotency_key=idempotency_key,
            causation_id=causation_id,
            audience=audience,
            tool_calls=tool_calls,
        )

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
        """Open a thread over REST (``POST /teams/{team_id}/threads``) with ``token``."""
        return await self.rest(token).teams.create_thread(
            team_id,
            title,
            agent_budget=agent_budget,
            visibility=visibility,
            participants=participants,
            **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
        )


# --------------------------------------------------------------------------- channels


@dataclass
class Channel:
    """A thread as one participant sees it: send into it, close it, read its WAL."""

    thread_id: str
    _owner: _Participant

    async def send(
        self,
        text: str,
        *,
        audience: Iterable[str] | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        tool_calls: Iterable[Mapping[str, Any]] | None = None,
    ) -> Envelope:
        """Post ``text`` as the owner; returns the stored envelope. ``audience`` (ids of
        participants) limits who receives it; ``tool_calls`` (``[{name, args?, result?}]``)
        carry workflow tool results (a Handoff/Finish routes the workflow)."""
        return await self._owner.send(
            self.thread_id,
            text,
            audience=audience,
            idempotency_key=idempotency_key,
            causation_id=causation_id,
            tool_calls=tool_calls,
        )

    async def read(self) -> list[Envelope]:
        """Every envelope of the thread visible to the owner, in order."""
        return await self._owner.read_wal(self.thread_id)

    async def info(self) -> Thread:
        """The thread with its folded state: ``status``, ``last_seq``, and the protocol state
        (``adapter``, ``participants``, ``initiator``, ``pending_acks``, ``expected_speaker``,
        ``close_reason``; workflow ``turns`` and ``context``)."""
        return await self._owner.rest.threads.get(self.thread_id)

    async def close(self, reason: str | None = None) -> Thread:
        """Close the thread as the owner (see :meth:`_Participant.close`)."""
        return await self._owner.close(self.thread_id, reason)

    async def set_context(self, values: Mapping[str, Any]) -> Thread:
        """Set workflow context keys as the owner (the turn does not advance)."""
        return await self._owner.rest.threads.set_context(self.thread_id, values)

    async def tools(self) -> list[Tool]:
        """The workflow tools the owner (an agent) gets in this thread now."""
        return await self._owner.rest.threads.tools(self.thread_id)


# --------------------------------------------------------------------------- participants


@dataclass(eq=False)
class _Participant:
    """What agents and people share: a token, the threads they follow, waiters."""

    hub: HubClient
    kind: str  # "agent" | "user"
    id: str
    name: str
    token: str
    credential_id: str
    _waiters: list[tuple[str | None, Callable[[Envelope], bool], anyio.Event, list[Envelope]]] = (
        field(default_factory=list)
    )
    # per thread: the envelopes received in this session (recent threads only, for wait_for),
    # the last seq handed to its worker, the worker's queue, and handled seqs not yet acked
    _seen: OrderedDict[str, list[Envelope]] = field(default_factory=OrderedDict)
    _queued: dict[str, int] = field(default_factory=dict)
    _queues: dict[str, MemoryObjectSendStream[Envelope]] = field(default_factory=dict)
    _acks: dict[str, int] = field(default_factory=dict)
    _ack_wanted: anyio.Event = field(default_factory=anyio.Event)

    @property
    def rest(self) -> AsyncClient:
        """REST client acting with this participant's own token."""
        return self.hub.link.rest(self.token)

    def channel(self, thread_id: str) -> Channel:
        """A handle on an existing thread."""
        return Channel(thread_id, self)

    async def send(
        self,
        thread_id: str,
        text: str,
        *,
        audience: Iterable[str] | None = None,
        idempotency_key: str | None = None,
        causation_id: str | None = None,
        tool_calls: Iterable[Mapping[str, Any]] | None = None,
    ) -> Envelope:
        """Post ``text`` into ``thread_id`` as this participant (its own token); ``audience``
        and ``tool_calls`` as in :meth:`Channel.send`."""
        return await self.hub.link.post(
            self.token,
            thread_id,
            text,
            idempotency_key=idempotency_key,
            causation_id=causation_id,
            audience=audience,
            tool_calls=tool_calls,
        )

    async def close(self, thread_id: str, reason: str | None = None) -> Thread:
        """Close ``thread_id`` as this participant (``reason``: its ``close_reason``, default
        ``closed``). A protocol thread moves to ``closing`` and then ``closed``.
        ProtocolViolation when this participant does not take part, ThreadClosed when it is
        already closing or closed."""
        return await self.rest.threads.close(thread_id, reason=reason)

    async def read_wal(self, thread_id: str) -> list[Envelope]:
        """Every envelope of ``thread_id`` this participant may see, in ``seq`` order."""
        return [e async for e in self.rest.threads.history(thread_id)]

    async def threads(self) -> list[Thread]:
        """The threads this participant takes part in (its token's scope)."""
        return list(await self.rest.threads.list())

    async def wait_for(
        self,
        thread_id: str | None,
        predicate: Callable[[Envelope], bool],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 (a deadline for the caller, in seconds)
    ) -> Envelope:
        """The first envelope (already stored or arriving) of ``thread_id`` (any thread
        when ``None``: arriving ones only) for which ``predicate`` is true. TimeoutError after
        ``timeout`` seconds.

        It waits on what this participant's inbox receives; the stored envelopes are those
        received in this session, so the WAL is read (once) only when they do not start at the
        thread's first envelope (a thread resumed from a durable cursor, or not seen yet)."""
        box: list[Envelope] = []
        event = anyio.Event()
        entry = (thread_id, predicate, event, box)
        self._waiters.append(entry)
        try:
            if thread_id is not None:
                seen = self._seen.get(thread_id)
                stored = list(seen) if seen and seen[0].seq == 1 else None
                if stored is None:
                    stored = await self.read_wal(thread_id)
                found = next((e for e in stored if predicate(e)), None)
                if found is not None:
                    return found
            with anyio.fail_after(timeout):
                await event.wait()
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return box[0]

    def _received(self, env: Envelope) -> bool:
        """Record ``env`` from the inbox and wake the waiters it satisfies; False when it was
        handed over before (a redelivery after a reconnect)."""
        thread_id = env.thread_id
        if env.seq <= self._queued.get(thread_id, 0):
            return False
        if thread_id not in self._queued and len(self._queued) >= KEEP_POSITIONS:
            del self._queued[next(iter(self._queued))]  # the thread seen first (long closed)
        self._queued[thread_id] = env.seq
        seen = self._seen.get(thread_id)
        if seen is None:
            seen = self._seen[thread_id] = []
            while len(self._seen) > KEEP_THREADS:
                self._seen.popitem(last=False)
        seen.append(env)
        for waited, predicate, event, box in list(self._waiters):
            if (waited is None or waited == thread_id) and not box and predicate(env):
                box.append(env)
                event.set()
        return True

    def _handled(self, env: Envelope) -> None:
        """``env`` was handled: acknowledge it with the next batch."""
        self._acks[env.thread_id] = max(env.seq, self._acks.get(env.thread_id, 0))
        self._ack_wanted.set()

    async def _handle(self, env: Envelope) -> None:
        return None


@dataclass(eq=False)
class AgentClient(_Participant):
    """A registered agent acting with its own agent token (see the module docstring).

    ``handler(envelope, channel)`` (sync or async) is called for every message from someone
    else in the agent's threads; a returned string is posted as the agent's reply with the
    trigger as causation (once per trigger, even after a redelivery).
    """

    passport: Passport = field(default_factory=lambda: Passport(name=""))
    resume: Resume = field(default_factory=Resume)
    handler: Handler | None = None

    @property
    def agent_id(self) -> str:
        """The agent's id (its passport's immutable id)."""
        return self.id

    async def open(
        self,
        title: str,
        *,
        target: str | Iterable[str] = (),
        adapter: str = "open",
        ttl: float | None = None,
        ack_timeout: float | None = None,
        expectations: Iterable[Any] = (),
        graph: Any = None,
        restricted: bool = True,
        team_id: str | None = None,
        **knobs: Any,
    ) -> Channel:
        """Open a thread with ``target`` (agent names, lookup keys or ids of agents registered
        in this org) in the HubClient's team (or ``team_id``); ``restricted`` (default) makes
        it visible to these participants only. This agent is the initiator and the first
        participant, the targets follow in order.

        ``adapter`` (default ``open``) picks the protocol (``conversation``, ``consulting``,
        ``discussion``, ``workflow``...); ``ttl``/``ack_timeout`` are seconds,
        ``expectations`` Expectations (``agent_network.protocol.reply_within(...)``) or their
        dicts, ``graph`` a TransitionGraph (or its dict) for a workflow, whose targets may use
        the agents' names; ``knobs`` pass further fields of the thread: ``invitees`` (default
        every target), ``names``, ``order`` (discussion), ``agent_budget``, and any other
        adapter knob. Its participants receive it through their inboxes (pushed, no polling).
        InvalidRequest (nothing opened) for bad knobs; NotFound for an unknown target.
        """
        names = [target] if isinstance(target, str) else list(target)
        agent_ids = await self.hub._resolve_agents(names)
        team = team_id or await self.hub._team()
        fields = {
            k: knobs.pop(k) for k in ("invitees", "names", "order", "agent_budget") if k in knobs
        }
        participants: list[ParticipantSpec] = [
            ("agent", self.id),
            *(("agent", a) for a in agent_ids),
        ]
        agent_budget = fields.pop("agent_budget", None)
        thread = await self.hub.link.create_thread(
            self.hub.link.token,
            team,
            title,
            agent_budget=agent_budget,
            visibility="restricted" if restricted else "members",
            participants=participants,
            options=ThreadOptions(
                adapter=adapter,
                initiator=("agent", self.id) if adapter != "open" else None,
                ttl=ttl,
                ack_timeout=ack_timeout,
                expectations=expectations,
                graph=graph,
                knobs=knobs or None,
                **fields,
            ),
        )
        return Channel(thread.id, self)

    async def _handle(self, env: Envelope) -> None:
        if self.handler is None or env.type != "message" or env.sender.id == self.id:
            return
        result = self.handler(env, Channel(env.thread_id, self))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str) and result.strip():
            try:
                await self.send(
                    env.thread_id,
                    result,
                    idempotency_key=f"reply:{self.id}:{env.id}",
                    causation_id=env.id,
                )
            except ApiError as err:  # refused (budget, rule, closed): recorded by the server
                log.info("hubclient.reply_refused agent=%s code=%s", self.name, err.code)


@dataclass(eq=False)
class HumanClient(_Participant):
    """A person in the network: no model; the UI drives it by push or pull.

    Push: ``on_envelope(callback)``; pull: :meth:`next_envelope`. Envelopes from every thread
    the person takes part in arrive (its own posts included, so a UI can render them). The
    pull inbox holds ``INBOX`` envelopes; beyond that, pull misses newer ones (push does not).
    """

    INBOX = 10_000
    _callbacks: list[EnvelopeCallback] = field(default_factory=list)
    _inbox: tuple[MemoryObjectSendStream[Envelope], MemoryObjectReceiveStream[Envelope]] = field(
        default_factory=lambda: anyio.create_memory_object_stream[Envelope](10_000)
    )

    @property
    def user_id(self) -> str:
        """The person's user id."""
        return self.id

    async def ack(self, thread_id: str) -> Thread:
        """Accept this person's invitation to a protocol thread (the last ack makes it
        ``active``); ProtocolViolation without a pending invitation."""
        return await self.rest.threads.ack(thread_id)

    async def reject(self, thread_id: str, reason: str | None = None) -> Thread:
        """Decline this person's invitation: the thread closes with ``invite_rejected``."""
        return await self.rest.threads.reject(thread_id, reason=reason)

    def on_envelope(self, callback: EnvelopeCallback) -> None:
        """Call ``callback(envelope)`` (sync or async) for every envelope delivered."""
        self._callbacks.append(callback)

    async def next_envelope(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline for the caller, in seconds)
    ) -> Envelope:
        """The next delivered envelope (pull); TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            env: Envelope = await self._inbox[1].receive()
        return env

    async def _handle(self, env: Envelope) -> None:
        with contextlib.suppress(anyio.WouldBlock):
            self._inbox[0].send_nowait(env)
        for callback in list(self._callbacks):
            result = callback(env)
            if inspect.isawaitable(result):
                await result


# --------------------------------------------------------------------------- hub client


class HubClient:
    """One process's connection to the hub through ``link`` (any :class:`Link`: a
    :class:`WsLink`, or the server's ``EmbeddedLink``), acting for the org whose key the link
    holds.

    Use as ``async with HubClient(link) as hc``. Agents and people it registers join the team
    ``team`` (created if missing) so they can open threads with each other. Each of them
    receives its envelopes from its own :class:`Inbox` on the link (pushed: every thread it may
    read, including threads others add it to later; nothing polls), handled per thread in
    order by a worker that ends after ``thread.closed``; handled envelopes are acknowledged in
    batches (at most every ``ACK_DELAY`` seconds, and on exit). ``discover`` is ignored (kept
    so older callers still work: threads are no longer discovered by polling). The tokens it
    issues expire after ``token_ttl`` seconds (None: never) and it renews them every third of
    that while it runs, so the tokens of a process killed with SIGKILL stop working on their
    own within ``token_ttl``. On exit every task is cancelled and awaited, the acknowledgements
    due are written and every token it issued is revoked.
    """

    def __init__(
        self,
        link: Link,
        *,
        team: str = DEFAULT_TEAM,
        discover: float = 1.0,
        token_ttl: float | None = TOKEN_TTL,
    ) -> None:
        if token_ttl is not None and not 3 <= token_ttl <= 86400:
            raise ValueError("token_ttl must be between 3 and 86400 seconds, or None")
        self.link = link
        self.team_name = team
        self.discover_every = discover
        self.token_ttl = token_ttl
        self.agents: dict[str, AgentClient] = {}
        self.humans: dict[str, HumanClient] = {}
        self._team_id: str | None = None
        self._tg: TaskGroup | None = None
        self._tg_cm: Any = None

    @property
    def rest(self) -> AsyncClient:
        """REST client acting with the org key."""
        return self.link.rest(self.link.token)

    async def __aenter__(self) -> Self:
        self._tg_cm = anyio.create_task_group()
        self._tg = await self._tg_cm.__aenter__()
        if self.token_ttl is not None:
            self._tg.start_soon(self._renew_loop, self.token_ttl)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                for who in [*self.agents.values(), *self.humans.values()]:
                    with contextlib.suppress(ApiError, Exception):
                        await self.rest.credentials.revoke(who.credential_id)

    # ------------------------------------------------------------------ registration

    async def register(
        self,
        passport: Passport,
        resume: Resume | None = None,
        rule: dict[str, Any] | None = None,
        *,
        handler: Handler | None = None,
    ) -> AgentClient:
        """Register an agent: reuse the org's agent with ``passport.key()`` (persistent
        identity) or create it; store ``resume`` (the agent's ``resume`` field; when None, an
        already-registered agent keeps its stored resume, read from ``metadata.resume`` for
        agents registered before resumes had their own field) and ``rule`` (a Rule as a dict,
        see ``agent_network.model.rule``); add it to the HubClient's team; issue its token.
        Returns the :class:`AgentClient`; ``handler`` as described there."""
        agent = await self._agent_by_key(passport.key())
        if agent is None:
            resume = resume or Resume()
            agent = await self.rest.agents.create(
                passport.name,
                passport.key(),
                identity=passport.identity,
                model=passport.model,
                resume=resume.model_dump(),
            )
        else:
            if resume is None:
                resume = _stored_resume(agent)
            agent = await self.rest.agents.update(
                agent.id,
                name=passport.name,
                identity=passport.identity,
                resume=resume.model_dump(),
            )
        if rule is not None:
            await self.rest.request("PUT", f"/agents/{agent.id}/rule", json=rule)
        await self._add_member("agent", agent.id)
        issued = await self.rest.credentials.issue(
            "agent_token",
            subject_id=agent.id,
            name=f"hubclient {passport.key()}",
            expires_in=self.token_ttl,
        )
        client = AgentClient(
            self,
            "agent",
            agent.id,
            agent.name,
            issued.secret,
            issued.credential.id,
            passport=passport,
            resume=resume,
            handler=handler,
        )
        self.agents[agent.id] = client
        await self._start_inbox(client)
        return client

    async def human(self, name: str, *, email: str | None = None) -> HumanClient:
        """Register a person: reuse the org's user called ``name`` or create it; add to the
        team; issue its token. Returns the :class:`HumanClient`."""
        users = [u for u in await self.rest.users.list() if u.name == name]
        user: User = users[0] if users else await self.rest.users.create(name, email=email)
        await self._add_member("user", user.id)
        issued = await self.rest.credentials.issue(
            "user_token", subject_id=user.id, name=f"hubclient {name}", expires_in=self.token_ttl
        )
        client = HumanClient(self, "user", user.id, user.name, issued.secret, issued.credential.id)
        self.humans[user.id] = client
        await self._start_inbox(client)
        return client

    async def read_wal(self, thread_id: str) -> list[Envelope]:
        """Every envelope of ``thread_id`` visible to the org key, in ``seq`` order."""
        return [e async for e in self.rest.threads.history(thread_id)]

    # ------------------------------------------------------------------ internals

    async def _renew_loop(self, ttl: float) -> None:
        """Every third of ``ttl``, move the expiry of every token issued here to ``ttl``
        seconds from now (a failed renewal is logged and tried again at the next round, two
        more before the token runs out)."""
        while True:
            await anyio.sleep(ttl / 3)
            for who in [*self.agents.values(), *self.humans.values()]:
                try:
                    await self.rest.credentials.renew(who.credential_id, ttl)
                except (ApiError, TransportError) as err:
                    log.warning("hubclient.renew_failed who=%s error=%s", who.name, err)

    async def _agent_by_key(self, key: str) -> Agent | None:
        return next((a for a in await self.rest.agents.list() if a.lookup_key == key), None)

    async def _resolve_agents(self, names: list[str]) -> list[str]:
        """The agent ids ``names`` stand for: an id of an agent registered here as is (no
        call), anything else looked up among the org's agents (id, lookup key or name)."""
        if all(name in self.agents for name in names):
            return list(names)
        agents = await self.rest.agents.list()
        out = []
        for name in names:
            found = [a for a in agents if name in (a.id, a.lookup_key, a.name)]
            if not found:
                raise NotFound(404, "not_found", f"no agent called {name!r} in this org")
            out.append(found[0].id)
        return out

    async def _team(self) -> str:
        if self._team_id is None:
            teams = [t for t in await self.rest.teams.list() if t.name == self.team_name]
            team = teams[0] if teams else await self.rest.teams.create(self.team_name)
            self._team_id = team.id
        return self._team_id

    async def _add_member(self, kind: str, member_id: str) -> None:
        team = await self._team()
        members = await self.rest.teams.members(team)
        if any(m.id == member_id for m in members):
            return
        if kind == "agent":
            await self.rest.teams.add_member(team, agent_id=member_id)
        else:
            await self.rest.teams.add_member(team, user_id=member_id)

    async def _start_inbox(self, who: _Participant) -> None:
        """Open ``who``'s inbox and start delivering from it; returns once it is open (its
        errors, such as a refused token, are raised here)."""
        assert self._tg is not None, "use the HubClient as an async context manager"
        await self._tg.start(self._pump, who)

    async def _pump(
        self, who: _Participant, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Take what ``who``'s inbox receives and hand it to the thread workers; reopen the
        inbox (1 s later) when the link fails; stop when the credential no longer works."""
        started = False
        while True:
            failure: BaseException | None = None
            try:
                async with (
                    self.link.inbox(who.token, HUBCLIENT_CURSOR) as inbox,
                    anyio.create_task_group() as tg,
                ):
                    tg.start_soon(self._acker, who, inbox)
                    if not started:
                        started = True
                        task_status.started()
                    try:
                        while True:
                            for env in await inbox.receive():
                                if who._received(env):
                                    self._queue(who, env)
                    except (ClientError, OSError, httpx.HTTPError) as err:
                        failure = err  # (inside: the task group would wrap it in a group)
                    tg.cancel_scope.cancel()
            except (ClientError, OSError, httpx.HTTPError) as err:
                if not started:
                    raise
                failure = err
            if isinstance(failure, Unauthenticated):
                log.info("hubclient.inbox_closed who=%s error=%s", who.name, failure)
                return
            log.info("hubclient.inbox_retry who=%s error=%r", who.name, failure)
            await anyio.sleep(1.0)

    def _queue(self, who: _Participant, env: Envelope) -> None:
        """Hand ``env`` to the worker of its thread (started on its first envelope)."""
        send = who._queues.get(env.thread_id)
        if send is None:
            assert self._tg is not None
            send, recv = anyio.create_memory_object_stream[Envelope](math.inf)
            who._queues[env.thread_id] = send
            self._tg.start_soon(self._worker, who, env.thread_id, recv)
        send.send_nowait(env)

    async def _worker(
        self, who: _Participant, thread_id: str, recv: MemoryObjectReceiveStream[Envelope]
    ) -> None:
        """Handle ``thread_id``'s envelopes for ``who`` one after another; end after
        ``thread.closed`` (nothing follows it)."""
        try:
            async with recv:
                async for env in recv:
                    try:
                        await who._handle(env)
                    except Exception:  # a failing handler must not stop the others
                        log.exception("hubclient.handler_failed who=%s seq=%s", who.name, env.seq)
                    who._handled(env)
                    if env.type == "thread.closed":
                        return
        finally:
            who._queues.pop(thread_id, None)

    async def _acker(self, who: _Participant, inbox: Inbox) -> None:
        """Acknowledge what ``who`` handled, in batches: at most every ``ACK_DELAY`` seconds,
        and once more when stopping (at-least-once: a crash redelivers at most that much)."""
        try:
            while True:
                await who._ack_wanted.wait()
                await anyio.sleep(ACK_DELAY)
                await self._flush_acks(who, inbox)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._flush_acks(who, inbox)

    @staticmethod
    async def _flush_acks(who: _Participant, inbox: Inbox) -> None:
        who._ack_wanted = anyio.Event()
        acks, who._acks = who._acks, {}
        if not acks:
            return
        try:
            await inbox.ack(acks)
        except ApiError as err:  # a thread lost meanwhile: keep the others
            log.info("hubclient.ack_failed who=%s error=%s", who.name, err)
            for thread_id, seq in acks.items():
                with contextlib.suppress(ApiError):
                    await inbox.ack({thread_id: seq})
        except (ClientError, OSError, httpx.HTTPError):  # the link failed: with the next batch
            for thread_id, seq in acks.items():
                who._acks[thread_id] = max(seq, who._acks.get(thread_id, 0))


__all__ = [
    "AgentClient",
    "Channel",
    "HubClient",
    "HumanClient",
    "Inbox",
    "Link",
    "Passport",
    "Resume",
    "WsLink",
]
