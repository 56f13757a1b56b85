"""Tools that run for an agent, and what they get at run time: where agent secrets are consumed.

An agent's secrets (``PUT /agents/{id}/secrets/{name}``) exist for the code that acts for the
agent — a tool calling an outside API with the agent's key — never for the model, a prompt or
an API reader. So they are handed out at one place only: every model run of a runner (the
in-process one and the remote one) gets a :class:`RunDeps` as its pydantic-ai ``deps``, whose
``secrets`` (a :class:`SecretsView`) gives the tools of that run the values of **that agent's**
secrets, one by one:

- in-process: :class:`~agent_network.services.secrets.RunSecrets`, through the services;
- remote (``runtime/remote.py``): :class:`RemoteSecrets`, over ``POST /runners/secrets`` with
  the agent's own token, only while the runner holds a live claim on the trigger it answers.

Every value handed out is audited (``secret.revealed``: the secret's name, the thread and the
trigger; never the value). What a tool returns to the model is up to the tool; if the model
then repeats a secret, the egress default (services/policy.py, ``default:org_secrets``) refuses
the reply before it reaches a network thread.

Tools are code of the process that runs the agent, registered per agent id
(:func:`register_agent_tools`) like models are registered per name
(:func:`~agent_network.runtime.models.register_model`): pydantic-ai tools whose function takes
a ``RunContext[RunDeps]`` first. They are offered to the model on every run of that agent in
this process, next to a workflow's tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic_ai import Tool

from agent_network.client import AsyncClient

__all__ = [
    "RemoteSecrets",
    "RunDeps",
    "SecretsView",
    "agent_tools",
    "register_agent_tools",
]


class SecretsView(Protocol):
    """One agent's secrets for the tools of one run: ``names()`` lists them, ``get(name)``
    gives one value (raising the service's or the client's not-found error when the agent has
    none of that name). Each ``get`` is audited; implementations never log or cache a value."""

    agent_id: str

    async def names(self) -> list[str]:
        """The names of the agent's secrets."""
        ...

    async def get(self, name: str) -> str:
        """The value of the agent's secret ``name``."""
        ...


@dataclass(frozen=True, slots=True)
class RunDeps:
    """The pydantic-ai ``deps`` of one model run of an agent: who runs (``agent_id``, its
    ``org_id``), what it answers (``thread_id``, ``trigger_id``) and its ``secrets``."""

    agent_id: str
    org_id: str
    thread_id: str
    trigger_id: str
    secrets: SecretsView


_tools: dict[str, tuple[Tool[Any], ...]] = {}


def register_agent_tools(agent_id: str, tools: Sequence[Tool[Any]] | None) -> None:
    """Offer ``tools`` (pydantic-ai tools; a function taking ``RunContext[RunDeps]`` reads
    ``ctx.deps.secrets``) to the model on every run of agent ``agent_id`` in this process;
    ``None`` or ``[]`` removes them."""
    if tools:
        _tools[agent_id] = tuple(tools)
    else:
        _tools.pop(agent_id, None)


def agent_tools(agent_id: str) -> tuple[Tool[Any], ...]:
    """The tools registered for ``agent_id`` in this process (none by default)."""
    return _tools.get(agent_id, ())


class RemoteSecrets:
    """A remote runner's :class:`SecretsView`: the values come from ``POST /runners/secrets``
    under the runner's live claim on the trigger (``agent_id``, ``thread_id``,
    ``trigger_seq``, ``runner_id``); only the agent's own token is answered. ``names()`` is
    not offered remotely (a tool names the secrets it needs) and answers []."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        agent_id: str,
        thread_id: str,
        trigger_seq: int,
        runner_id: str,
    ) -> None:
        self._client = client
        self.agent_id = agent_id
        self.thread_id = thread_id
        self.trigger_seq = trigger_seq
        self.runner_id = runner_id

    def __repr__(self) -> str:
        return f"RemoteSecrets(agent_id={self.agent_id!r})"

    async def names(self) -> list[str]:
        """[] (see the class docstring)."""
        return []

    async def get(self, name: str) -> str:
        """The value of secret ``name`` (the client's ApiError for a refusal: 403 for a
        credential that is not the agent's own token, 404 for no such secret, 409
        ``claim_required`` without a live claim)."""
        found = await self._client.runners.secret(
            self.agent_id, self.thread_id, self.trigger_seq, self.runner_id, name
        )
        return found.value.get_secret_value()
