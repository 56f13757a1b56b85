"""Starting, watching and restarting the model worker process (one per server or runner process).

:class:`ModelSupervisor` owns at most one :mod:`~agent_network.runtime.model_worker` child at a
time, so at most one copy of the local model's weights is in memory per process that runs
routines. Every generation goes through :meth:`ModelSupervisor.generate`, which

* starts the worker if none runs (waiting out the restart backoff after a failure),
* sends the request and waits at most ``timeout`` seconds for the answer,
* and, when the worker dies during the request (segfault, abort, SIGKILL from the kernel's
  out-of-memory killer) or does not answer in time (it is then killed), raises
  :class:`~agent_network.errors.ModelWorkerError` with a reason a person can act on. The next
  call starts a new worker after a backoff of 0.5 s, doubled per consecutive failure up to 30 s.

The supervisor is thread-safe and blocking; async callers run it in a worker thread
(:meth:`LocalLlamaModel.request <agent_network.runtime.local_model.LocalLlamaModel.request>`).
The process-wide instance is :func:`get_supervisor`; it stops its worker at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent_network.errors import ModelUnavailableError, ModelWorkerError

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_START",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "ModelSupervisor",
    "WorkerStatus",
    "get_supervisor",
    "reset_supervisor",
    "worker_status",
]

DEFAULT_TIMEOUT = 120.0
"""Seconds one generation may take before the worker counts as hung (``AGENT_NETWORK_MODEL_TIMEOUT``
overrides it)."""
DEFAULT_START_TIMEOUT = 120.0
"""Seconds a starting worker may take to load the weights and listen."""
BACKOFF_START = 0.5
"""Seconds to wait before the first restart after a failure."""
BACKOFF_MAX = 30.0
"""Longest wait between restarts, in seconds."""
_LOG_TAIL_BYTES = 2000
_FIX_HINT = "If this keeps happening, run `agent-network doctor`."

_SIGNAL_REASONS = {
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGILL: (
        "stopped on an illegal instruction (SIGILL): the llama.cpp build uses CPU instructions "
        "this machine lacks; rebuild it with `scripts/setup local` (portable flags)"
    ),
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGFPE: "crashed with an arithmetic error (SIGFPE)",
    signal.SIGKILL: (
        "was killed (SIGKILL), most often by the kernel's out-of-memory killer: free memory "
        "or give the machine more"
    ),
    signal.SIGTERM: "was terminated (SIGTERM)",
}


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot of the supervisor.

    ``state`` is ``"stopped"`` (no worker yet, or stopped), ``"starting"``, ``"ready"``,
    ``"busy"`` (a generation is in flight) or ``"backoff"`` (failed; the next start waits
    ``retry_in`` seconds). ``pid`` is the worker's process id while one runs; ``restarts`` counts
    the workers started after a failure; ``last_failure`` is the reason of the latest failure.
    """

    state: str
    pid: int | None
    model: str | None
    restarts: int
    failures: int
    last_failure: str | None
    retry_in: float

    def public(self) -> dict[str, Any]:
        """The status without the process id, for unauthenticated health checks."""
        return {
            "state": self.state,
            "model": Path(self.model).name if self.model else None,
            "restarts": self.restarts,
            "last_failure": self.last_failure,
        }


def _reason_for(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"died on signal {-returncode}"
        return _SIGNAL_REASONS.get(sig, f"died on signal {sig.name}")
    return f"exited with status {returncode}"


class ModelSupervisor:
    """Owns the model worker process of this process: starts, times out, restarts it.

    Args:
        timeout: Seconds one generation may take before the worker is killed as hung; default
            ``AGENT_NETWORK_MODEL_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`.
        start_timeout: Seconds a new worker may take to load its weights.
        python: The interpreter that runs the worker (default: this one).
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        python: str | None = None,
    ) -> None:
        if timeout is None:
            timeout = float(os.environ.get("AGENT_NETWORK_MODEL_TIMEOUT") or DEFAULT_TIMEOUT)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.python = python or sys.executable
        self._lock = threading.Lock()  # one request (and one start) at a time
        self._proc: subprocess.Popen[bytes] | None = None
        self._model: Path | None = None
        self._dir: Path | None = None
        self._client: httpx.Client | None = None
        self._system_info = ""
        self._cpu_variant: str | None = None
        self._busy = False
        self._starting = False
        self._restarts = 0
        self._failures = 0
        self._last_failure: str | None = None
        self._next_start = 0.0

    # ------------------------------------------------------------------ public

    def status(self) -> WorkerStatus:
        """A snapshot of the worker's state (never blocks)."""
        proc = self._proc
        alive = proc is not None and proc.poll() is None
        retry_in = max(0.0, self._next_start - time.monotonic()) if self._failures else 0.0
        if self._starting:
            state = "starting"
        elif alive:
            state = "busy" if self._busy else "ready"
        elif self._failures:
            state = "backoff"
        else:
            state = "stopped"
        return WorkerStatus(
            state=state,
            pid=proc.pid if alive and proc is not None else None,
            model=str(self._model) if self._model else None,
            restarts=self._restarts,
            failures=self._failures,
            last_failure=self._last_failure,
            retry_in=round(retry_in, 3),
        )

    @property
    def system_info(self) -> str:
        """llama.cpp's CPU feature list of the running worker's build ("" before a start)."""
        return self._system_info

    @property
    def cpu_variant(self) -> str | None:
        """The CPU backend variant the running worker's build picked at load time (a build with
        runtime dispatch), else ``None``."""
        return self._cpu_variant

    def generate(
        self, model: Path, messages: list[dict[str, str]], options: dict[str, Any]
    ) -> dict[str, Any]:
        """Run one chat completion in the worker (blocking; thread-safe, one at a time).

        Args:
            model: The GGUF file. A worker holding another model is stopped first, so only one
                model is loaded at a time.
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            options: ``create_chat_completion`` keyword arguments
                (:data:`~agent_network.runtime.model_worker.ALLOWED_OPTIONS`).

        Returns:
            llama-cpp-python's chat completion: ``{"choices": [{"message": {"content": ...},
            "finish_reason": ...}], "usage": {...}}``.

        Raises:
            ModelWorkerError: the worker died during the request or did not answer within
                ``timeout`` seconds (it is killed); the next call starts a new one.
            ModelUnavailableError: a worker could not be started (the weights do not load, the
                process dies at start), with the reason from its output.
        """
        with self._lock:
            client = self._ensure_started(model)
            self._busy = True
            try:
                response = client.post(
                    "/generate",
                    json={"messages": messages, "options": options},
                    timeout=httpx.Timeout(self.timeout, connect=10.0),
                )
            except httpx.TimeoutException:
                self._kill()
                raise self._failure(
                    f"did not answer within {self.timeout:g} s while generating a reply and was "
                    "stopped (a slower machine may need a larger AGENT_NETWORK_MODEL_TIMEOUT)",
                    None,
                ) from None
            except httpx.TransportError:
                returncode = self._reap()
                reason = f"{_reason_for(returncode)} while generating a reply"
                raise self._failure(reason, returncode) from None
            finally:
                self._busy = False
            if response.status_code != 200:
                raise ModelUnavailableError(
                    f"The local model worker refused the request ({response.status_code}): "
                    f"{response.text[:300]}",
                    details={"status": response.status_code},
                )
            self._failures = 0
            result: dict[str, Any] = response.json()
            return result

    def start(self, model: Path) -> str:
        """Start the worker for ``model`` now if none runs (blocking).

        Returns:
            llama.cpp's CPU feature list of the worker's build.

        Raises:
            ModelUnavailableError: as :meth:`generate`.
        """
        with self._lock:
            self._ensure_started(model)
            return self._system_info

    def stop(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after 5 s) and forget the failure count."""
        with self._lock:
            self._kill(graceful=True)
            self._cleanup()
            self._failures = 0
            self._last_failure = None

    # ------------------------------------------------------------------ internals

    def _ensure_started(self, model: Path) -> httpx.Client:
        proc = self._proc
        if proc is not None and proc.poll() is None and self._model == model and self._client:
            return self._client
        if proc is not None:
            if proc.poll() is not None:  # died while idle
                self._record_failure(f"{_reason_for(proc.returncode)} while idle")
            else:  # another model was asked for: only one is loaded at a time
                self._kill(graceful=True)
                self._cleanup()
        wait = self._next_start - time.monotonic()
        if self._failures and wait > 0:
            time.sleep(wait)
        self._starting = True
        try:
            return self._spawn(model)
        finally:
            self._starting = False

    def _spawn(self, model: Path) -> httpx.Client:
        directory = Path(tempfile.mkdtemp(prefix="an-model-"))
        socket_path = directory / "worker.sock"
        log_path = directory / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "agent_network.runtime.model_worker",
                    "--model",
                    str(model),
                    "--socket",
                    str(socket_path),
                    "--parent",
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
            )
        if self._failures:
            self._restarts += 1
        self._proc, self._model, self._dir = proc, model, directory
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://worker"
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                client.close()
                self._fail_start(_reason_for(proc.returncode), proc.returncode)
            if socket_path.exists():
                try:
                    health = client.get("/health", timeout=5.0)
                    if health.status_code == 200:
                        body = health.json()
                        self._system_info = str(body.get("system_info", ""))
                        self._cpu_variant = body.get("cpu_variant")
                        self._client = client
                        return client
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                client.close()
                self._kill()
                self._fail_start(f"did not load the model within {self.start_timeout:g} s", None)
            time.sleep(0.05)

    def _fail_start(self, reason: str, returncode: int | None) -> None:
        tail = self._log_tail()
        self._record_failure(f"could not start: {reason}")
        detail = f" Its last output: {tail}" if tail else ""
        raise ModelUnavailableError(
            f"The local model worker could not start: it {reason}.{detail} "
            "Run `agent-network doctor` for what to do.",
            details={"returncode": returncode, "log": tail},
        )

    def _failure(self, reason: str, returncode: int | None) -> ModelWorkerError:
        tail = self._log_tail()
        self._record_failure(reason)
        retry_in = max(0.0, self._next_start - time.monotonic())
        return ModelWorkerError(
            f"The local model worker {reason}; no reply was posted. "
            f"It restarts automatically (in {retry_in:.1f} s). {_FIX_HINT}",
            details={"returncode": returncode, "log": tail, "restart_in": round(retry_in, 3)},
        )

    def _record_failure(self, reason: str) -> None:
        self._failures += 1
        self._last_failure = reason
        backoff = min(BACKOFF_MAX, BACKOFF_START * 2 ** (self._failures - 1))
        self._next_start = time.monotonic() + backoff
        self._cleanup()

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            with open(self._dir / "worker.log", "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-500:]

    def _reap(self) -> int | None:
        """The worker's exit status after a broken connection (killed if it lingers)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._kill()
            return proc.returncode

    def _kill(self, *, graceful: bool = False) -> None:
        """Stop the worker process (its files stay until :meth:`_cleanup`)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # an unkillable process
                proc.wait(timeout=5.0)

    def _cleanup(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._dir is not None and self._proc is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


_supervisor: ModelSupervisor | None = None
_supervisor_lock = threading.Lock()


def get_supervisor() -> ModelSupervisor:
    """The process-wide supervisor (created on first use; its worker stops at exit)."""
    global _supervisor
    with _supervisor_lock:
        if _supervisor is None:
            _supervisor = ModelSupervisor()
            atexit.register(_supervisor.stop)
        return _supervisor


def reset_supervisor() -> None:
    """Stop the process-wide supervisor's worker and forget it (the next use starts afresh)."""
    global _supervisor
    with _supervisor_lock:
        if _supervisor is not None:
            _supervisor.stop()
        _supervisor = None


def worker_status() -> dict[str, Any]:
    """This process's model worker status without its pid (:meth:`WorkerStatus.public`).

    Creates no supervisor: before the first local-model request the state is ``"stopped"``.
    """
    supervisor = _supervisor
    if supervisor is None:
        return {"state": "stopped", "model": None, "restarts": 0, "last_failure": None}
    return supervisor.status().public()
