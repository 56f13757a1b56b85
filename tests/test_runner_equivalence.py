"""The same agent behaves the same whichever runner picks up its trigger: every protocol example
runs once with the in-process runner and once with a remote runner (``--runner remote``: the
platform served on 127.0.0.1, a ``RemoteRunner`` over the SDK, the in-process runner off) on the
test model, and the resulting threads must be equal — per thread, the sequence of (envelope type,
sender, content, audience, tool calls, close reason), ids replaced by names.

``test_an_empty_reply_passes_the_turn_through_both_runners`` hits the rule the two runners used
to disagree on: a model that says nothing on a turn the protocol waits for (a consulting answer)
passes the turn in both (the remote runner used to pass only in a discussion, and the thread
then waited for its TTL).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "protocols"
NAMES = ["consulting", "conversation", "discussion", "hub_and_spoke", "mesh", "pair", "workflow"]
RUNNERS = ("inproc", "remote")

LAUNCH = """
import runpy, sys
sys.path[:0] = [{tests!r}, {examples!r}]
import runner_helpers
runner_helpers.register_slow_model()
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""

Shape = list[tuple[str, list[tuple[Any, ...]]]]


def run_example(name: str, runner: str, db: Path, model: str = "test") -> str:
    """Run ``examples/protocols/<name>.py`` with ``runner`` on ``model`` into ``db``; its
    transcript. The models of ``tests/runner_helpers.py`` are registered in the process."""
    script = str(EXAMPLES / f"{name}.py")
    code = LAUNCH.format(tests=str(ROOT / "tests"), examples=str(EXAMPLES), script=script)
    argv = [sys.executable, "-c", code, "--model", model, "--db", str(db), "--runner", runner]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"{name} --runner {runner}:\n{done.stdout}\n{done.stderr}"
    assert "outcome: ok" in done.stdout
    return done.stdout


def _named(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _named(v, names) for k, v in value.items()}
    return value


def threads_of(db: Path) -> Shape:
    """Per thread (sorted by title: threads opened at once may commit in any order): (type,
    sender, content, audience, tool calls, close reason) of every envelope, with agent and user
    ids replaced by their names."""
    con = sqlite3.connect(db)
    try:
        names = {
            r[0]: r[1]
            for t in ("agents", "users")
            for r in con.execute(f"SELECT id, name FROM {t}")
        }
        out: Shape = []
        for tid, title in con.execute("SELECT id, title FROM threads ORDER BY created_at, title"):
            rows = con.execute(
                "SELECT type, data, sender_kind, sender_id, audience FROM envelopes "
                "WHERE thread_id = ? ORDER BY seq",
                (tid,),
            ).fetchall()
            shape = []
            for type_, raw, kind, sender, audience in rows:
                data = json.loads(raw)
                shape.append(
                    (
                        type_,
                        "system" if kind == "system" else names.get(sender, sender),
                        data.get("content") if type_ == "message" else None,
                        sorted(_named(json.loads(audience), names)) if audience else None,
                        _named(data.get("tool_calls"), names),
                        data.get("reason") if type_ == "thread.closed" else None,
                    )
                )
            out.append((title, shape))
        return sorted(out, key=lambda t: (t[0], repr(t[1])))
    finally:
        con.close()


def both(name: str, tmp_path: Path, model: str = "test") -> tuple[Shape, Shape]:
    """The threads ``name`` leaves with each runner (the two runs in parallel)."""
    dbs = {r: tmp_path / f"{name}-{r}.db" for r in RUNNERS}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: run_example(name, r, dbs[r], model), RUNNERS))
    return threads_of(dbs["inproc"]), threads_of(dbs["remote"])


@pytest.mark.parametrize("name", NAMES)
def test_every_protocol_example_leaves_the_same_threads_with_both_runners(
    name: str, tmp_path: Path
) -> None:
    inproc, remote = both(name, tmp_path)
    assert any(e[0] == "message" for _, shape in inproc for e in shape)  # the runner spoke at all
    assert remote == inproc


def test_an_empty_reply_passes_the_turn_through_both_runners(tmp_path: Path) -> None:
    inproc, remote = both("consulting", tmp_path, model="silent")
    assert remote == inproc
    ((_title, shape),) = inproc
    said = [(e[1], e[2]) for e in shape if e[0] == "message"]
    assert said[-1] == ("bob", "I have nothing to add; I pass my turn.")
    assert shape[-1][0] == "thread.closed" and shape[-1][5] == "consulting_complete"
