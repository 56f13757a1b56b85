"""Configuration: environment variables ``AGENT_NETWORK_*`` (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of one server process.

    - ``database``: a path (SQLite file, the default ``./.agent-network/agent-network.db``) or a
      database URL.
    - ``model``: default pydantic-ai model string for agents without one (``AGENT_NETWORK_MODEL``);
      when unset the bundled ``local:smollm2`` is used.
    - ``run_routines``: whether this process runs the in-process runner.
    - ``agent_budget``: default budget of consecutive agent messages per thread.
    - ``history_limit``: how many recent thread messages go into an agent's prompt.
    - ``knowledge_chunks``: how many knowledge chunks go into an agent's prompt.
    - ``secret_key``: Fernet key encrypting agent secrets (``AGENT_NETWORK_SECRET_KEY``); without
      it a key file beside the SQLite database is used.
    - ``ws_heartbeat``: seconds between the server's ``ping`` frames on a WebSocket
      (``docs/protocol.md``); a client silent for 3 heartbeats is closed.
    - ``ws_buffer``: frames a WebSocket connection may have waiting to be written before it is
      disconnected as ``lagged``.
    - ``max_body_bytes``: largest HTTP request body, and largest WebSocket message, in bytes
      (default 1 MiB; ``AGENT_NETWORK_MAX_BODY_BYTES``); larger bodies get 413 before they are
      read whole.
    - ``max_upload_bytes``: largest knowledge upload body (``POST .../knowledge``), in bytes
      (default 32 MiB).
    - ``model_seed``: an integer mixed into the sampling seed of the bundled local model
      (``AGENT_NETWORK_MODEL_SEED``, default 0). The seed of a reply is derived from the trigger
      and this value, so another value gives other samples for the same trigger (e.g. to
      repeat a benchmark run with other samples); 0 keeps the seeds of earlier versions.
    - ``cors_origins``: comma-separated origins (``https://app.example.com``) whose browser
      pages may call the API (``AGENT_NETWORK_CORS_ORIGINS``); empty (the default): CORS off, no
      other origin gets access and a preflight answers 405.
    - ``claim_lease``: seconds a runner's claim on a trigger lasts unless renewed
      (``AGENT_NETWORK_CLAIM_LEASE``, default 10; the in-process runner and, as the default of
      ``--lease``, ``agent-network runner``). A runner renews its claims every third of it while
      it answers, so a claim of a runner that died elsewhere frees within one lease.
    """

    model_config = SettingsConfigDict(env_prefix="AGENT_NETWORK_")

    database: str = ".agent-network/agent-network.db"
    model: str | None = None
    run_routines: bool = True
    agent_budget: int = 4
    history_limit: int = 12
    knowledge_chunks: int = 3
    secret_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8321
    ws_heartbeat: float = Field(default=20.0, gt=0)
    ws_buffer: int = Field(default=1000, ge=8)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_upload_bytes: int = Field(default=33_554_432, ge=1024)
    model_seed: int = 0
    claim_lease: float = Field(default=10.0, gt=0, le=3600)
    cors_origins: str = ""
