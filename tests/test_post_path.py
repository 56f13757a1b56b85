"""One post path: every message of a thread is appended by ``services/posting.py``
``append_message`` and nowhere else, and only the one post function
(``PostPath.post_message``) calls it and checks a message's egress and rate (issue 14, point 2).

Structural checks over the source tree (its AST), so a new write path for messages — or a second
place that checks egress or counts the rate — fails here before it can skip a check the post
path makes: REST, WebSocket, hub clients, both runners and triage all end in that one function.
The behaviour of the one path for the runner's internal principal is tested by the runner,
triage, egress and audit suites.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "agent_network"
HOME = ("services/posting.py", "append_message")
POSTING = "services/posting.py"
ONE = (POSTING, "post_message")  # the one post function
CHECKS = (POSTING, "_check_post")  # its checks (scope, rules, egress, rate), called by it only
EGRESS = frozenset({"check_message", "check_outgoing"})  # services/egress_check.py, policy.py
RATE = frozenset({"take_rate"})  # services/rules.py: counts a message against the rate
RATED = frozenset({"check_send", "check_dynamic"})  # count the rate unless consume_rate=False
WRAPPERS = {  # the checks' own implementations, which only forward to each other
    ("services/policy.py", "check_outgoing"),
    ("services/rules.py", "check_dynamic"),
    ("services/rules.py", "check_send"),
}


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


def _calls(tree: ast.AST, names: frozenset[str]) -> list[tuple[str, int, ast.Call]]:
    """``(enclosing function, line, call)`` of every call of a function or method in
    ``names`` (``f(...)``, ``x.f(...)``)."""
    found: list[tuple[str, int, ast.Call]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in names:
                found.append((function, node.lineno, node))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def _sites(names: frozenset[str]) -> set[tuple[str, str, int, ast.Call]]:
    return {
        (str(path.relative_to(SRC)), function, line, call)
        for path in sorted(SRC.rglob("*.py"))
        for function, line, call in _calls(ast.parse(path.read_text(), str(path)), names)
    }


def _counts_rate(call: ast.Call) -> bool:
    """Whether a ``check_send``/``check_dynamic`` call may count the rate (its
    ``consume_rate`` is not the literal False)."""
    for k in call.keywords:
        if k.arg == "consume_rate":
            return not (isinstance(k.value, ast.Constant) and k.value.value is False)
    return True


def _offenders(
    sites: set[tuple[str, str, int, ast.Call]], allowed: set[tuple[str, str]]
) -> list[tuple[str, str, int]]:
    return sorted((p, f, line) for p, f, line, _ in sites if (p, f) not in allowed)


def test_only_the_one_post_function_appends_and_checks() -> None:
    """``append_message`` and the checks (``_check_post``) are called by ``post_message``
    only: REST, WebSocket, SDK, both runners and triage all go through it."""
    assert _offenders(_sites(frozenset({HOME[1]})), {ONE}) == []
    assert _offenders(_sites(frozenset({CHECKS[1]})), {ONE}) == []
    assert {(p, f) for p, f, _, _ in _sites(frozenset({HOME[1]}))} == {ONE}


def test_only_the_one_post_function_checks_egress_and_counts_the_rate() -> None:
    """No second egress, rate or rule path for messages: the egress check and the rate are
    called from the one post function's checks only (and by their own wrappers), and every
    other rule check (a runner's checks before a model call, a triage route's) passes
    ``consume_rate=False``."""
    assert _offenders(_sites(EGRESS), {CHECKS, *WRAPPERS}) == []
    assert _offenders(_sites(RATE), {CHECKS, *WRAPPERS}) == []
    counting = {s for s in _sites(RATED) if _counts_rate(s[3])}
    assert _offenders(counting, {CHECKS, *WRAPPERS}) == []
    # the one function's checks do call them (so the assertions above check something)
    assert any(p == POSTING for p, *_ in _sites(EGRESS))
    assert any(p == POSTING for p, *_ in _sites(RATE))


def test_the_call_scan_sees_a_second_path() -> None:
    """The scan finds the shapes a second check path would take (so the tests above can
    fail): a direct egress check, a rate taken, a rule check counting the rate."""
    code = (
        "async def reply(ctx, rules, agent):\n"
        "    check_outgoing(ctx, 'org', 'thr', 'hi')\n"
        "    rules.take_rate(agent)\n"
        "    await rules.check_send(conn, agent, thread_id='t', team_id='t', adapter='open')\n"
        "    await rules.check_send(conn, agent, consume_rate=False)\n"
    )
    tree = ast.parse(code)
    assert [line for _, line, _ in _calls(tree, EGRESS | RATE)] == [2, 3]
    rated = [(line, _counts_rate(call)) for _, line, call in _calls(tree, RATED)]
    assert rated == [(4, True), (5, False)]
