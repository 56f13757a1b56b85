"""Bounded JSON: one parser for every JSON entry point (REST bodies, WebSocket frames).

Python's ``json.loads`` recurses once per nesting level: a document nested ~1,000 deep raises
``RecursionError`` (an exception that is not a ``ValueError``, so it escaped the callers' error
handling and dropped WebSocket connections), and anything shallower is accepted however deep.
:func:`parse_json` turns both into one typed error with a fixed, generous limit.
"""

from __future__ import annotations

import json
from typing import Any

from agent_network.errors import InvalidRequestError

__all__ = ["MAX_JSON_DEPTH", "JsonTooDeepError", "json_depth", "parse_json"]

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in any JSON input (the top level counts 1)."""


class JsonTooDeepError(InvalidRequestError):
    """A JSON document nests arrays/objects deeper than :data:`MAX_JSON_DEPTH` (422)."""

    code = "json_too_deep"


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a parsed JSON value, counted without recursion.

    Args:
        value: What ``json.loads`` returned.
        limit: Stop counting once the depth exceeds this (the result is then ``limit + 1``).

    Returns:
        0 for a scalar, 1 for a flat array or object, and so on.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``raw`` as JSON, refusing documents nested deeper than ``max_depth``.

    Args:
        raw: The JSON text (bytes are decoded as UTF-8, as ``json.loads`` does).
        max_depth: The deepest nesting accepted.

    Returns:
        The parsed value.

    Raises:
        JsonTooDeepError: the document nests deeper than ``max_depth`` (including documents too
            deep for Python's parser).
        ValueError: ``raw`` is not JSON (``json.JSONDecodeError``, ``UnicodeDecodeError``).
    """
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None
        depth = max_depth + 1
    else:
        depth = json_depth(value, max_depth)
    if depth > max_depth:
        raise JsonTooDeepError(
            f"JSON nested more than {max_depth} levels deep; flatten the document",
            details={"max_depth": max_depth},
        )
    return value
