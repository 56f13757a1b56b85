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

__all__ = [
    "MAX_JSON_DEPTH",
    "JsonInputError",
    "JsonTooDeepError",
    "NulCharacterError",
    "has_nul",
    "json_depth",
    "parse_json",
]

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in any JSON input (the top level counts 1)."""


class JsonInputError(InvalidRequestError):
    """Base of the JSON documents :func:`parse_json` refuses (422)."""


class JsonTooDeepError(JsonInputError):
    """A JSON document nests arrays/objects deeper than :data:`MAX_JSON_DEPTH` (422)."""

    code = "json_too_deep"


class NulCharacterError(JsonInputError):
    """A text value (JSON string, query parameter or path) holds U+0000 (422). PostgreSQL text
    cannot store it, so it is refused on every engine alike, before anything is written."""

    code = "nul_character"


def has_nul(value: Any) -> bool:
    """True when any string in a parsed JSON value (object keys included) holds U+0000;
    walked without recursion."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
        NulCharacterError: a string of the document holds U+0000 (``"\\u0000"``).
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
    marker = b"\\u0000" if isinstance(raw, bytes) else "\\u0000"
    if marker in raw and has_nul(value):  # type: ignore[operator]
        raise NulCharacterError(
            "text must not contain the NUL character (U+0000); remove it and send again"
        )
    return value
