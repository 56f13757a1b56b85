"""The local model runs in a supervised worker process: crashes, hangs and bad builds are contained.

Real worker processes with the real bundled model (SmolLM2 via llama.cpp); crashes are real
signals sent to the worker (SIGSEGV, SIGKILL), a hang is a worker stopped with SIGSTOP. The
server-level tests run ``agent-network serve`` as a real process and check that it keeps serving
REST and WebSocket while its worker dies, that the failure is audited as ``routine.failed`` and
that the next message is answered by a restarted worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from agent_network.errors import ModelUnavailableError, ModelWorkerError
from agent_network.runtime.local_model import find_gguf_path
from agent_network.runtime.model_supervisor import ModelSupervisor
from agent_network.runtime.model_worker import fit_to_context
from conftest import LiveServer, Org, free_port
from test_remote_runner import (  # fixtures and helpers, no tests
    RunnerProc,
    post,
    quiet_server,
    replies_by_trigger,
    runners,
    wait_until,
)

__all__ = ["quiet_server", "runners"]  # fixtures used here, imported from test_remote_runner

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or find_gguf_path() is None,
    reason="the local model is not installed: scripts/setup local",
)
LONG = [
    {"role": "system", "content": "You are a storyteller who never stops."},
    {"role": "user", "content": "Tell a very long story about a dragon and a lighthouse."},
]
LONG_OPTIONS = {"max_tokens": 1500, "temperature": 0.8, "seed": 7}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


@pytest.fixture
def supervisor() -> Iterator[ModelSupervisor]:
    sup = ModelSupervisor(timeout=60.0)
    try:
        yield sup
    finally:
        sup.stop()


def generate_in_thread(
    sup: ModelSupervisor, path: Path
) -> tuple[threading.Thread, dict[str, BaseException | dict[str, Any]]]:
    outcome: dict[str, BaseException | dict[str, Any]] = {}

    def run() -> None:
        try:
            outcome["result"] = sup.generate(path, LONG, LONG_OPTIONS)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# --- the supervisor with a real worker ---


@needs_model
@pytest.mark.local_model
@pytest.mark.parametrize(
    ("sig", "words"),
    [(signal.SIGSEGV, "segmentation fault (SIGSEGV)"), (signal.SIGKILL, "SIGKILL")],
)
def test_worker_killed_during_a_generation_is_reported_then_replaced(
    supervisor: ModelSupervisor, sig: signal.Signals, words: str
) -> None:
    path = find_gguf_path()
    assert path is not None
    supervisor.start(path)
    first_pid = supervisor.status().pid
    assert first_pid is not None and alive(first_pid)

    thread, outcome = generate_in_thread(supervisor, path)
    wait_until("the generation to start", lambda: supervisor.status().state == "busy")
    time.sleep(0.3)  # well inside a 1,500-token generation
    os.kill(first_pid, sig)
    thread.join(timeout=30)
    assert not thread.is_alive()

    error = outcome.get("error")
    assert isinstance(error, ModelWorkerError), outcome
    assert words in error.message and "restarts automatically" in error.message
    assert error.status == 503 and error.code == "model_worker_failed"
    assert error.details["returncode"] == -sig
    status = supervisor.status()
    assert status.state == "backoff" and status.failures == 1 and words in str(status.last_failure)

    # the next request starts a new worker (after the backoff) and is answered
    # (a short answer: the storyteller's prompt could otherwise run for a minute on a loaded CPU)
    result = supervisor.generate(
        path, [*LONG[:1], {"role": "user", "content": "Hi"}], {"max_tokens": 16}
    )
    assert result["choices"][0]["message"]["content"].strip()
    status = supervisor.status()
    assert status.state == "ready" and status.restarts == 1 and status.failures == 0
    assert status.pid is not None and status.pid != first_pid
    assert not alive(first_pid)


@needs_model
@pytest.mark.local_model
def test_hung_worker_is_timed_out_killed_and_replaced() -> None:
    path = find_gguf_path()
    assert path is not None
    sup = ModelSupervisor(timeout=2.0)
    try:
        sup.start(path)
        hung_pid = sup.status().pid
        assert hung_pid is not None
        os.kill(hung_pid, signal.SIGSTOP)  # alive, holds its socket, never answers
        started = time.monotonic()
        with pytest.raises(ModelWorkerError) as caught:
            sup.generate(path, LONG, {"max_tokens": 8})
        assert time.monotonic() - started < 30
        assert "did not answer within 2 s" in caught.value.message
        assert "AGENT_NETWORK_MODEL_TIMEOUT" in caught.value.message
        wait_until("the hung worker to be gone", lambda: not alive(hung_pid), timeout=10)

        sup.timeout = 120.0  # a real generation on a busy machine may take more than 2 s
        result = sup.generate(path, [*LONG[:1], {"role": "user", "content": "Hi"}], {})
        assert result["choices"][0]["message"]["content"].strip()
        assert sup.status().restarts == 1
    finally:
        sup.stop()


@needs_model
@pytest.mark.local_model
def test_a_worker_dead_while_idle_is_restarted_for_the_next_request(
    supervisor: ModelSupervisor,
) -> None:
    path = find_gguf_path()
    assert path is not None
    supervisor.start(path)
    pid = supervisor.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until("the worker to die", lambda: supervisor.status().state != "ready")
    result = supervisor.generate(path, [{"role": "user", "content": "Say hi."}], {})
    assert result["choices"][0]["message"]["content"].strip()
    status = supervisor.status()
    assert status.pid not in (None, pid) and status.restarts == 1
    assert "SIGKILL" in str(status.last_failure) and "while idle" in str(status.last_failure)


def test_weights_that_do_not_load_give_the_reason_and_no_worker(
    tmp_path: Path, supervisor: ModelSupervisor
) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file" * 100)
    with pytest.raises(ModelUnavailableError) as caught:
        supervisor.generate(bogus, [{"role": "user", "content": "Hi"}], {})
    assert not isinstance(caught.value, ModelWorkerError)
    message = caught.value.message
    assert "could not start" in message and "agent-network doctor" in message
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "cannot load" in message and "not-a-model.gguf" in message
    status = supervisor.status()
    assert status.pid is None and status.state == "backoff"


@needs_model
@pytest.mark.local_model
def test_only_one_model_is_loaded_at_a_time(tmp_path: Path, supervisor: ModelSupervisor) -> None:
    path = find_gguf_path()
    assert path is not None
    other = tmp_path / "other.gguf"
    other.symlink_to(path)
    supervisor.start(path)
    first = supervisor.status().pid
    assert first is not None
    supervisor.generate(other, [{"role": "user", "content": "Hi"}], {"max_tokens": 4})
    second = supervisor.status().pid
    assert second is not None and second != first
    assert not alive(first)
    assert supervisor.status().model == str(other)


@needs_model
@pytest.mark.local_model
def test_a_request_the_worker_refuses_leaves_it_serving(supervisor: ModelSupervisor) -> None:
    path = find_gguf_path()
    assert path is not None
    with pytest.raises(ModelUnavailableError) as caught:
        supervisor.generate(path, [{"role": "user", "content": "Hi"}], {"n_gpu_layers": 99})
    assert "422" in caught.value.message and "n_gpu_layers" in caught.value.message
    assert not isinstance(caught.value, ModelWorkerError)
    pid = supervisor.status().pid
    result = supervisor.generate(path, [{"role": "user", "content": "Hi"}], {"max_tokens": 4})
    assert result["usage"]["completion_tokens"] > 0
    assert supervisor.status().pid == pid and supervisor.status().restarts == 0


@needs_model
@pytest.mark.local_model
def test_the_worker_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from agent_network.runtime.local_model import find_gguf_path\n"
        "from agent_network.runtime.model_supervisor import ModelSupervisor\n"
        "s = ModelSupervisor()\n"
        "s.start(find_gguf_path())\n"
        "print(s.status().pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        assert alive(worker_pid)
        parent.kill()
        parent.wait(timeout=10)
        wait_until("the orphaned worker to exit", lambda: not alive(worker_pid), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_fit_to_context_drops_the_oldest_turns_then_cuts_the_last() -> None:
    def count(text: str) -> int:
        return len(text.split())

    chat = [
        {"role": "system", "content": "sys " * 10},
        {"role": "user", "content": "old " * 50},
        {"role": "assistant", "content": "mid " * 50},
        {"role": "user", "content": "new " * 20},
    ]
    # each message costs its words + 8; the budget is 140 - 10 - 8 = 122: "old" must go
    fitted = fit_to_context(count, chat, max_tokens=10, n_ctx=140)
    assert [m["content"].split()[0] for m in fitted] == ["sys", "mid", "new"]
    # budget 92: "mid" goes too, the system prompt stays
    fitted = fit_to_context(count, chat, max_tokens=10, n_ctx=110)
    assert [m["content"].split()[0] for m in fitted] == ["sys", "new"]

    alone = fit_to_context(count, [{"role": "user", "content": "w " * 500}], 10, n_ctx=60)
    assert len(alone) == 1 and 0 < count(alone[0]["content"]) <= 42


# --- a real server process whose worker crashes ---


def _worker_pids_of(server_pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent_network.runtime.model_worker" in cmdline and str(server_pid).encode() in (
            cmdline[cmdline.index(b"--parent") + 1 :][:1] if b"--parent" in cmdline else []
        ):
            found.append(int(entry.name))
    return found


class LocalModelServer:
    """``agent-network serve`` on the local model, as a real process."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        args = [sys.executable, "-m", "agent_network", "serve", "--db", str(tmp / "an.db")]
        args += ["--port", str(self.port), "--model", "local:smollm2"]
        env = {**os.environ, "AGENT_NETWORK_MODEL_TIMEOUT": "60"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        wait_until("the server", self._up, timeout=120)
        text = self.log.read_text()
        self.admin_key = text.split("Platform admin key (shown once, keep it): ")[1].split()[0]

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/health", timeout=10)
        assert response.status_code == 200
        return dict(response.json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@needs_model
@pytest.mark.local_model
@pytest.mark.parametrize(
    ("sig", "words"),
    [(signal.SIGSEGV, "segmentation fault (SIGSEGV)"), (signal.SIGKILL, "SIGKILL")],
)
def test_server_keeps_serving_when_its_model_worker_dies_mid_reply(
    tmp_path: Path, sig: signal.Signals, words: str
) -> None:
    server = LocalModelServer(tmp_path)
    try:
        # the start-up self-check already ran a one-token generation: the worker is up
        assert server.health()["model_worker"]["state"] == "ready"
        http = httpx.Client(base_url=f"{server.url}/api/v1", timeout=30)

        def ok(method: str, path: str, key: str, **kw: Any) -> Any:
            r = http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)
            assert r.status_code < 300, r.text
            return r.json()

        key = ok("POST", "/orgs", server.admin_key, json={"name": "Acme"})["secret"]
        ann = ok("POST", "/users", key, json={"name": "Ann"})["id"]
        bot = ok(
            "POST",
            "/agents",
            key,
            json={"name": "Helper", "lookup_key": "helper", "identity": "You help Ann."},
        )["id"]
        ok("POST", f"/agents/{bot}/routines", key, json={"name": "participate"})
        team = ok("POST", "/teams", key, json={"name": "T"})["id"]
        ok("POST", f"/teams/{team}/members", key, json={"user_id": ann})
        ok("POST", f"/teams/{team}/members", key, json={"agent_id": bot})
        tid = ok("POST", f"/teams/{team}/threads", key, json={"title": "ops"})["id"]

        def agent_replies() -> list[dict[str, Any]]:
            page = ok("GET", f"/threads/{tid}/messages", key, params={"limit": 100})
            return [m for m in page["items"] if m["sender"]["id"] == bot]

        def failures() -> list[dict[str, Any]]:
            return list(ok("GET", "/audit", key, params={"action": "routine.failed"}))

        # kill the worker while it writes the reply to Ann's first message
        pid = None
        for attempt in range(5):
            before = len(agent_replies())
            text = f"Please write a long, detailed plan for the launch (attempt {attempt})."
            ok("POST", f"/threads/{tid}/messages", key, json={"user_id": ann, "content": text})
            wait_until("a generation", lambda: server.health()["model_worker"]["state"] == "busy")
            pids = _worker_pids_of(server.proc.pid)
            assert len(pids) == 1, pids
            pid = pids[0]
            os.kill(pid, sig)
            wait_until(
                "the failure or a reply",
                lambda n=before: failures() or len(agent_replies()) > n,
            )
            if failures():
                break
        found = failures()
        assert len(found) == 1, "the worker never died mid-generation"
        assert words in found[0]["reason"] and "model_worker_failed" in found[0]["reason"]
        assert found[0]["principal_id"] == bot
        assert server.proc.poll() is None
        assert pid is not None and not alive(pid)

        # REST and WebSocket still serve
        assert server.health()["status"] == "ok"
        assert ok("GET", f"/threads/{tid}", key)["id"] == tid
        ws_url = f"ws://127.0.0.1:{server.port}/api/v1/ws"
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
            ws.send(json.dumps({"type": "join", "thread_id": tid, "after": 0}))
            assert json.loads(ws.recv(timeout=10))["type"] == "joined"
            before = len(agent_replies())
            asked = ok(
                "POST", f"/threads/{tid}/messages", key, json={"user_id": ann, "content": "Hi?"}
            )

            # ... and the next message is answered by a new worker, seen live on the socket
            def reply_frame() -> dict[str, Any] | None:
                frame = json.loads(ws.recv(timeout=60))
                envelope = frame.get("envelope") or {}
                sender = envelope.get("sender") or {}
                mine = sender.get("id") == bot and envelope["seq"] > asked["seq"]
                return envelope if mine else None

            reply = wait_until("the reply on the socket", reply_frame, timeout=120)
            assert reply["type"] == "message" and reply["content"].strip()
        assert len(agent_replies()) == before + 1
        health = server.health()["model_worker"]
        assert health["restarts"] >= 1 and words in health["last_failure"]
        assert len(_worker_pids_of(server.proc.pid)) == 1
    finally:
        server.stop()


# --- a runner process whose worker crashes ---


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


@needs_model
@pytest.mark.local_model
def test_runner_process_keeps_running_when_its_model_worker_is_killed(
    quiet_server: LiveServer, runners: Callable[..., RunnerProc]
) -> None:
    org = Org(quiet_server, "Acme")
    ann = org.user("Ann")
    bot = org.agent("Helper", "helper")
    org.ok("POST", f"/agents/{bot['id']}/routines", json={"name": "participate"})
    team = org.team("Team", ("user", ann["id"]), ("agent", bot["id"]))
    tid = org.ok("POST", f"/teams/{team['id']}/threads", json={"title": "W"})["id"]
    runner = runners(quiet_server.url, org.key, "R", "--model", "local:smollm2")
    runner.wait_running()  # after its start-up check: its worker is up
    assert "Local model ready" in runner.out.read_text()
    workers = _worker_pids_of(runner.proc.pid)
    assert len(workers) == 1

    def failures() -> list[dict[str, Any]]:
        return list(org.ok("GET", "/audit", params={"action": "routine.failed"}))

    for attempt in range(5):
        before = len(replies_by_trigger(org, tid))
        pid = _worker_pids_of(runner.proc.pid)[0]
        idle = _cpu_ticks(pid)
        post(org, tid, ann["id"], f"Write a long, detailed launch plan please ({attempt}).")
        wait_until("the worker to generate", lambda p=pid, t=idle: _cpu_ticks(p) > t + 10)
        os.kill(pid, signal.SIGKILL)
        wait_until(
            "the failure or a reply",
            lambda n=before: failures() or len(replies_by_trigger(org, tid)) > n,
        )
        if failures():
            break
    found = failures()
    assert len(found) == 1, "the worker never died mid-generation"
    assert "SIGKILL" in found[0]["reason"] and "(runner 'R')" in found[0]["reason"]
    assert runner.proc.poll() is None

    trigger = post(org, tid, ann["id"], "Are you there?")
    wait_until("the reply after the restart", lambda: trigger["id"] in replies_by_trigger(org, tid))
    assert runner.proc.poll() is None
    assert len(_worker_pids_of(runner.proc.pid)) == 1


def _cpu_variants() -> list[str]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return []
    lib = Path(spec.origin).parent / "lib"
    return sorted(
        p.name.removeprefix("libggml-cpu-").split(".so")[0] for p in lib.glob("libggml-cpu-*")
    )


@needs_model
@pytest.mark.local_model
@pytest.mark.parametrize("variant", ["x64", "haswell"])
def test_the_cpu_variants_older_machines_pick_generate_here(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build with runtime dispatch: the baseline variant and the AVX2 one (what a CPU without
    AVX-512 picks) load and generate on this machine, forced with AGENT_NETWORK_CPU_VARIANT."""
    if variant not in _cpu_variants():
        pytest.skip("this llama.cpp build has no runtime CPU dispatch")
    path = find_gguf_path()
    assert path is not None
    monkeypatch.setenv("AGENT_NETWORK_CPU_VARIANT", variant)
    sup = ModelSupervisor(timeout=120.0)
    try:
        result = sup.generate(path, [{"role": "user", "content": "Say hi."}], {"max_tokens": 8})
        assert result["usage"]["completion_tokens"] > 0
        assert sup.cpu_variant == variant
    finally:
        sup.stop()
