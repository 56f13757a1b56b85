"""Helpers run in separate processes by tests/test_remote_runner.py and tests/test_kill9.py.

- Imported (``agent-network runner --import runner_helpers``): registers the model ``slow``, a
  pydantic-ai ``FunctionModel`` that waits ``RUNNER_SLOW_SECONDS`` (default 1) and answers
  "Noted." — so a runner holds its claims long enough to be killed in the middle of a job —
  the model ``labeler``: "Billing." to a triage classification prompt, "Noted." to
  anything else; the model ``broken``, which raises RuntimeError; and the model ``silent``,
  which always answers an empty text.
- Run as a script (``python runner_helpers.py post URL KEY THREADS USER PREFIX COUNT OUT SEED``):
  a poster process. It posts COUNT messages as USER into the comma-separated THREADS (round
  robin) with idempotency keys ``PREFIX-<n>``, retrying each post on connection errors and 5xx
  answers until it is acknowledged, and appends every acknowledged post as one JSON line
  ``{"key", "id", "seq", "thread_id", "content"}`` to OUT (flushed and fsynced before the next
  post). Exits 0 when all are acknowledged, 1 when a post is refused with a 4xx.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

SLOW_REPLY = "Noted."


def register_slow_model() -> None:
    """Register the models ``slow``, ``labeler`` and ``broken`` (see the module docstring)."""
    import anyio
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    from agent_network.runtime.models import register_model

    async def slow(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await anyio.sleep(float(os.environ.get("RUNNER_SLOW_SECONDS", "1")))
        return ModelResponse(parts=[TextPart(SLOW_REPLY)])

    register_model("slow", FunctionModel(slow))

    async def labeler(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked = "".join(str(p.content) for m in messages for p in m.parts if hasattr(p, "content"))
        reply = "Billing." if "category name only" in asked else SLOW_REPLY
        return ModelResponse(parts=[TextPart(reply)])

    register_model("labeler", FunctionModel(labeler))

    async def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError("the model's backend is down")

    register_model("broken", FunctionModel(broken))

    async def silent(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("")])

    register_model("silent", FunctionModel(silent))


def post_all(
    url: str,
    key: str,
    thread_ids: list[str],
    user_id: str,
    prefix: str,
    count: int,
    out: str,
    seed: int,
) -> int:
    """The poster process (see the module docstring). Returns the exit code."""
    import httpx

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    with open(out, "a", encoding="utf-8") as sink, httpx.Client(timeout=10) as http:
        for n in range(count):
            tid = thread_ids[n % len(thread_ids)]
            body: dict[str, Any] = {
                "content": f"{prefix} message {n}",
                "user_id": user_id,
                "idempotency_key": f"{prefix}-{n}",
            }
            while True:
                try:
                    r = http.post(
                        f"{url}/api/v1/threads/{tid}/messages", json=body, headers=headers
                    )
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if r.status_code >= 500:
                    time.sleep(0.05)
                    continue
                break
            if r.status_code != 201:
                print(f"post refused: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            env = r.json()
            record = {
                "key": body["idempotency_key"],
                "id": env["id"],
                "seq": env["seq"],
                "thread_id": tid,
                "content": body["content"],
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            time.sleep(rng.uniform(0.01, 0.06))
    return 0


if __name__ != "__main__":
    register_slow_model()  # imported by ``agent-network runner --import runner_helpers``
else:
    if len(sys.argv) != 10 or sys.argv[1] != "post":
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    _, _, url, key, threads, user, prefix, count, out, seed = sys.argv
    sys.exit(post_all(url, key, threads.split(","), user, prefix, int(count), out, int(seed)))
