"""How the local model's runtime (llama-cpp-python) is built: one portable build per CPU family.

``scripts/setup`` reads these values by running this file (``python llama_build.py``), so the
flags live in one place; ``agent-network doctor`` uses them for its fix commands and to tell a
portable build from one compiled for the build machine's CPU only. This module imports nothing
from the project, so it runs before the project is installed.

The build never uses ``-march=native`` (ggml's ``GGML_NATIVE``, on by default): a wheel built
that way on a machine with AVX-512 or AMX crashes on a CPU without them, and pip caches and
reuses such a wheel on every later install. On x86-64 it uses ggml's runtime CPU dispatch
(``GGML_BACKEND_DL`` with ``GGML_CPU_ALL_VARIANTS``): the CPU backend is built once per CPU
generation, from plain x86-64 to AVX-512 and AMX, and the best variant for the running CPU is
loaded at start (:func:`agent_network.runtime.model_worker.load_cpu_backends`); the rest of the
library has no instruction set beyond x86-64. On arm64 it is the compiler's default target,
ARMv8.0 with NEON. See docs/local-model.md for the measured cost and the reasons.
"""

from __future__ import annotations

import hashlib
import platform
import sys

__all__ = [
    "LLAMA_CPP_VERSION",
    "PORTABLE_X86_FEATURES",
    "build_key",
    "cmake_args",
    "non_portable_features",
]

LLAMA_CPP_VERSION = "0.3.36"
"""The llama-cpp-python release ``scripts/setup`` builds (its sdist from the package index)."""

_COMMON = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF"]
# Runtime dispatch: one CPU backend per CPU generation, installed beside libggml in the wheel
# (a STRING, so that CMake does not make the relative path absolute against the build folder).
_X86 = [
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib",
]

PORTABLE_X86_FEATURES = frozenset({"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"})
"""The x86 instruction-set features a build with fixed portable flags (AVX2 baseline) may report;
a build with runtime dispatch reports those of the variant it loaded instead."""
# Features llama.cpp reports that are not instruction sets (always allowed).
_NOT_ISA = frozenset({"LLAMAFILE", "OPENMP", "REPACK", "KLEIDIAI", "ACCELERATE", "BLAS"})


def cmake_args(machine: str | None = None) -> str:
    """The ``CMAKE_ARGS`` of the portable build for ``machine`` (default: this one's).

    Args:
        machine: ``platform.machine()`` value: ``x86_64``/``AMD64`` or ``aarch64``/``arm64``;
            anything else gets only the common flags (no native instructions).

    Returns:
        The flags as one space-separated string.
    """
    machine = (machine or platform.machine()).lower()
    flags = list(_COMMON)
    if machine in ("x86_64", "amd64"):
        flags += _X86
    return " ".join(flags)


def build_key(machine: str | None = None) -> str:
    """A name for one build: version, machine and a hash of the flags (a cache directory name)."""
    machine = (machine or platform.machine()).lower()
    digest = hashlib.sha256(cmake_args(machine).encode()).hexdigest()[:12]
    return f"llama-cpp-python-{LLAMA_CPP_VERSION}-{machine}-{digest}"


def non_portable_features(system_info: str) -> list[str]:
    """The instruction sets a build uses beyond the portable x86 baseline.

    Args:
        system_info: llama.cpp's ``llama_print_system_info()`` text, e.g.
            ``"CPU : SSE3 = 1 | AVX = 1 | AVX512 = 1 | ..."``.

    Returns:
        The names of enabled features outside :data:`PORTABLE_X86_FEATURES` (``["AVX512",
        "AVX512_VNNI"]`` for a native build on such a CPU); ``[]`` for a portable build, and for
        reports of other architectures (arm64 builds are baseline by construction).
    """
    enabled: list[str] = []
    for item in system_info.replace("\n", "|").split("|"):
        name, _, value = item.partition("=")
        name = name.split(":")[-1].strip()
        if value.strip() == "1" and name:
            enabled.append(name)
    if not any(name in PORTABLE_X86_FEATURES for name in enabled):
        return []
    return [n for n in enabled if n not in PORTABLE_X86_FEATURES and n not in _NOT_ISA]


if __name__ == "__main__":
    # `python llama_build.py` prints: version, cmake args, build key (one per line)
    print(LLAMA_CPP_VERSION)
    print(cmake_args())
    print(build_key())
    sys.exit(0)
