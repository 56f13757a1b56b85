"""Reading threads: the thread list, one thread's description, and its envelopes with the
audience applied (stubs for the hidden ones)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import anyio
from sqlalchemy import select

from agent_network.errors import (
    InvalidRequestError,
)
from agent_network.model.envelope import Envelope
from agent_network.protocol.adapters.workflow import WorkflowState
from agent_network.protocol.events import (
    EV_MESSAGE,
)
from agent_network.protocol.state import ThreadState
from agent_network.services.base import ServiceContext
from agent_network.services.paging import Key, keyset
from agent_network.services.principal import Principal
from agent_network.services.rendering import _display_names, render, render_stub
from agent_network.services.rules import RuleService
from agent_network.services.scope import (
    audience_admits,
    credential_in_force,
    org_member_ids,
    team_visible_to,
    thread_readable,
    visible_team,
    visible_thread,
)
from agent_network.store.tables import (
    teams,
    thread_participants,
    threads,
)
from agent_network.store.wal import read_envelopes


class ThreadReads:
    """Thread reads; mixed into :class:`~agent_network.services.threads.ThreadService`."""

    ctx: ServiceContext
    rules: RuleService

    async def list_threads(
        self,
        principal: Principal,
        team_id: str | None = None,
        *,
        after: Key | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Threads visible to the caller, optionally of one team/network, oldest first (a
        keyset page by ``(created_at, id)`` with ``after``/``limit``)."""
        async with self.ctx.engine.connect() as conn:
            q = (
                select(threads)
                .join(teams, teams.c.id == threads.c.team_id)
                .where(
                    threads.c.deleted_at.is_(None),
                    team_visible_to(principal),
                    thread_readable(principal),
                )
            )
            if team_id is not None:
                await visible_team(conn, principal, team_id)
                q = q.where(threads.c.team_id == team_id)
            q = keyset(q, (threads.c.created_at, threads.c.id), after, limit)
            rows = list((await conn.execute(q)).mappings())
        return await self._describe(rows)

    async def get(self, principal: Principal, thread_id: str) -> dict[str, Any]:
        """A visible thread with its folded state; NotFoundError outside scope.

        Keys: ``id``, ``team_id``, ``org_id``, ``title``, ``adapter``, ``visibility``,
        ``status`` (open | invited | active | closing | closed), ``last_seq``, ``agent_budget``,
        ``consecutive_agent_messages``, ``created_at``, ``participants`` (``[{kind, id,
        name}]``: the protocol's speakers in order, or the participants of a restricted open
        thread; ``[]`` for an open members thread), ``initiator`` (``{kind, id, name}`` or
        None), ``pending_acks`` (invitees still to ack, same shape), ``expected_speaker`` (id
        of whose turn it is, None = anyone or nobody), ``close_reason`` (None while live), and
        for a workflow ``turns`` (messages taken) and ``context`` (``{key: JSON}``).
        """
        async with self.ctx.engine.connect() as conn:
            row, _team = await visible_thread(conn, principal, thread_id)
        return (await self._describe([row]))[0]

    async def _describe(self, rows: list[Any]) -> list[dict[str, Any]]:
        """Thread rows with their folded state (see :meth:`get`); one connection for the
        participants' names of all of them."""
        states = [await self.ctx.hub.state(row["id"]) for row in rows]
        listed: list[list[tuple[str, str]]] = [list(st.participants) for st in states]
        names: dict[str, str] = {}
        if any(listed) or any(r["visibility"] == "restricted" for r in rows):
            async with self.ctx.engine.connect() as conn:
                for i, row in enumerate(rows):
                    if not listed[i] and row["visibility"] == "restricted":
                        q = (
                            select(
                                thread_participants.c.member_kind,
                                thread_participants.c.member_id,
                            )
                            .where(thread_participants.c.thread_id == row["id"])
                            .order_by(thread_participants.c.created_at)
                        )
                        listed[i] = [(str(k), str(m)) for k, m in await conn.execute(q)]
                everyone = [p for pairs in listed for p in pairs]
                if everyone:
                    names = await _display_names(conn, everyone)
        return [
            self._thread_dict(row, state, pairs, names)
            for row, state, pairs in zip(rows, states, listed, strict=True)
        ]

    @staticmethod
    def _thread_dict(
        row: Any, state: ThreadState, pairs: list[tuple[str, str]], names: Mapping[str, str]
    ) -> dict[str, Any]:
        def person(p: tuple[str, str]) -> dict[str, Any]:
            return {"kind": p[0], "id": p[1], "name": names.get(p[1], "(deleted)")}

        out = {
            "id": row["id"],
            "team_id": row["team_id"],
            "org_id": row["org_id"],
            "title": row["title"],
            "adapter": state.adapter,
            "visibility": row["visibility"],
            "status": state.status,
            "last_seq": state.last_seq,
            "agent_budget": state.agent_budget,
            "consecutive_agent_messages": state.consecutive_agent,
            "created_at": row["created_at"],
            "participants": [person(p) for p in pairs],
            "initiator": person(state.initiator) if state.initiator else None,
            "pending_acks": [person(p) for p in state.pending_acks],
            "expected_speaker": state.expected_speaker,
            "close_reason": state.close_reason,
        }
        proto = state.protocol
        if isinstance(proto, WorkflowState):
            out["turns"] = proto.turns
            out["context"] = proto.context_dict()
        return out

    async def envelopes(
        self,
        principal: Principal,
        thread_id: str,
        *,
        after: int = 0,
        limit: int = 100,
        wait: float = 0.0,
        messages_only: bool = True,
    ) -> dict[str, Any]:
        """Envelopes with ``seq > after`` (at most ``limit``, 1-1000), rendered with sender names.

        Only envelopes whose audience admits the caller are returned whole
        (:func:`~agent_network.services.scope.audience_admits`: no audience, the caller named in
        it, or sent by the caller; an org key also for its own org's senders and the agents and
        users it acts for). With ``messages_only`` (``GET .../messages``) the others are left
        out; otherwise (``GET .../envelopes``, the chain view) each of them is a stub
        (:func:`render_stub`: seq, hash, prev_hash, nothing else), so every reader gets the
        whole chain. ``next_after`` moves past the envelopes left out, so a reader never loops
        on a hidden one. With ``wait`` > 0 (seconds, at most 60) and nothing to return yet,
        waits until something arrives (a message for ``messages_only``) or ``wait`` runs out.
        Returns ``{"items": [...], "next_after": seq}``; pass ``next_after`` back as ``after``.
        InvalidRequestError for a bad ``limit``/``after``/``wait``, NotFoundError outside scope —
        also when the caller lost access while the request waited (scope and credential are
        checked again whenever access was removed anywhere meanwhile), AuthenticationError
        when its credential was revoked meanwhile.
        """
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be between 1 and 1000")
        if after < 0:
            raise InvalidRequestError("after must be >= 0")
        if not 0 <= wait <= 60:
            raise InvalidRequestError("wait must be between 0 and 60 seconds")
        checked_at = self.ctx.access_epoch  # before the scope check: see the end
        async with self.ctx.engine.connect() as conn:  # the scope and the first page: one
            await visible_thread(conn, principal, thread_id)  # checkout, not two
            first: list[Envelope] | None = await read_envelopes(
                conn, thread_id, after=after, limit=limit
            )
        hub = self.ctx.hub
        deadline = anyio.current_time() + wait
        acts_for: frozenset[str] | None = None
        cursor = after
        shown: list[Envelope] = []
        hidden: set[int] = set()  # seqs of ``shown`` answered as stubs
        while True:
            if first is not None:
                envs, first = first, None
            else:
                envs = await hub.read(thread_id, after=cursor, limit=limit)
            if not envs:
                left = deadline - anyio.current_time()
                if left > 0 and await hub.wait_for(thread_id, cursor, left):
                    continue
                break
            cursor = envs[-1].seq
            if acts_for is None and _needs_acts_for(principal, envs):
                async with self.ctx.engine.connect() as conn:
                    acts_for = await org_member_ids(conn, principal)
            admitted = [e for e in envs if audience_admits(principal, e, acts_for or frozenset())]
            if messages_only:
                shown = [e for e in admitted if e.type == EV_MESSAGE]
            else:  # the chain view: what the audience hides is a stub
                shown = envs
                hidden = {e.seq for e in envs} - {e.seq for e in admitted}
            if shown or len(admitted) == len(envs) or wait <= 0:
                break  # (nothing hidden by an audience: answered as before audiences)
            if anyio.current_time() >= deadline:
                break
        async with self.ctx.engine.connect() as conn:
            if self.ctx.access_epoch != checked_at:
                # access was removed somewhere while this request waited (or read): answer
                # only if the caller still has it (a revoked visa, membership or credential
                # ends a pending long-poll at once)
                await credential_in_force(conn, principal)
                await visible_thread(conn, principal, thread_id)
            whole = iter(await render(conn, [e for e in shown if e.seq not in hidden]))
            items = [render_stub(e) if e.seq in hidden else next(whole) for e in shown]
        return {"items": items, "next_after": cursor}


def _needs_acts_for(principal: Principal, envs: Iterable[Envelope]) -> bool:
    """Whether an org key needs the ids of its agents/users to judge these envelopes' audiences
    (some envelope has an audience, from another org, not naming the org itself)."""
    if principal.kind != "org" or principal.is_member_scoped:
        return False
    return any(
        e.audience is not None
        and e.sender_org_id != principal.org_id
        and principal.org_id not in e.audience
        for e in envs
    )
