"""hub-and-spoke: a triage agent routes intake requests to specialist threads.

The "hub-and-spoke" pattern: people post requests into one intake thread; a coordinator — the
**triage** agent — classifies each one (billing / technical / other) and forwards it into a
specialist thread, then answers in the intake thread with where the request went.

What the triage preset does (here as code): for every message a person posts in the intake
thread,

1. classify it: ask the model for one word (``billing``, ``technical`` or ``other``); when the
   answer does not name exactly one label — always with the ``test`` model, often with the tiny
   local model — fall back to a deterministic keyword classifier;
2. open a ``consulting`` thread (one question, one answer) with the specialist for that label
   and forward the request as the question; the specialist's participate routine answers and
   the thread closes with ``consulting_complete``;
3. reply in the intake thread, to that message: the label, how it was decided, the specialist
   thread's id and the specialist's answer.

The platform has no ``triage`` routine preset yet (only ``participate``), so the triage agent is
a code-defined agent: a HubClient handler (``AgentClient(handler=...)``) using only the public
API. Requests are handled one at a time, in order.

    .venv/bin/python examples/protocols/hub_and_spoke.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

import re

from _common import Network, Options, has_closed, messages, report, run
from pydantic_ai import Agent as ModelAgent

from agent_network.client import AgentClient, Channel, Envelope, Thread
from agent_network.runtime.models import build_model

LABELS = ("billing", "technical", "other")
KEYWORDS = {
    "billing": ("invoice", "charged", "charge", "refund", "payment", "bill", "price", "plan"),
    "technical": ("error", "bug", "crash", "api", "login", "upload", "timeout", "500"),
}
SPECIALISTS = {  # label -> (name, lookup key, identity)
    "billing": ("Billing Agent", "billing", "You handle invoices, charges and refunds."),
    "technical": ("Tech Agent", "tech", "You fix technical problems: errors, APIs, uploads."),
    "other": ("General Agent", "general", "You answer general questions about the company."),
}
REQUESTS = [  # (request, the label the keyword classifier gives it)
    ("I was charged twice on my last invoice, can I get a refund?", "billing"),
    ("The API returns a 500 error whenever I upload a file.", "technical"),
    ("Do you have an office in Berlin?", "other"),
]


def keyword_label(text: str) -> str:
    """The deterministic fallback: the first label with a keyword in ``text``, else ``other``."""
    words = set(re.findall(r"[a-z0-9]+", text.lower()))
    for label, keys in KEYWORDS.items():
        if words & set(keys):
            return label
    return "other"


async def classify(model_name: str, text: str) -> tuple[str, str]:
    """``(label, how)``: the model's one-word answer when it names exactly one label, else the
    keyword classifier's."""
    agent = ModelAgent(
        build_model(model_name),
        system_prompt="You sort customer support requests into billing, technical or other.",
    )
    result = await agent.run(
        f'Request: "{text}"\nIs this request billing, technical or other? Answer with one word.',
        model_settings={"max_tokens": 8, "temperature": 0.0},
    )
    named = [label for label in LABELS if label in str(result.output).lower()]
    if len(named) == 1:
        return named[0], "model"
    return keyword_label(text), "keywords"


class TriageDesk:
    """The triage agent's behaviour (see the module docstring)."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.intake_id = ""
        self.agent: AgentClient | None = None
        self.routed: list[tuple[str, str, Thread]] = []  # (request, label, specialist thread)

    async def handle(self, env: Envelope, channel: Channel) -> str | None:
        """Route a person's intake message; other envelopes are not the triage's business."""
        if env.thread_id != self.intake_id or env.sender.kind != "user" or self.agent is None:
            return None
        text = env.content or ""
        label, how = await classify(self.net.options.model, text)
        name, key, _ = SPECIALISTS[label]
        timeout = self.net.options.seconds(60, 600)
        spoke = await self.agent.open(
            f"{label}: {text[:60]}", target=key, adapter="consulting", ttl=timeout
        )
        self.net.watch(spoke.thread_id, label)
        await spoke.send(f"Request from {env.sender.name}: {text}")
        thread = await self.net.until_closed(spoke.thread_id, timeout=timeout)
        self.routed.append((text, label, thread))
        answers = [e.content for e in messages(await spoke.read()) if e.sender.name == name]
        answer = answers[0] if answers else "(no answer before the thread closed)"
        return f"Routed to {name} ({label}, by {how}) in {spoke.thread_id}. {name}: {answer}"


async def main(options: Options) -> bool:
    async with Network(options) as net:
        desk = TriageDesk(net)
        triage = desk.agent = await net.agent(
            "Triage", "You route support requests.", routine=False, handler=desk.handle
        )
        for name, key, identity in SPECIALISTS.values():
            await net.agent(name, identity, key=key)
        pat = await net.person("Pat")

        intake = await net.hc.rest.threads.create(
            "support intake",
            team_id=await net.team_id(),
            visibility="restricted",
            participants=[("user", pat.id), ("agent", triage.id)],
        )
        desk.intake_id = intake.id
        net.watch(intake.id, "intake")
        for text, _ in REQUESTS:
            await pat.send(intake.id, text)

        def answered(envs: list[Envelope]) -> bool:
            replies = [e for e in messages(envs) if e.sender.id == triage.id]
            return len(replies) >= len(REQUESTS) or has_closed(envs)

        await net.wait_until(intake.id, answered, timeout=options.seconds(60, 1200))
        await net.hc.rest.threads.close(intake.id, reason="intake closed for today")
        final = await net.until_closed(intake.id, timeout=30)

        report(final, "intake")
        for text, label, thread in desk.routed:
            print(f"routed: {label} <- {text!r}")
            report(thread, label)
        all_answered = len(desk.routed) == len(REQUESTS) and all(
            t.close_reason == "consulting_complete" for _, _, t in desk.routed
        )
        if options.deterministic:
            expected = [(text, label) for text, label in REQUESTS]
            got = [(text, label) for text, label, _ in desk.routed]
            return all_answered and got == expected and final.status == "closed"
        return all_answered and final.status == "closed"


if __name__ == "__main__":
    run(main, "hub-and-spoke: a triage agent routes intake requests to specialist threads")
