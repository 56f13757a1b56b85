"""The model worker: a child process that holds the local model and generates on request.

The API server and runner processes never load llama.cpp themselves: a crash in native code
(a segfault, an abort, the kernel's out-of-memory killer) would take every WebSocket, request and
runner of the process with it. Instead :mod:`agent_network.runtime.model_supervisor` starts this
module as ``python -m agent_network.runtime.model_worker --model PATH --socket PATH`` and talks
to it over HTTP on a Unix domain socket (Starlette served by uvicorn):

* ``GET /health``: ``{"ready": true, "model": str, "pid": int, "system_info": str,
  "cpu_variant": str | null}`` once the weights are loaded (the socket exists only from then
  on). ``system_info`` is llama.cpp's list of the CPU features in use; ``cpu_variant`` names the
  CPU backend picked at load time by a build with runtime dispatch (:func:`load_cpu_backends`).
* ``POST /generate`` with ``{"messages": [{"role", "content"}...], "options": {...}}``: one
  chat completion, llama-cpp-python's ``create_chat_completion`` result as JSON. ``options`` are
  its keyword arguments (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  ``seed``, ``stop``, ``repeat_penalty``, ``frequency_penalty``, ``presence_penalty``); anything
  else is refused with 422. The messages are fitted to the context window first (oldest
  non-system messages dropped), and an empty reply is sampled again up to three times.

Requests are served one at a time (a ``Llama`` is not thread-safe, and one CPU-bound generation
at a time is also the fastest order on a small machine). The body is bounded
(:data:`MAX_BODY_BYTES`) before it is read whole.

The worker exits by itself within :data:`PARENT_POLL_SECONDS` when its parent dies (even by
SIGKILL), so no orphan keeps the weights in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOWED_OPTIONS",
    "EMPTY_REPLY_ATTEMPTS",
    "MAX_BODY_BYTES",
    "N_CTX",
    "PARENT_POLL_SECONDS",
    "SEED",
    "fit_to_context",
    "load_cpu_backends",
    "main",
]

N_CTX = 2048
"""Context window (prompt plus reply, in tokens) the model is loaded with."""
SEED = 20240601
"""Default sampling seed, so that runs are reproducible."""
EMPTY_REPLY_ATTEMPTS = 3
"""How often an empty reply is sampled in all before it is returned as it is."""
MAX_BODY_BYTES = 1_000_000
"""Largest ``/generate`` request body accepted, in bytes (413 beyond)."""
PARENT_POLL_SECONDS = 0.5
"""How often the worker checks that the process that started it is still alive, in seconds."""
ALLOWED_OPTIONS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
    }
)
"""The ``create_chat_completion`` keyword arguments a request may set."""

# Tokens kept free for the chat template's own tokens around each message.
_TEMPLATE_OVERHEAD_TOKENS = 8


def fit_to_context(
    count_tokens: Any, chat: list[dict[str, str]], max_tokens: int, n_ctx: int = N_CTX
) -> list[dict[str, str]]:
    """Drop the oldest non-system messages (then shorten what is left) to fit the context window.

    Args:
        count_tokens: ``str -> int``, the number of tokens of a text (the model's tokenizer).
        chat: ``[{"role": ..., "content": ...}, ...]``, oldest first.
        max_tokens: Tokens reserved for the reply.
        n_ctx: The context window, in tokens.

    Returns:
        A new list whose total cost fits ``n_ctx - max_tokens``. The last message is always kept;
        if it alone is too long, its beginning is cut (the most recent text stays).
    """
    budget = n_ctx - max_tokens - _TEMPLATE_OVERHEAD_TOKENS

    def cost(message: dict[str, str]) -> int:
        return int(count_tokens(message["content"])) + _TEMPLATE_OVERHEAD_TOKENS

    messages = list(chat)
    costs = [cost(m) for m in messages]
    while sum(costs) > budget and len(messages) > 1:
        # The first message that is not a leading system prompt, or else the oldest one.
        index = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), 0)
        del messages[index]
        del costs[index]
    if messages and sum(costs) > budget:
        last = messages[-1]
        keep_chars = max(1, budget) * 3  # ~3 characters per token for English text
        messages[-1] = {"role": last["role"], "content": last["content"][-keep_chars:]}
        while cost(messages[-1]) > budget and len(messages[-1]["content"]) > 1:
            content = messages[-1]["content"]
            messages[-1] = {"role": last["role"], "content": content[len(content) // 4 :]}
    return messages


def load_cpu_backends(variant: str | None = None) -> str | None:
    """Load the CPU backend variant that suits this CPU, for a build with runtime dispatch.

    A llama.cpp build with ``GGML_BACKEND_DL`` and ``GGML_CPU_ALL_VARIANTS`` ships one
    ``libggml-cpu-<variant>.so`` per CPU generation beside ``libggml.so`` and loads none by itself
    from there (ggml searches the executable's directory and the working directory). This calls
    ggml's ``ggml_backend_load_all_from_path`` on the package's ``lib`` directory, which scores
    every variant against the running CPU and loads the best (ggml-backend-reg.cpp). Must run
    before the first ``Llama`` is created.

    Args:
        variant: Load this variant instead of the best one (``"haswell"``, ``"x64"``...; the
            worker takes it from ``AGENT_NETWORK_CPU_VARIANT``), e.g. to avoid one that
            misbehaves on some CPU. A variant the CPU lacks instructions for crashes the worker.

    Returns:
        The name of the variant loaded (``"haswell"``, ``"zen4"``...), or ``None`` for a build
        with one built-in CPU backend.

    Raises:
        FileNotFoundError: ``variant`` is not one of the build's variants.
    """
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if not any(lib_dir.glob("libggml-cpu-*.so")):
        return None
    # The registry must be the one of the libggml that libllama loaded (by its soname), not a
    # second copy: the wheel holds libggml.so and libggml.so.0 as separate files.
    ggml = ctypes.CDLL(_mapped("libggml.so") or "libggml.so.0")
    if variant:
        path = lib_dir / f"libggml-cpu-{variant}.so"
        if not path.is_file():
            known = sorted(p.name[len("libggml-cpu-") : -3] for p in lib_dir.glob("libggml-cpu-*"))
            raise FileNotFoundError(f"no CPU variant {variant!r}; this build has {known}")
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load(str(path).encode())
    else:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path.restype = None
        ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
    return _loaded_cpu_variant()


def _mapped(prefix: str) -> str | None:
    """The path of a file mapped into this process whose name starts with ``prefix``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and path.rsplit("/", 1)[-1].startswith(prefix):
            return path
    return None


def _loaded_cpu_variant() -> str | None:
    """The variant of the ``libggml-cpu-<variant>.so`` mapped into this process."""
    path = _mapped("libggml-cpu-")
    if path is None:
        return None
    return path.rsplit("/", 1)[-1].removeprefix("libggml-cpu-").split(".so")[0]


class _Model:
    """The loaded ``llama_cpp.Llama`` and the one-at-a-time generation around it."""

    def __init__(self, path: Path) -> None:
        self.cpu_variant = load_cpu_backends(os.environ.get("AGENT_NETWORK_CPU_VARIANT") or None)
        from llama_cpp import Llama, llama_print_system_info

        self.path = path
        self.llama: Any = Llama(model_path=str(path), n_ctx=N_CTX, verbose=False, seed=SEED)
        self.system_info = llama_print_system_info().decode("utf-8", "replace").strip()
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        data = text.encode("utf-8", errors="replace")
        return len(self.llama.tokenize(data, add_bos=False, special=False))

    def generate(self, chat: list[dict[str, str]], options: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            max_tokens = int(options.get("max_tokens") or 160)
            fitted = fit_to_context(self.count_tokens, chat, max_tokens)
            result: dict[str, Any] = {}
            for _ in range(EMPTY_REPLY_ATTEMPTS):
                result = self.llama.create_chat_completion(messages=fitted, **options)
                if (result["choices"][0]["message"].get("content") or "").strip():
                    break
            return result


def _validate(body: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The messages and options of a ``/generate`` body; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    chat: list[dict[str, str]] = []
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("system", "user", "assistant")
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError("each message needs a role (system/user/assistant) and a content")
        chat.append({"role": message["role"], "content": message["content"]})
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError("'options' must be an object")
    unknown = sorted(set(options) - ALLOWED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(unknown)}")
    return chat, dict(options)


def _app(model: _Model) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "ready": True,
                "model": str(model.path),
                "pid": os.getpid(),
                "system_info": model.system_info,
                "cpu_variant": model.cpu_variant,
            }
        )

    async def generate(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body too large"}, status_code=413)
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            chat, options = _validate(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        # Blocking on purpose: one generation at a time, and nothing else to serve meanwhile.
        return JSONResponse(model.generate(chat, options))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
        ]
    )


def _watch_parent(parent_pid: int) -> None:
    """Exit the process as soon as the parent is gone (its pid is no longer our parent's)."""
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Run the worker: load the weights, then serve on the Unix socket until stopped.

    Args:
        argv: ``--model PATH --socket PATH [--parent PID]`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after a normal stop, 2 when the weights cannot be loaded (the reason
        is written to standard error).
    """
    parser = argparse.ArgumentParser(prog="agent_network.runtime.model_worker")
    parser.add_argument("--model", required=True, type=Path, help="GGUF weights file")
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to serve on")
    parser.add_argument("--parent", type=int, default=os.getppid(), help="exit when it dies")
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    try:
        model = _Model(args.model)
    except Exception as exc:
        print(f"model_worker: cannot load {args.model}: {exc}", file=sys.stderr, flush=True)
        return 2
    import uvicorn

    uvicorn.run(
        _app(model),
        uds=str(args.socket),
        log_level="warning",
        access_log=False,
        lifespan="off",
        loop="asyncio",
        http="h11",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
