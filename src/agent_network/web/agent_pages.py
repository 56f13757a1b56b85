"""Agents under ``/app/agents``: create and edit (name, lookup_key, identity, model, metadata,
resume), routines (participate/triage; activate, pause, delete), the rule (view and replace)
and secrets (write-only: names shown, values never). Form data is validated with the API's own
request models (``api/schemas.py``, the rule route's ``RuleBody``) and every change is the
same services call as its API route; a refusal is shown next to the field or button that
caused it. Design: docs/webapp.md.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from agent_network.api.deps import check_credential_may
from agent_network.api.routes.agents import RuleBody
from agent_network.api.schemas import AgentCreate, AgentUpdate, RoutineCreate
from agent_network.errors import AgentNetworkError, InvalidRequestError
from agent_network.model.rule import Rule
from agent_network.protocol.adapters import adapter_names
from agent_network.web.pages import (
    PageRoute,
    Viewer,
    _checked_form,
    _section,
    _to_login,
    not_found,
    viewer_of,
)
from agent_network.web.rendering import page, redirect

router = APIRouter(route_class=PageRoute, include_in_schema=False)

AGENT_FIELDS = (
    "name",
    "lookup_key",
    "identity",
    "model",
    "metadata",
    "resume_capabilities",
    "resume_domains",
    "resume_summary",
)
RULE_FIELDS = (
    "inbound_from",
    "outbound_to",
    "rate_messages",
    "rate_per_seconds",
    "inbox_cap",
    "max_concurrent_threads",
    "allowed_adapters",
    "delegation_depth",
)
PRESETS = ("participate", "triage")


class FieldError(InvalidRequestError):
    """A form value the API would refuse, with the field it belongs to."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


async def _org_viewer(request: Request) -> Viewer | Response:
    viewer = await viewer_of(request)
    if viewer is None:
        return _to_login(request)
    if viewer.principal.kind == "admin":
        return not_found(request)
    return viewer


def _json_object(field: str, text: str) -> dict[str, Any]:
    """A form's JSON-object field ({} when empty); FieldError otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FieldError(field, f"{field} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise FieldError(field, f'{field} must be a JSON object, like {{"team": "ops"}}')
    return value


def _validated(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked by the API's request model; FieldError naming the first bad field
    (``resume`` errors belong to the resume field they name, e.g. ``resume_summary``)."""
    try:
        return model.model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"]]
        field = loc[0] if loc else "form"
        if field == "resume" and len(loc) > 1:
            field = f"resume_{loc[1]}"
        raise FieldError(field, f"{'.'.join(loc) or field}: {first['msg']}") from None


def _lines(text: str) -> list[str]:
    """The non-empty lines of a textarea (also split on commas), stripped."""
    return [x.strip() for x in text.replace(",", "\n").splitlines() if x.strip()]


def _resume_form(form: dict[str, str]) -> dict[str, Any] | None:
    """The resume of the form's ``resume_*`` fields (capabilities and domains one per line);
    None when all three are empty."""
    resume = {
        "capabilities": _lines(form.get("resume_capabilities", "")),
        "domains": _lines(form.get("resume_domains", "")),
        "summary": form.get("resume_summary", "").strip(),
    }
    return resume if any(resume.values()) else None


def _agent_form(form: dict[str, str], *, editing: bool = False) -> dict[str, Any]:
    """The API body of the agent form. Creating, an empty resume is left out; editing, it
    clears the resume (``null``), as ``PATCH /agents/{id}`` does."""
    data: dict[str, Any] = {k: form[k] for k in ("name", "lookup_key", "identity") if k in form}
    data["model"] = form.get("model", "").strip() or None
    data["metadata"] = _json_object("metadata", form.get("metadata", ""))
    resume = _resume_form(form)
    if resume is not None or editing:
        data["resume"] = resume
    return data


def _whole(field: str, text: str) -> int | None:
    """A whole number field (None when empty); FieldError otherwise."""
    if not text.strip():
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise FieldError(field, f"{field}: a whole number, or empty for no limit") from None


def _rule_form(form: dict[str, str]) -> dict[str, Any]:
    """The ``PUT /agents/{id}/rule`` body of the rule form: the two lists one entry per line,
    the rate as two numbers (both empty: no rate limit), empty numbers: no limit, the
    adapters comma- or line-separated (empty: any adapter)."""
    body: dict[str, Any] = {
        "inbound_from": _lines(form.get("inbound_from", "")),
        "outbound_to": _lines(form.get("outbound_to", "")),
    }
    messages, per = form.get("rate_messages", "").strip(), form.get("rate_per_seconds", "").strip()
    if messages or per:
        try:
            body["rate"] = {"messages": int(messages), "per_seconds": float(per)}
        except ValueError:
            raise FieldError(
                "rate", "rate: give both a whole number of messages and a number of seconds"
            ) from None
    for name in ("inbox_cap", "max_concurrent_threads", "delegation_depth"):
        body[name] = _whole(name, form.get(name, ""))
    adapters = _lines(form.get("allowed_adapters", ""))
    body["allowed_adapters"] = adapters or None
    return body


def _rule_values(rule: dict[str, Any]) -> dict[str, str]:
    """The rule form's field values for a rule as ``GET /agents/{id}/rule`` shows it."""
    rate = rule.get("rate") or {}

    def num(value: Any) -> str:
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return {
        "inbound_from": "\n".join(rule.get("inbound_from") or []),
        "outbound_to": "\n".join(rule.get("outbound_to") or []),
        "rate_messages": num(rate.get("messages")),
        "rate_per_seconds": num(rate.get("per_seconds")),
        "inbox_cap": num(rule.get("inbox_cap")),
        "max_concurrent_threads": num(rule.get("max_concurrent_threads")),
        "allowed_adapters": ", ".join(rule.get("allowed_adapters") or []),
        "delegation_depth": num(rule.get("delegation_depth")),
    }


def _rule_field_of(exc: AgentNetworkError) -> str:
    """The rule form field a refusal is about (UnresolvedPrincipalError names it)."""
    if isinstance(exc, FieldError):
        return exc.field
    field = exc.details.get("field") if isinstance(exc.details, dict) else None
    if isinstance(field, str) and field in RULE_FIELDS:
        return field
    return "rule"


def _field_of(exc: AgentNetworkError) -> str:
    """The form field an API refusal is about (shown next to it), else ``form``."""
    if isinstance(exc, FieldError):
        return exc.field
    text = exc.message.lower()
    for name in ("lookup_key", "model", "metadata", "identity", "resume", "name"):
        if name.replace("_", " ") in text or name in text:
            return "resume_summary" if name == "resume" else name
    return "form"


# ---------------------------------------------------------------------- list and create


async def _list(
    request: Request,
    viewer: Viewer,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    draft: dict[str, Any] | None = None,
) -> Response:
    p, s = viewer.principal, viewer.services
    agents, agents_error = await _section(viewer, "/api/v1/agents", lambda: s.agents.list_agents(p))
    return page(
        request,
        "agents.html",
        session=viewer.session,
        status=status,
        agents=agents,
        agents_error=agents_error,
        errors=errors or {},
        draft=draft or {},
    )


@router.get("/app/agents")
async def agents_page(request: Request) -> Response:
    """The org's agents and a form to create one."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _list(request, viewer)


@router.post("/app/agents")
async def create_agent(request: Request) -> Response:
    """Create an agent (fields as ``POST /agents``; ``metadata`` as JSON text)."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    try:
        check_credential_may(viewer.principal, "POST", "/api/v1/agents")
        body = _validated(AgentCreate, _agent_form(form))
        made = await viewer.services.agents.create_agent(viewer.principal, **body)
    except AgentNetworkError as exc:
        return await _list(
            request, viewer, status=exc.status, errors={_field_of(exc): exc.message}, draft=form
        )
    return redirect(request, f"/app/agents/{made['id']}")


# ---------------------------------------------------------------------- one agent


async def _detail(
    request: Request,
    viewer: Viewer,
    agent_id: str,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    draft: dict[str, Any] | None = None,
    saved: str | None = None,
    rule_draft: dict[str, str] | None = None,
) -> Response:
    p, s = viewer.principal, viewer.services
    agent = await s.agents.get_agent(p, agent_id)
    base = f"/api/v1/agents/{agent_id}"
    rule: dict[str, Any] | None = None
    rule_error = None
    if viewer.may("GET", f"{base}/rule"):
        try:
            rule = await s.rules.get(p, agent_id)
        except AgentNetworkError as exc:
            rule_error = exc.message
    else:
        rule_error = f"{p.credential_name} cannot read rules; use an org key"
    routines, routines_error = await _section(
        viewer, f"{base}/routines", lambda: s.agents.list_routines(p, agent_id)
    )
    secrets, secrets_error = await _section(
        viewer, f"{base}/secrets", lambda: s.secrets.list_names(p, agent_id)
    )
    shown = dict(agent)
    shown["metadata"] = json.dumps(agent.get("metadata") or {}, indent=2, ensure_ascii=False)
    shown["model"] = agent.get("model") or ""
    resume = agent.get("resume") or {}
    shown["resume_capabilities"] = "\n".join(resume.get("capabilities") or [])
    shown["resume_domains"] = "\n".join(resume.get("domains") or [])
    shown["resume_summary"] = resume.get("summary") or ""
    return page(
        request,
        "agent.html",
        session=viewer.session,
        status=status,
        agent=agent,
        values={**shown, **(draft or {})},
        routines=routines,
        routines_error=routines_error,
        secrets=secrets,
        secrets_error=secrets_error,
        presets=PRESETS,
        rule=rule,
        rule_error=rule_error,
        rule_values={**_rule_values(rule or {}), **(rule_draft or {})},
        rule_errors={k[5:]: v for k, v in (errors or {}).items() if k.startswith("rule_")},
        rule_may_write=viewer.may("PUT", f"{base}/rule"),
        adapters=adapter_names(),
        errors=errors or {},
        saved=saved,
    )


@router.get("/app/agents/{agent_id}")
async def agent_page(request: Request, agent_id: str) -> Response:
    """One agent: its settings form, routines and secrets. Not found outside the org."""
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    return await _detail(request, viewer, agent_id)


@router.post("/app/agents/{agent_id}/{action}")
async def agent_action(request: Request, agent_id: str, action: str) -> Response:
    """``edit`` (the settings form, resume included), ``rule`` (replace the rule: the fields
    of :func:`_rule_form`), ``routines`` (add: ``name``, ``preset_name``, ``config``
    JSON), ``routine`` (``routine_id`` and ``do`` = ``activate`` | ``pause`` | ``delete``),
    ``secret`` (write: ``name``, ``value``), ``forget`` (delete secret ``name``) and
    ``delete`` (the agent). Each is the API call of the same meaning."""
    if action not in ACTIONS:
        return not_found(request)
    viewer = await _org_viewer(request)
    if isinstance(viewer, Response):
        return viewer
    form = await _checked_form(request, viewer)
    if isinstance(form, Response):
        return form
    p, s = viewer.principal, viewer.services
    await s.agents.get_agent(p, agent_id)  # out of scope: the not-found page
    base = f"/api/v1/agents/{agent_id}"
    saved = None
    try:
        if action == "edit":
            check_credential_may(p, "PATCH", base)
            changes = _validated(AgentUpdate, _agent_form(form, editing=True))
            await s.agents.update_agent(p, agent_id, changes)
            saved = "Saved."
        elif action == "rule":
            check_credential_may(p, "PUT", f"{base}/rule")
            body = _validated(RuleBody, _rule_form(form))
            await s.rules.put(p, agent_id, Rule.model_validate(body))
            saved = "Rule saved: it applies to the agent's next message."
        elif action == "routines":
            check_credential_may(p, "POST", f"{base}/routines")
            body = _validated(
                RoutineCreate,
                {
                    "name": form.get("name", ""),
                    "preset_name": form.get("preset_name", "participate"),
                    "config": _json_object("config", form.get("config", "")),
                },
            )
            await s.agents.create_routine(p, agent_id, **body_defaults(body))
        elif action == "routine":
            rid, do = form.get("routine_id", ""), form.get("do", "")
            if do == "delete":
                check_credential_may(p, "DELETE", f"{base}/routines/{rid}")
                await s.agents.delete_routine(p, agent_id, rid)
            elif do in ("activate", "pause"):
                check_credential_may(p, "POST", f"{base}/routines/{rid}/{do}")
                status = "active" if do == "activate" else "paused"
                await s.agents.update_routine(p, agent_id, rid, {"status": status})
            else:
                raise InvalidRequestError("choose activate, pause or delete")
        elif action == "secret":
            name = form.get("name", "").strip()
            check_credential_may(p, "PUT", f"{base}/secrets/{name or 'x'}")
            await s.secrets.put(p, agent_id, name, form.get("value", ""))
            saved = f"Secret {name} stored."
        elif action == "forget":
            name = form.get("name", "")
            check_credential_may(p, "DELETE", f"{base}/secrets/{name or 'x'}")
            await s.secrets.delete(p, agent_id, name)
        elif action == "delete":
            check_credential_may(p, "DELETE", base)
            await s.agents.delete_agent(p, agent_id)
            return redirect(request, "/app/agents")
    except AgentNetworkError as exc:
        key = ACTIONS[action]
        field = _field_of(exc) if action == "edit" else key
        if action == "rule":
            field = f"rule_{_rule_field_of(exc)}"
        if action in ("routine", "forget"):
            field = f"{key}:{form.get('routine_id') or form.get('name', '')}"
        draft = _draft(form) if action == "edit" else None
        rule_draft = {k: form.get(k, "") for k in RULE_FIELDS} if action == "rule" else None
        return await _detail(
            request,
            viewer,
            agent_id,
            status=exc.status,
            errors={field: exc.message},
            draft=draft,
            rule_draft=rule_draft,
        )
    if saved:
        return await _detail(request, viewer, agent_id, saved=saved)
    return redirect(request, f"/app/agents/{agent_id}")


ACTIONS = {
    "edit": "form",
    "rule": "rule",
    "routines": "routines",
    "routine": "routine",
    "secret": "secret",
    "forget": "forget",
    "delete": "delete",
}


def body_defaults(body: dict[str, Any]) -> dict[str, Any]:
    """A RoutineCreate dump with the API's defaults filled in (``exclude_unset`` drops them)."""
    return {
        "event_type": "thread.message_added",
        "handler_type": "preset",
        "preset_name": "participate",
        "config": {},
        **body,
    }


def _draft(form: dict[str, str]) -> dict[str, Any]:
    return {k: form[k] for k in AGENT_FIELDS if k in form}
