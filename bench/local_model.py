"""Tokens per second of the portable llama.cpp build against a native build, on this machine.

Run:  .venv/bin/python bench/local_model.py [--tokens 256] [--runs 5] [--json]
      [--portable-wheel W.whl] [--native-wheel W.whl]

The portable wheel is the one ``scripts/setup local`` built and kept
(``~/.cache/agent-network/wheels/<build key>/``, flags in
``src/agent_network/runtime/llama_build.py``). The native wheel is built here once with
``CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"`` (ggml's default: ``-march=native``; about 8
minutes on 2 cores, with progress) and kept in ``~/.cache/agent-network/bench/``; it is never
installed into the project. Each wheel is unpacked into its own temporary directory and run by a
child interpreter with that directory first on ``sys.path``, loading the bundled SmolLM2-135M
weights with the settings the model worker uses (n_ctx 2048, default threads); a build with
runtime CPU dispatch first loads its best CPU variant (``load_cpu_backends``). Each run generates
``--tokens`` tokens greedily from the same story prompt (end of text banned, so every run
generates exactly that many) and times generation and prompt processing separately. Runs
alternate between the builds (A B A B ...) so that drift on a shared machine hits both alike.
Prints the median, min and max tok/s per build and the ratio portable / native (the issue's
target: within 15%, i.e. a ratio of at least 0.85). Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from agent_network.runtime.llama_build import LLAMA_CPP_VERSION, build_key  # noqa: E402
from agent_network.runtime.local_model import find_gguf_path  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agent-network"
NATIVE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"

# Runs in the child interpreter: loads the model, prints one JSON line per run.
CHILD = r"""
import json, sys, time
from agent_network.runtime.model_worker import N_CTX, load_cpu_backends
variant = load_cpu_backends()
import llama_cpp
from llama_cpp import Llama, llama_print_system_info
path, tokens, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=N_CTX, verbose=False, seed=1)
eos = llm.token_eos()
prompt = "Once upon a time, in a lighthouse by the sea, there lived an old keeper who"
print(json.dumps({"lib": llama_cpp.__file__, "variant": variant,
                  "system_info": llama_print_system_info().decode()}), flush=True)
llm.create_completion(prompt, max_tokens=16, temperature=0.0)  # warm-up
for _ in range(runs):
    llm.reset()
    started = time.perf_counter()
    first = None
    count = 0
    for _chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0,
                                        logit_bias={eos: -1e9}, stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    print(json.dumps({"tokens": count, "prefill_s": first - started,
                      "gen_tok_s": (count - 1) / (done - first)}), flush=True)
"""


def build_native(dest: Path) -> Path:
    """Build the native wheel into ``dest`` (once), printing progress; returns the wheel."""
    found = sorted(dest.glob("*.whl"))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    print(f"building a native llama-cpp-python {LLAMA_CPP_VERSION} ({NATIVE_ARGS}) ...")
    log = dest / "build.log"
    env = {**os.environ, "CMAKE_ARGS": NATIVE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    args = [sys.executable, "-m", "pip", "wheel", "--verbose", "--no-deps", "--no-cache-dir"]
    args += ["--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
    args += ["-w", str(dest)]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(20)
            steps = [w for w in log.read_text(errors="replace").split() if w.startswith("[")]
            step = next((w for w in reversed(steps) if "/" in w and w.endswith("]")), "")
            print(f"  ... {time.monotonic() - started:.0f} s {step}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"native build failed; log: {log}")
    return sorted(dest.glob("*.whl"))[-1]


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's files under ``into`` (a wheel is a zip of site-packages content)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    for lib in into.glob("llama_cpp/lib/*.so*"):
        lib.chmod(0o755)
    return into


def run_build(site: Path, model: Path, tokens: int, runs: int) -> tuple[dict[str, Any], list[Any]]:
    """Run the child on one unpacked build: (its header line, its per-run lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(tokens), str(runs)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"the build in {site} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return lines[0], lines[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5, help="alternating rounds per build")
    parser.add_argument("--portable-wheel", type=Path)
    parser.add_argument("--native-wheel", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = find_gguf_path()
    if model is None:
        sys.exit("the bundled model is not installed: scripts/setup local")
    portable = args.portable_wheel
    if portable is None:
        kept = sorted((CACHE / "wheels" / build_key()).glob("*.whl"))
        if not kept:
            sys.exit("no portable wheel kept yet: run scripts/setup local first")
        portable = kept[-1]
    native = args.native_wheel or build_native(CACHE / "bench" / f"native-{LLAMA_CPP_VERSION}")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="an-bench-llama-") as tmp:
        sites = {
            "portable": unpack(portable, Path(tmp) / "portable"),
            "native": unpack(native, Path(tmp) / "native"),
        }
        for name in sites:
            results[name] = {"wheel": str(portable if name == "portable" else native), "runs": []}
        for _ in range(args.runs):
            for name, site in sites.items():  # A B A B ...
                header, lines = run_build(site, model, args.tokens, 1)
                results[name]["header"] = header
                results[name]["runs"].extend(lines)

    summary: dict[str, Any] = {"tokens": args.tokens, "runs": args.runs, "builds": {}}
    for name, data in results.items():
        gen = [r["gen_tok_s"] for r in data["runs"]]
        prefill = [r["prefill_s"] * 1000 for r in data["runs"]]
        summary["builds"][name] = {
            "wheel": data["wheel"],
            "cpu_variant": data["header"]["variant"],
            "system_info": data["header"]["system_info"].strip(),
            "gen_tok_s_median": round(statistics.median(gen), 1),
            "gen_tok_s_min": round(min(gen), 1),
            "gen_tok_s_max": round(max(gen), 1),
            "prefill_ms_median": round(statistics.median(prefill), 1),
        }
    ratio = (
        summary["builds"]["portable"]["gen_tok_s_median"]
        / summary["builds"]["native"]["gen_tok_s_median"]
    )
    summary["ratio_portable_over_native"] = round(ratio, 3)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name, b in summary["builds"].items():
        variant = f" (variant {b['cpu_variant']})" if b["cpu_variant"] else ""
        print(f"{name}{variant}: {b['system_info']}")
        print(
            f"  generation {b['gen_tok_s_median']} tok/s median "
            f"(min {b['gen_tok_s_min']}, max {b['gen_tok_s_max']}), "
            f"prompt {b['prefill_ms_median']} ms"
        )
    mark = "PASS" if ratio >= 0.85 else "MISS"
    print(f"portable / native: {ratio:.3f}  [{mark}: target >= 0.85]")


if __name__ == "__main__":
    main()
