"""The protocol core is pure (issue 14, point 3): ``agent_network.protocol`` imports and folds a
thread with neither SQLAlchemy, anyio nor the store, hub or any upper layer.

A fresh interpreter installs an import blocker first (a ``sys.meta_path`` finder that raises
ImportError for those packages), imports every module of ``agent_network.protocol``, folds a
consulting thread with an expectation, asks for its deadlines and checks a turn. Every blocked
import it attempted is reported, so even an import guarded by ``try/except ImportError`` fails
the test. ``lint-imports`` (scripts/test) checks the same boundary statically; this test checks
what actually loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED_TOP_LEVEL = ("sqlalchemy", "aiosqlite", "alembic", "anyio", "structlog", "fastapi")
BLOCKED_LAYERS = (
    "agent_network.store",
    "agent_network.hub",
    "agent_network.services",
    "agent_network.runtime",
    "agent_network.api",
    "agent_network.client",
)

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    TOP, LAYERS = json.loads(sys.argv[1])
    attempts = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in TOP or any(
                name == layer or name.startswith(layer + ".") for layer in LAYERS
            ):
                attempts.append(name)
                raise ImportError(f"{name} is blocked: the protocol core must not need it")
            return None

    sys.meta_path.insert(0, Blocker())

    import agent_network.protocol as protocol

    modules = [
        info.name
        for info in pkgutil.walk_packages(protocol.__path__, "agent_network.protocol.")
    ]
    for name in modules:
        importlib.import_module(name)

    from agent_network.model.envelope import Envelope

    def env(seq, type, data, sender, at):
        return Envelope(
            "thr_1", seq, f"env_{seq}", type, data, "agent", sender, "org_1", None, None, None,
            f"2026-01-01T00:00:{at:02d}+00:00", "", f"h{seq}",
        )

    data = {
        "adapter": "consulting",
        "participants": [["agent", "agt_a"], ["agent", "agt_b"]],
        "expectations": [protocol.reply_within(5).to_data()],
    }
    envs = [
        env(1, protocol.EV_THREAD_CREATED, data, "agt_a", 0),
        env(2, protocol.EV_MESSAGE, {"content": "question"}, "agt_a", 1),
    ]
    state = protocol.fold("thr_1", envs)
    due = protocol.due_now(state, 1767225600.0 + 60)
    takers = protocol.turn_takers(state, envs[-1], ["agt_a", "agt_b"])
    print(json.dumps({
        "attempts": attempts,
        "modules": len(modules),
        "status": state.status,
        "expected": state.expected_speaker,
        "due": [d.type for d in due],
        "takers": sorted(takers),
    }))
    """
)


def test_protocol_core_loads_and_folds_without_the_server_stack() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([BLOCKED_TOP_LEVEL, BLOCKED_LAYERS])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], f"the protocol core tried to import {report['attempts']}"
    assert report["modules"] >= 10  # events, knobs, state, fold, ..., the adapters
    assert report["status"] == "active"
    assert report["expected"] == "agt_b"  # consulting: the consultant answers
    assert report["due"] == ["expectation.violated"]  # reply_within(5) passed
    assert report["takers"] == ["agt_b"]
