"""The OpenAPI schema is a contract clients can generate code from (issue 15, docs/api.md):
real response schemas, our error body documented (never FastAPI's ``HTTPValidationError``),
stable and unique operationIds, one path parameter name per resource, and the pagination
parameters on every list. Read from the app's ``/api/v1/openapi.json`` over a real socket."""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import LiveServer

ERROR_STATUSES = ("401", "403", "404", "409", "422", "429")
LIST_PATHS_NOT_PAGED = {
    # ranked top-k with its own limit, a small computed set, a runner's work set
    "/api/v1/knowledge/search",
    "/api/v1/threads/{thread_id}/tools",
    "/api/v1/runners/assignments",
}


@pytest.fixture(scope="module")
def schema(module_server: LiveServer) -> dict[str, Any]:
    with module_server.client() as anonymous:
        r = anonymous.get("/openapi.json")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        node = schema["components"]["schemas"][name]
    return node


def test_every_json_response_has_a_real_schema(schema: dict[str, Any]) -> None:
    bare = []
    for method, path, op in operations(schema):
        for status, response in op["responses"].items():
            content = response.get("content", {}).get("application/json")
            if not status.startswith("2") or content is None:
                continue
            node = resolve(schema, content["schema"])
            if node.get("type") == "array":
                node = resolve(schema, node["items"])
            if not node.get("properties"):
                bare.append(f"{method} {path} {status}: {node}")
    assert bare == []


def test_every_operation_documents_our_error_body(schema: dict[str, Any]) -> None:
    body = schema["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["error"]
    detail = resolve(schema, body["properties"]["error"])
    assert {"code", "message", "details", "request_id"} <= set(detail["properties"])
    assert set(detail["required"]) == {"code", "message"}
    for method, path, op in operations(schema):
        for status in ERROR_STATUSES:
            response = op["responses"].get(status)
            assert response is not None, f"{method} {path} does not document {status}"
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody", f"{method} {path} {status}"


def test_fastapis_validation_error_is_gone(schema: dict[str, Any]) -> None:
    names = set(schema["components"]["schemas"])
    assert "HTTPValidationError" not in names and "ValidationError" not in names
    assert "HTTPValidationError" not in str(schema["paths"])


def test_operation_ids_are_unique_and_stable(schema: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(schema)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", i) for i in ids), ids
    by_route = {(m, p): op["operationId"] for m, p, op in operations(schema)}
    expected = {
        ("GET", "/api/v1/agents"): "agents_list",
        ("POST", "/api/v1/agents"): "agents_create",
        ("GET", "/api/v1/agents/{agent_id}"): "agents_get",
        ("POST", "/api/v1/networks/{network_id}/invites"): "networks_invite_create",
        ("POST", "/api/v1/networks/join"): "networks_join",
        ("POST", "/api/v1/threads/{thread_id}/messages"): "threads_message_create",
        ("GET", "/api/v1/threads/{thread_id}/messages"): "threads_messages_list",
        ("POST", "/api/v1/agents/{agent_id}/routines/{routine_id}/pause"): "agents_routine_pause",
        ("GET", "/api/v1/teams/{team_id}/members"): "teams_members_list",
        ("DELETE", "/api/v1/agents/{agent_id}/secrets/{name}"): "agents_secret_delete",
        ("GET", "/api/v1/audit"): "audit_list",
        ("GET", "/api/v1/orgs/me"): "orgs_me_get",
    }
    assert {k: by_route.get(k) for k in expected} == expected


def test_one_path_parameter_name_per_resource(schema: dict[str, Any]) -> None:
    names: dict[str, set[str]] = {}
    for path in schema["paths"]:
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part.startswith("{"):
                names.setdefault(parts[i - 1], set()).add(part)
    mixed = {resource: sorted(n) for resource, n in names.items() if len(n) > 1}
    assert mixed == {}
    assert names["networks"] == {"{network_id}"} and names["teams"] == {"{team_id}"}
    # and the operation's declared parameters match the path's
    for method, path, op in operations(schema):
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), f"{method} {path}"


def test_every_list_takes_limit_and_cursor(schema: dict[str, Any]) -> None:
    for method, path, op in operations(schema):
        ok = op["responses"].get("200", {}).get("content", {}).get("application/json")
        if method != "GET" or ok is None or path in LIST_PATHS_NOT_PAGED:
            continue
        if resolve(schema, ok["schema"]).get("type") != "array":
            continue
        query = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        assert {"limit", "cursor"} <= set(query), f"GET {path}"
        limit = resolve(schema, query["limit"]["schema"])
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 100)


def test_returned_secrets_are_called_secret(schema: dict[str, Any]) -> None:
    for name in ("OrgCreated", "IssuedCredential"):
        props = schema["components"]["schemas"][name]["properties"]
        assert "secret" in props and "key" not in props
    created = schema["paths"]["/api/v1/orgs"]["post"]["responses"]["201"]
    ref = created["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/OrgCreated")
