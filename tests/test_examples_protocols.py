"""The protocol examples (``examples/protocols/``) run end to end as real processes.

Every example script runs as a subprocess with ``--model test`` on its own SQLite file (all of
them at once: they mostly wait on the hub's sweeper and the runner, not on the CPU); each must
exit 0 and print its protocol's terminal state and the steps that lead there, in order. A bad
model makes an example exit non-zero. One test runs ``workflow.py`` on the real bundled local
model (marked ``local_model``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "protocols"
TIMEOUT = 120.0  # seconds per example process (they take a few seconds with the test model)

# script -> lines (or line fragments) its output must contain, in this order
EXPECTED: dict[str, list[str]] = {
    "consulting.py": [
        "-- consulting thread 'distributed systems' opened with alice, bob",
        "-- bob acks the invitation (automatically)",
        "refused: bob speaks before the question: 409 not_your_turn",
        "alice: What's the single most important property of a distributed system?  (to bob)",
        "bob: Acknowledged.  (to alice)",
        "-- closed (consulting_complete) by hub",
        "refused: a second question: 409 thread_closed",
        "status: closed",
        "close_reason: consulting_complete",
    ],
    "conversation.py": [
        "-- bob acks the invitation (automatically)",
        "alice: How would you explain consensus to a curious novice?",
        "bob: Acknowledged.",
        "alice: Acknowledged.",
        "bob: Acknowledged.",
        "-- closing (closed) by alice",
        "-- closed (closed) by hub",
        "close_reason: closed",
        "messages: 4",
    ],
    "pair.py": [
        "Research Agent: Fact: three frameworks dominate AI agents today.",
        "Writer Agent: Acknowledged.",
        "-- closing (ttl_expired) by hub",
        "-- closed (ttl_expired) by hub",
        "close_reason: ttl_expired",
        "messages: 4",
    ],
    "discussion.py": [
        "-- Skeptic acks the invitation (automatically)",
        "-- expected speaker: Maya",
        "refused: the skeptic speaks out of turn: 409 not_your_turn",
        "Maya: Topic: should every developer learn Rust?",
        "Optimist: Acknowledged.",
        "Realist: Acknowledged.",
        "Skeptic: Acknowledged.",
        "-- round 1 done; the turn wraps to Maya",
        "Maya: Round two",
        "Optimist: Acknowledged.",
        "-- round 2 done; the turn wraps to Maya",
        "-- closing (discussion over) by Maya",
        "close_reason: discussion over",
    ],
    "workflow.py": [
        "-- Reviewer acks the invitation (automatically)",
        "Researcher: Acknowledged.",
        "Writer: Acknowledged.",
        "Reviewer: Good start; please add one concrete example.  "
        "[tools: request_revision -> Handoff(writer)]",
        "Writer: Acknowledged.",
        "Reviewer: Approved: clear, correct and short.  [tools: approve]",
        "-- closed (finished) by hub",
        "close_reason: finished",
        "turns: 5",
    ],
    "mesh.py": [
        "[all] Planner: Acknowledged.",
        "[all] Engineer: Acknowledged.",
        "[all] Critic: Acknowledged.",
        "[all] -- closed (max_turns) by hub",
        "[all] close_reason: max_turns",
        "[Critic->Planner] close_reason: consulting_complete",
        "[Engineer->Critic] close_reason: consulting_complete",
        "[Planner->Engineer] close_reason: consulting_complete",
    ],
    "hub_and_spoke.py": [
        "[intake] Pat: I was charged twice on my last invoice",
        "[intake] Triage: Routed to billing: Billing desk",
        "[intake] Pat: The API returns a 500 error",
        "[intake] Triage: Routed to technical: Tech desk",
        "[intake] Pat: Do you have an office in Berlin?",
        "[intake] Triage: Routed to other: General desk",
        "[intake] close_reason: intake closed for today",
        "[billing] Triage: Forwarded from Pat in support intake: I was charged twice",
        "[billing] Billing Agent: Acknowledged.",
        "[technical] Triage: Forwarded from Pat in support intake: The API returns a 500 error",
        "[technical] Tech Agent: Acknowledged.",
        "[other] Triage: Forwarded from Pat in support intake: Do you have an office in Berlin?",
        "[other] General Agent: Acknowledged.",
        "routed: billing (by keywords) <- 'I was charged twice",
        "routed: technical (by keywords) <- 'The API returns",
        "routed: other (by fallback) <- 'Do you have an office",
    ],
    "rest_api.py": [
        '"code": "not_your_turn"',
        '"code": "invalid_audience"',
        '"close_reason": "consulting_complete"',
        '"code": "thread_closed"',
        '"code": "protocol_violation"',
        '"close_reason": "invite_rejected"',
        '"name": "request_revision"',
        '"close_reason": "finished"',
        '"type": "notify"',
        '"reason": "expectation_violated:max_silence"',
        '"adapter": "broadcast"',
        '"message": "only the initiator speaks in a broadcast thread"',
    ],
}


@dataclass
class Run:
    """A finished example process."""

    returncode: int
    out: str
    err: str
    db: Path


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / script), *args]


def in_order(out: str, expected: list[str]) -> str | None:
    """The first expected fragment not found after the previous one (None: all in order)."""
    pos = 0
    for fragment in expected:
        found = out.find(fragment, pos)
        if found < 0:
            return fragment
        pos = found + len(fragment)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every example with ``--model test``, run at once, each on its own database file."""
    base = tmp_path_factory.mktemp("examples")
    procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    for script in EXPECTED:
        db = base / f"{script.removesuffix('.py')}.db"
        procs[script] = (
            subprocess.Popen(
                command(script, "--model", "test", "--db", str(db)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=EXAMPLES.parents[1],
            ),
            db,
        )
    out: dict[str, Run] = {}
    try:
        for script, (proc, db) in procs.items():
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            out[script] = Run(proc.returncode, stdout, stderr, db)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_reaches_its_terminal_state(runs: dict[str, Run], script: str) -> None:
    run = runs[script]
    assert run.returncode == 0, f"{script} exited {run.returncode}\n{run.out}\n{run.err}"
    assert run.out.rstrip().endswith("outcome: ok"), run.out
    missing = in_order(run.out, EXPECTED[script])
    assert missing is None, f"{script}: {missing!r} missing or out of order in\n{run.out}"
    assert "Traceback" not in run.err, run.err
    assert run.db.stat().st_size > 0  # --db kept the network in the file we named


def test_every_example_script_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)


def test_an_example_exits_non_zero_when_its_model_is_unavailable(tmp_path: Path) -> None:
    proc = subprocess.run(
        command("consulting.py", "--model", "nosuch:model", "--db", str(tmp_path / "x.db")),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=EXAMPLES.parents[1],
    )
    assert proc.returncode != 0
    assert "outcome: ok" not in proc.stdout
    assert "model_unavailable" in proc.stderr + proc.stdout


@pytest.mark.local_model
def test_workflow_example_on_the_local_model(tmp_path: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: pip install 'agent-network[local]'")
    proc = subprocess.run(
        command("workflow.py", "--model", "local:smollm2", "--db", str(tmp_path / "wf.db")),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=EXAMPLES.parents[1],
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert (
        in_order(proc.stdout, ["-- Reviewer acks the invitation", "Researcher: ", "Writer: "])
        is None
    ), proc.stdout
    assert "close_reason: finished" in proc.stdout or "close_reason: max_turns" in proc.stdout, (
        proc.stdout
    )
    assert proc.stdout.rstrip().endswith("outcome: ok")
