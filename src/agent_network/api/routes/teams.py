"""Teams (one org) and networks (across orgs): the same resource shape, two URL prefixes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request, Response

from agent_network.api.deps import Call, get_call
from agent_network.api.openapi import ApiRoute
from agent_network.api.pagination import BY_CREATED, BY_KIND_ID, PageQuery
from agent_network.api.responses import (
    Invite,
    InviteCreated,
    Joined,
    Member,
    Team,
    Thread,
    Visa,
)
from agent_network.api.schemas import (
    InviteCreate,
    JoinRequest,
    MemberAdd,
    MemberUpdate,
    TeamCreate,
    TeamUpdate,
    ThreadCreate,
)
from agent_network.services.teams import TeamKind


def _router(kind: TeamKind) -> APIRouter:
    """The routes teams and networks share; the path parameter is ``{team_id}`` under
    ``/teams`` and ``{network_id}`` under ``/networks`` (one name per resource)."""
    plural = f"/{kind}s"
    key = f"{kind}_id"
    item = f"/{{{key}}}"

    def team_id_param() -> Any:
        return Path(alias=key, description=f"the {kind}'s id")

    router = APIRouter(prefix=plural, tags=[f"{kind}s"], route_class=ApiRoute)

    @router.post("", status_code=201, response_model=Team)
    async def create(body: TeamCreate, call: Call = Depends(get_call)) -> dict[str, Any]:
        return await call.services.teams.create(call.principal, kind, body.name, body.description)

    @router.get("", response_model=list[Team])
    async def list_all(
        page: PageQuery = Depends(), call: Call = Depends(get_call)
    ) -> list[dict[str, Any]]:
        items = await call.services.teams.list_teams(
            call.principal, kind, after=page.after(BY_CREATED), limit=page.limit
        )
        return page.page(items, BY_CREATED)

    @router.get(item, response_model=Team)
    async def get(team_id: str = team_id_param(), call: Call = Depends(get_call)) -> dict[str, Any]:
        return await call.services.teams.get(call.principal, kind, team_id)

    @router.patch(item, response_model=Team)
    async def update(
        body: TeamUpdate, team_id: str = team_id_param(), call: Call = Depends(get_call)
    ) -> dict[str, Any]:
        return await call.services.teams.update(
            call.principal, kind, team_id, body.model_dump(exclude_unset=True)
        )

    @router.post(f"{item}/members", status_code=201, response_model=Member)
    async def add_member(
        body: MemberAdd, team_id: str = team_id_param(), call: Call = Depends(get_call)
    ) -> dict[str, Any]:
        return await call.services.teams.add_member(
            call.principal,
            kind,
            team_id,
            agent_id=body.agent_id,
            user_id=body.user_id,
            role=body.role,
        )

    @router.get(f"{item}/members", response_model=list[Member])
    async def members(
        team_id: str = team_id_param(), page: PageQuery = Depends(), call: Call = Depends(get_call)
    ) -> list[dict[str, Any]]:
        """Members: agents first, each kind by id (paged: ``limit``, ``cursor``)."""
        items = await call.services.teams.list_members(
            call.principal, kind, team_id, after=page.after(BY_KIND_ID), limit=page.limit
        )
        return page.page(items, BY_KIND_ID)

    @router.delete(f"{item}/members/{{member_kind}}/{{member_id}}", status_code=204)
    async def remove_member(
        member_kind: str,
        member_id: str,
        team_id: str = team_id_param(),
        call: Call = Depends(get_call),
    ) -> Response:
        await call.services.teams.remove_member(
            call.principal, kind, team_id, member_kind, member_id
        )
        return Response(status_code=204)

    @router.patch(f"{item}/members/{{member_kind}}/{{member_id}}", response_model=Member)
    async def set_role(
        member_kind: str,
        member_id: str,
        body: MemberUpdate,
        team_id: str = team_id_param(),
        call: Call = Depends(get_call),
    ) -> dict[str, Any]:
        """Change the role of one of the caller org's members (owner, admin, member; see
        docs/security.md#team-roles). 409 ``conflict`` for the last owner."""
        return await call.services.teams.set_role(
            call.principal, kind, team_id, member_kind, member_id, body.role
        )

    @router.post(f"{item}/threads", status_code=201, response_model=Thread)
    async def create_thread(
        body: ThreadCreate, team_id: str = team_id_param(), call: Call = Depends(get_call)
    ) -> dict[str, Any]:
        """Open a thread. ``adapter`` (default ``open``) picks its protocol; a protocol thread
        needs ``participants`` and takes ``initiator``, ``invitees``, ``ttl``,
        ``ack_timeout``, ``expectations``, ``names``, ``graph`` (workflow), ``order``
        (discussion) and adapter ``knobs``; all validated before anything is written (422
        naming the bad knob). Invitees whose rule (agents) or ``auto_ack`` (users) admits it
        are acked at once."""
        return await call.services.threads.create(
            call.principal,
            team_id,
            body.title,
            kind=kind,
            agent_budget=body.agent_budget,
            visibility=body.visibility,
            participants=body.participant_pairs(),
            **body.protocol(),
        )

    @router.get(f"{item}/threads", response_model=list[Thread])
    async def threads(
        team_id: str = team_id_param(), page: PageQuery = Depends(), call: Call = Depends(get_call)
    ) -> list[dict[str, Any]]:
        """Its threads the caller sees, oldest first (paged: ``limit``, ``cursor``)."""
        await call.services.teams.get(call.principal, kind, team_id)
        items = await call.services.threads.list_threads(
            call.principal, team_id, after=page.after(BY_CREATED), limit=page.limit
        )
        return page.page(items, BY_CREATED)

    return router


teams_router = _router("team")
networks_router = _router("network")


@teams_router.delete("/{team_id}", status_code=204)
async def delete_team(team_id: str, call: Call = Depends(get_call)) -> Response:
    """Delete an org-internal team (its threads disappear from listings; the WAL is kept)."""
    await call.services.teams.delete(call.principal, team_id)
    return Response(status_code=204)


@networks_router.post("/{network_id}/invites", status_code=201, response_model=InviteCreated)
async def create_invite(
    network_id: str, body: InviteCreate, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Create a join code (host org only). ``join_code`` is shown once."""
    return await call.services.teams.create_invite(
        call.principal, network_id, expires_in=body.expires_in, max_uses=body.max_uses
    )


@networks_router.get("/{network_id}/invites", response_model=list[Invite])
async def list_invites(
    network_id: str, page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """The network's invites (host org only): use counts, expiry and revocation, never the code;
    oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.teams.list_invites(
        call.principal, network_id, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@networks_router.delete("/{network_id}/invites/{invite_id}", status_code=204)
async def revoke_invite(
    network_id: str, invite_id: str, call: Call = Depends(get_call)
) -> Response:
    """Revoke an invite (host org only): its code admits nobody any more; nobody is removed."""
    await call.services.teams.revoke_invite(call.principal, network_id, invite_id)
    return Response(status_code=204)


@networks_router.post("/join", response_model=Joined)
async def join(
    body: JoinRequest, request: Request, call: Call = Depends(get_call)
) -> dict[str, Any]:
    """Join a network with a code, attaching only the agents and users named.

    Attempts are rate-limited per client address and per org (429 ``rate_limited``).
    """
    return await call.services.teams.join(
        call.principal,
        body.code,
        agent_ids=body.agent_ids,
        user_ids=body.user_ids,
        client=request.client.host if request.client else None,
    )


@networks_router.get("/{network_id}/visas", response_model=list[Visa])
async def list_visas(
    network_id: str, page: PageQuery = Depends(), call: Call = Depends(get_call)
) -> list[dict[str, Any]]:
    """Visas of the network: all of them for the host org, only its own for a member org;
    oldest first (paged: ``limit``, ``cursor``)."""
    items = await call.services.teams.list_visas(
        call.principal, network_id, after=page.after(BY_CREATED), limit=page.limit
    )
    return page.page(items, BY_CREATED)


@networks_router.delete("/{network_id}/visas/{visa_id}", status_code=204)
async def revoke_visa(network_id: str, visa_id: str, call: Call = Depends(get_call)) -> Response:
    """Revoke an org's visa (host org only): its agents and users leave the network at once."""
    await call.services.teams.revoke_visa(call.principal, network_id, visa_id)
    return Response(status_code=204)


@networks_router.post("/{network_id}/leave", response_model=Visa)
async def leave(network_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """The caller's org leaves a network it joined; returns the ended visa."""
    return await call.services.teams.leave(call.principal, network_id)


@networks_router.post("/{network_id}/close", response_model=Team)
async def close(network_id: str, call: Call = Depends(get_call)) -> dict[str, Any]:
    """Close the network (host only): its threads become read-only."""
    return await call.services.teams.close_network(call.principal, network_id)
