"""How every REST route is described in the OpenAPI schema (``/api/v1/openapi.json``).

:class:`ApiRoute` (the route class of every router) documents the project's error body for the
error statuses (:data:`~agent_network.api.responses.ERROR_RESPONSES`; the 422 among them
replaces FastAPI's ``HTTPValidationError``, which this server never sends) and answers with
``response_model_exclude_unset`` (see :mod:`agent_network.api.responses`).
:func:`operation_id` gives each operation a stable, readable id such as ``agents_list`` or
``networks_invite_create``, made from its method and path (not from Python function names).
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

from agent_network.api.responses import ERROR_RESPONSES

__all__ = ["API_PREFIX", "ApiRoute", "operation_id"]

API_PREFIX = "/api/v1"

# the last path word of a call that acts (POST/GET) rather than creating or reading a resource
_ACTIONS = frozenset(
    {
        "activate",
        "pause",
        "rotate",
        "renew",
        "join",
        "leave",
        "close",
        "ack",
        "reject",
        "verify",
        "search",
        "export",
        "triage",
        "complete",
        "release",
    }
)
# path words naming one thing, never a collection (GET: "get", not "list")
_SINGLETONS = frozenset({"me", "rule", "egress", "health", "done"})
_KEEP = frozenset({"egress"})  # not plurals
# the rest, where the verb the method gives reads wrong
_OVERRIDES = {
    ("POST", "/threads/{thread_id}/context"): "threads_context_set",
    ("POST", "/threads/{thread_id}/participants"): "threads_participants_add",
    ("POST", "/runners/secrets"): "runners_secret_reveal",
}


def _singular(word: str) -> str:
    if word in _KEEP or not word.endswith("s"):
        return word
    return word[:-1]


def operation_id(route: APIRoute) -> str:
    """The operationId of ``route``: its resource path words joined by ``_`` (nested ones in
    the singular) and a verb: ``list``/``get`` (GET of a collection/one item), ``create``
    (POST), ``update`` (PATCH), ``put`` (PUT), ``delete`` (DELETE), or the action word the path
    ends with (``networks_join``, ``agents_routine_pause``). E.g. ``GET /api/v1/agents`` ->
    ``agents_list``, ``POST /api/v1/networks/{network_id}/invites`` ->
    ``networks_invite_create``."""
    method = sorted(route.methods or {"GET"})[0]
    path = route.path_format.removeprefix(API_PREFIX)
    override = _OVERRIDES.get((method, path))
    if override is not None:
        return override
    parts = [p for p in path.split("/") if p]
    words = [p for p in parts if not p.startswith("{")]
    ends_with_id = bool(parts) and parts[-1].startswith("{")
    if not ends_with_id and words[-1] in _ACTIONS:
        verb, words = words[-1], words[:-1]
        nouns = [words[0], *(_singular(w) for w in words[1:])]
        return "_".join([*nouns, verb])
    if method == "GET":
        one = ends_with_id or words[-1] in _SINGLETONS
        verb = "get" if one else "list"
        nouns = [words[0], *(_singular(w) for w in words[1:])] if one else words
        return "_".join([*nouns, verb])
    verb = {"POST": "create", "PATCH": "update", "PUT": "put", "DELETE": "delete"}[method]
    nouns = [words[0], *(_singular(w) for w in words[1:])]
    return "_".join([*nouns, verb])


class ApiRoute(APIRoute):
    """A REST route: the error statuses documented with the project's error body, and the
    response model applied with ``exclude_unset`` (exactly the keys the service returned)."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        kwargs["responses"] = {**ERROR_RESPONSES, **(kwargs.get("responses") or {})}
        kwargs["response_model_exclude_unset"] = True
        super().__init__(path, endpoint, **kwargs)
