"""The main job, end to end: ``agent-network demo`` as a new user runs it (a real server process,
REST only, SIGKILL restart). Once with the deterministic test model and once on the real bundled
local model."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run_demo(tmp_path: Path, *extra: str) -> str:
    env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1"}
    env.pop("AGENT_NETWORK_MODEL", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_network",
            "demo",
            "--data-dir",
            str(tmp_path / "demo"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def check_report(out: str) -> None:
    live = out.split("rollout-status (live)")[1].split("What each org can see")[0]
    speakers = re.findall(r"^(Customer Ops Agent|Delivery Agent) \((Acme|Globex)\): \S", live, re.M)
    assert ("Customer Ops Agent", "Acme") in speakers
    assert ("Delivery Agent", "Globex") in speakers
    assert "Alex Rivera (project lead) (Acme): We are ready to move the billing migration" in live
    # each org's private threads and agent knowledge answer 404 to the other
    assert out.count(": 404 not found") == 6
    assert "LEAK" not in out
    assert re.search(
        r"Hash chain of rollout-status verified by Globex: intact \(\d+ envelopes\)", out
    )
    assert re.search(r"after restart: \d+ envelopes, identical to before", out)
    assert "demo complete" in out


def test_demo_with_the_test_model(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--model", "test")
    check_report(out)
    assert "Delivery Agent (Globex): Acknowledged." in out


@pytest.mark.local_model
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
def test_demo_on_the_bundled_local_model(tmp_path: Path) -> None:
    out = run_demo(tmp_path)
    check_report(out)
    # the local model really answered (the test model's fixed text is not what it says)
    live = out.split("rollout-status (live)")[1].split("What each org can see")[0]
    assert "Acknowledged." not in live
