"""A protocol thread's lifecycle as its participants drive it: ack, reject, close, workflow
context and tools, chain verification (the adapters' rules: agent_network.protocol)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from agent_network.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolViolationError,
)
from agent_network.hub import VerifyReport
from agent_network.model.envelope import Envelope
from agent_network.protocol import (
    tools_for,
)
from agent_network.protocol.events import (
    EV_CONTEXT_SET,
    EV_THREAD_ACK,
    EV_THREAD_CLOSED,
    EV_THREAD_CLOSING,
    EV_THREAD_REJECT,
)
from agent_network.services.base import record
from agent_network.services.posting import MAX_TOOL_CALLS_JSON, PostPath, _sender_for
from agent_network.services.principal import Principal
from agent_network.services.roles import require, standing
from agent_network.services.scope import (
    system_sender,
    visible_thread,
)
from agent_network.services.thread_reads import ThreadReads
from agent_network.store.engine import write_transaction
from agent_network.store.tables import (
    thread_participants,
)


class ThreadLifecycle(ThreadReads, PostPath):
    """Lifecycle calls; mixed into :class:`~agent_network.services.threads.ThreadService`."""

    async def ack(
        self,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """Accept an invitation to a protocol thread as one of the caller's own agents or users
        (exactly one; a user/agent token acts as itself): a ``thread.ack`` envelope. The last
        pending ack makes the thread ``active``. Returns the thread as :meth:`get`.

        Raises NotFoundError (thread or sender outside scope), PermissionDeniedError (not the
        token's own subject, not a member), InvalidRequestError (not exactly one sender),
        ProtocolViolationError (409: no pending invitation for this sender), ThreadClosedError.
        """
        await self._lifecycle(principal, thread_id, EV_THREAD_ACK, {}, agent_id, user_id)
        return await self.get(principal, thread_id)

    async def reject(
        self,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Decline an invitation (a ``thread.reject`` envelope with the optional ``reason``, at
        most 200 characters): the thread moves to ``closing`` with ``invite_rejected`` and then
        closes. Same senders and errors as :meth:`ack`."""
        data = {"reason": reason} if reason is not None else {}
        await self._lifecycle(principal, thread_id, EV_THREAD_REJECT, data, agent_id, user_id)
        return await self.get(principal, thread_id)

    async def close(
        self, principal: Principal, thread_id: str, *, reason: str | None = None
    ) -> dict[str, Any]:
        """Close a thread; ``reason`` (at most 200 characters, default ``closed``) becomes its
        ``close_reason``. Returns the thread as :meth:`get`.

        A protocol thread: a participant (its user/agent token) or an org key of an org that
        has a participant writes ``thread.closing`` (sender: the participant, or the org as
        ``system``); the hub's sweeper then writes ``thread.closed``. An open thread: the org
        that created it or hosts its team/network (an org key, or a user token with role admin
        there) writes ``thread.closed`` at once. Raises NotFoundError outside scope,
        PermissionDeniedError (not allowed to close it), ProtocolViolationError (409: a token
        whose subject is not a participant), ThreadClosedError (409: already closing or
        closed), InvalidRequestError (bad reason).
        """
        data = {"reason": reason} if reason is not None else {}
        async with self.ctx.engine.connect() as conn:
            row, team = await visible_thread(conn, principal, thread_id)
            org_part = await self._org_participants(conn, principal, thread_id)
            who = await standing(conn, principal, team)
        state = await self.ctx.hub.state(thread_id)
        acted_by = (principal.kind, principal.key_id)
        if not state.participants:
            if principal.org_id not in (row["org_id"], team["org_id"]):
                raise PermissionDeniedError(
                    "closing an open thread is for the org that created it or hosts its "
                    f"{team['kind']}"
                )
            require(who, "admin", "closing open threads of", team)
            await self.ctx.hub.append(
                thread_id,
                type=EV_THREAD_CLOSED,
                data=data,
                sender=system_sender(principal),
                acted_by=acted_by,
            )
        elif principal.is_member_scoped:
            await self._lifecycle(principal, thread_id, EV_THREAD_CLOSING, data, None, None)
        else:
            if not org_part:
                raise PermissionDeniedError(
                    "only a participant of this thread, or an org key of an org with a "
                    "participant, may close it"
                )
            await self.ctx.hub.append(
                thread_id,
                type=EV_THREAD_CLOSING,
                data=data,
                sender=system_sender(principal),
                acted_by=acted_by,
            )
        async with write_transaction(self.ctx.engine) as conn:
            await record(conn, principal, "thread.close", "thread", thread_id, data=data or None)
        return await self.get(principal, thread_id)

    async def set_context(
        self,
        principal: Principal,
        thread_id: str,
        values: Mapping[str, Any],
        *,
        agent_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        """Set workflow context keys (a ``context.set`` envelope, data ``{"values": {key: JSON
        value}}``); the turn does not advance. The sender is one of the caller's own
        participants: a token's own subject, or for an org key ``agent_id``/``user_id`` (may be
        left out when exactly one of the org's agents/users takes part). Returns the thread as
        :meth:`get` (its ``context`` updated).

        Raises InvalidRequestError (empty values, keys that are not non-empty strings, more
        than 64 000 characters of JSON, no sender named when the org has several
        participants), ProtocolViolationError (409: not a workflow thread / not a participant),
        NotFoundError, PermissionDeniedError, ThreadClosedError as :meth:`ack`.
        """
        if not isinstance(values, Mapping) or not values:
            raise InvalidRequestError("values must be a non-empty object {key: JSON value}")
        try:
            size = len(json.dumps(dict(values), allow_nan=False))
        except (TypeError, ValueError):
            raise InvalidRequestError("context values must be JSON") from None
        if size > MAX_TOOL_CALLS_JSON:
            raise InvalidRequestError(f"context values exceed {MAX_TOOL_CALLS_JSON} characters")
        if not principal.is_member_scoped and agent_id is None and user_id is None:
            async with self.ctx.engine.connect() as conn:
                await visible_thread(conn, principal, thread_id)
                mine = await self._org_participants(conn, principal, thread_id)
            if len(mine) != 1:
                raise InvalidRequestError(
                    "name the sender with agent_id or user_id (your org has "
                    f"{len(mine)} participants in this thread)"
                )
            kind, pid = mine[0]
            agent_id, user_id = (pid, None) if kind == "agent" else (None, pid)
        await self._lifecycle(
            principal, thread_id, EV_CONTEXT_SET, {"values": dict(values)}, agent_id, user_id
        )
        return await self.get(principal, thread_id)

    async def tools(
        self, principal: Principal, thread_id: str, *, agent_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The workflow tools (``ToolSpec.to_data()``: name, description, speakers, handoff,
        finish) the caller's agent ``agent_id`` gets in this thread now (an agent token: its
        own agent, ``agent_id`` optional); ``[]`` outside workflow threads or while the thread
        is not active. Raises NotFoundError (thread/agent outside scope),
        PermissionDeniedError (not the token's own agent, not a member), InvalidRequestError
        (an org key without ``agent_id``) — the thread is checked first: out of scope is 404."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)  # scope first: 404 before 403/422
        if principal.kind == "user":
            raise PermissionDeniedError("workflow tools are for agents; use an agent token")
        if principal.kind == "org" and agent_id is None:
            raise InvalidRequestError("agent_id: name the agent whose tools you want")
        agent, _ = _sender_for(principal, agent_id, None)
        assert agent is not None
        async with self.ctx.engine.connect() as conn:
            grant = await self._checked_grant(conn, principal, thread_id, agent, None, None)
        state = await self.ctx.hub.state(thread_id)
        return [t.to_data() for t in tools_for(state, grant.sender)]

    async def _lifecycle(
        self,
        principal: Principal,
        thread_id: str,
        kind: str,
        data: dict[str, Any],
        agent_id: str | None,
        user_id: str | None,
    ) -> Envelope:
        """Append a lifecycle envelope of ``kind`` as one of the caller's own agents/users
        after the scope checks of a post (refusals before the hub are audited like a post's)."""
        try:
            agent_id, user_id = _sender_for(principal, agent_id, user_id)
            async with self.ctx.engine.connect() as conn:
                grant = await self._checked_grant(
                    conn, principal, thread_id, agent_id, user_id, None
                )
        except (NotFoundError, PermissionDeniedError, InvalidRequestError) as err:
            await self._audit_refused_post(principal, thread_id, err, f"envelope.{kind}")
            raise
        if kind == EV_CONTEXT_SET and not (await self.ctx.hub.state(thread_id)).participants:
            # (after the scope checks: a thread outside scope must look missing)
            raise ProtocolViolationError("context is for workflow threads; this one is open")
        return await self.ctx.hub.append(
            thread_id,
            type=kind,
            data=data,
            sender=grant.sender,
            acted_by=(principal.kind, principal.key_id),
        )

    @staticmethod
    async def _org_participants(
        conn: AsyncConnection, principal: Principal, thread_id: str
    ) -> list[tuple[str, str]]:
        """``(kind, id)`` of the participants of ``thread_id`` from the caller's org."""
        if principal.org_id is None:
            return []
        q = (
            select(thread_participants.c.member_kind, thread_participants.c.member_id)
            .where(
                thread_participants.c.thread_id == thread_id,
                thread_participants.c.org_id == principal.org_id,
            )
            .order_by(thread_participants.c.created_at)
        )
        return [(str(k), str(m)) for k, m in await conn.execute(q)]

    async def verify(self, principal: Principal, thread_id: str) -> VerifyReport:
        """Recompute the thread's hash chain (any member org may verify shared history)."""
        async with self.ctx.engine.connect() as conn:
            await visible_thread(conn, principal, thread_id)
        return await self.ctx.hub.verify(thread_id)
