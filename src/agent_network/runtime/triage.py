"""The ``triage`` routine preset on the runner's side: the classification prompt.

The config and the pure rules live in :mod:`agent_network.services.triage` (re-exported here);
the server routes a request (checks, forward, reply) in :mod:`agent_network.services.routing`.
Design: docs/architecture.md, "Runners: one engine, two ports".
"""

from __future__ import annotations

from agent_network.runtime.prompt import Prompt
from agent_network.services.triage import (
    LABEL_PATTERN,
    MARKER,
    Classified,
    Route,
    TriageConfig,
    decide,
    forward_content,
    forward_key,
    is_request,
    is_triage_output,
    keyword_label,
    label_in,
    marker,
    parse_config,
    reply_content,
    undelivered_content,
    unroutable_content,
)

__all__ = [
    "LABEL_PATTERN",
    "MARKER",
    "Classified",
    "Route",
    "TriageConfig",
    "classification_prompt",
    "decide",
    "forward_content",
    "forward_key",
    "is_request",
    "is_triage_output",
    "keyword_label",
    "label_in",
    "marker",
    "parse_config",
    "reply_content",
    "undelivered_content",
    "unroutable_content",
]


def classification_prompt(
    config: TriageConfig,
    *,
    agent_name: str,
    identity: str,
    request: str,
    sender_name: str,
) -> Prompt:
    """The prompt that asks the agent's model for a label: the system part is the agent's
    identity and its job; the user part lists every label with its description (in config
    order), quotes the request and asks for the label only."""
    system = (
        f"{identity.strip()}\n\n" if identity.strip() else ""
    ) + f"You are {agent_name}. You sort incoming requests into categories."
    lines = []
    for label, route in config.routes.items():
        lines.append(f"- {label}: {route.description}" if route.description else f"- {label}")
    one_line = " ".join(request.split())
    user = (
        "Categories:\n"
        + "\n".join(lines)
        + f'\n\nRequest from {sender_name}: "{one_line}"\n'
        + "Which category fits this request best? Answer with one of: "
        + ", ".join(config.labels)
        + ". Answer with the category name only."
    )
    return Prompt(system=system, user=user)
