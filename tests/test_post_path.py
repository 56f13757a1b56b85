"""One post path: every message of a thread is appended by ``services/posting.py``
``append_message`` and nowhere else (issue 14, point 2).

A structural check over the source tree (its AST), so a new write path for messages fails here
before it can skip a check the post path makes: REST, WebSocket, hub clients, both runners and
triage all end in that one function.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "agent_network"
HOME = ("services/posting.py", "append_message")


def _is_message_type(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == "message"
    return isinstance(node, ast.Name) and node.id == "EV_MESSAGE"


def _appends_of_messages(tree: ast.AST) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every ``<...>hub.append(..., type=<message>, ...)``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "append"
            and "hub" in ast.unparse(node.func.value).split(".")[-1]
        ):
            kinds = [k.value for k in node.keywords if k.arg == "type"]
            if any(_is_message_type(k) for k in kinds):
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_only_append_message_appends_a_message() -> None:
    sites = {
        (str(path.relative_to(SRC)), function, line)
        for path in sorted(SRC.rglob("*.py"))
        for function, line in _appends_of_messages(ast.parse(path.read_text(), str(path)))
    }
    assert {(p, f) for p, f, _ in sites} == {HOME}, sorted(sites)


def test_the_check_sees_a_message_append() -> None:
    """The scan itself finds the shapes a write path would take (so the test above can fail)."""
    code = (
        "async def f(ctx, hub):\n"
        "    await ctx.hub.append(t, type=EV_MESSAGE, data={})\n"
        "    await hub.append(t, type='message', data={})\n"
        "    await ctx.hub.append(t, type=EV_THREAD_ACK, data={})\n"
    )
    assert [line for _, line in _appends_of_messages(ast.parse(code))] == [2, 3]
