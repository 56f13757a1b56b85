"""hub-and-spoke: a triage agent routes intake requests to specialist threads.

The "hub-and-spoke" pattern: people post requests into one intake thread; a coordinator — the
**triage** agent — classifies each one (billing / technical / other), forwards it into that
specialist's thread and answers in the intake thread with where the request went. The
specialists answer in their own threads with their ``participate`` routines.

The triage agent is an ordinary agent with a ``triage`` routine (the platform's preset, run by
the in-process runner; no code of ours):

    {"preset_name": "triage", "config": {
        "intake": "<intake thread id>",
        "routes": {"billing": {"thread_id": "...", "keywords": [...], "description": "..."}, ...},
        "fallback": "other"}}

For every message somebody else posts in the intake thread the runner asks the triage agent's
model for one label; when the answer names none — always with the ``test`` model, often with
the tiny local model — the route whose keywords occur most in the request wins, and with no
keyword the ``fallback``. It forwards the request into the route's thread ("Forwarded from Pat
in support intake: ...") and replies in intake ("Routed to billing: Billing desk"), exactly once
per request. Pat asks one question at a time, waiting for the triage agent's reply. With
``--model local:smollm2`` the routine has ``"use_model": false`` (keywords only): the 135M model
tends to answer with the first label of the list whatever the request.

    .venv/bin/python examples/protocols/hub_and_spoke.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

from collections import Counter

from _common import Network, Options, messages, report, run

from agent_network.client import Envelope

SPECIALISTS = {  # label -> (name, lookup key, identity, route thread title)
    "billing": ("Billing Agent", "billing", "You handle invoices, charges and refunds.", "Billing"),
    "technical": ("Tech Agent", "tech", "You fix technical problems: errors, APIs.", "Tech"),
    "other": ("General Agent", "general", "You answer general questions.", "General"),
}
ROUTES = {  # label -> (description for the model, keywords)
    "billing": (
        "invoices, charges, refunds, payments, prices and plans",
        ["invoice", "charged", "charge", "refund", "payment", "bill", "price", "plan"],
    ),
    "technical": (
        "errors, bugs, crashes, the API, logins and uploads",
        ["error", "bug", "crash", "api", "login", "upload", "timeout", "500"],
    ),
    "other": ("anything else about the company", []),
}
REQUESTS = [  # (request, the label the keyword classifier gives it)
    ("I was charged twice on my last invoice, can I get a refund?", "billing"),
    ("The API returns a 500 error whenever I upload a file.", "technical"),
    ("Do you have an office in Berlin?", "other"),
]


async def main(options: Options) -> bool:
    async with Network(options) as net:
        triage = await net.agent("Triage", "You route support requests.", routine=False)
        pat = await net.person("Pat")
        team_id = await net.team_id()
        intake = await net.hc.rest.threads.create(
            "support intake",
            team_id=team_id,
            visibility="restricted",
            participants=[("user", pat.id), ("agent", triage.id)],
        )
        desks: dict[str, str] = {}  # label -> specialist thread id
        for label, (name, key, identity, desk) in SPECIALISTS.items():
            specialist = await net.agent(name, identity, key=key)
            thread = await net.hc.rest.threads.create(
                f"{desk} desk",
                team_id=team_id,
                visibility="restricted",
                participants=[("agent", triage.id), ("agent", specialist.id)],
                # every request costs two agent messages here (the forward, the answer) and no
                # person speaks: leave room for all of them in the runaway budget
                agent_budget=2 * len(REQUESTS),
            )
            desks[label] = thread.id
        config = {
            "intake": intake.id,
            "routes": {
                label: {"thread_id": desks[label], "description": text, "keywords": words}
                for label, (text, words) in ROUTES.items()
            },
            "fallback": "other",
            # the bundled local model mostly echoes the first label: let the keywords decide
            "use_model": not options.model.startswith("local:"),
        }
        await net.hc.rest.agents.routines.create(
            triage.id, "triage", preset_name="triage", config=config
        )

        net.watch(intake.id, "intake")
        timeout = options.seconds(60, 1200)
        for n, (text, _) in enumerate(REQUESTS, start=1):
            await pat.send(intake.id, text)

            def answered(envs: list[Envelope], n: int = n) -> bool:
                return len([e for e in messages(envs) if e.sender.id == triage.id]) >= n

            await net.wait_until(intake.id, answered, timeout=timeout)
        await net.hc.rest.threads.close(intake.id, reason="intake closed for today")
        final = await net.until_closed(intake.id, timeout=30)
        report(final, "intake")

        # how many requests each specialist thread got, from the triage agent's replies
        sent = Counter(
            e.data["triage"]["label"]
            for e in messages(net.seen[intake.id])
            if e.sender.id == triage.id and isinstance(e.data.get("triage"), dict)
        )
        # each specialist thread that got one, one after the other, once all are answered
        routed: list[tuple[str, str, str]] = []  # (request, label, how)
        for label, thread_id in desks.items():
            if not sent[label]:
                continue
            name = SPECIALISTS[label][0]
            net.watch(thread_id, label)

            def has_answers(envs: list[Envelope], name: str = name, n: int = sent[label]) -> bool:
                return len([e for e in messages(envs) if e.sender.name == name]) >= n

            envs = await net.wait_until(thread_id, has_answers, timeout=timeout)
            for env in messages(envs):
                mark = env.data.get("triage")
                if isinstance(mark, dict) and mark.get("kind") == "forward":
                    request = env.content.split(": ", 1)[-1] if env.content else ""
                    routed.append((request, label, str(mark.get("by"))))
        for request, label, how in routed:
            print(f"routed: {label} (by {how}) <- {request!r}", flush=True)

        all_routed = len(routed) == len(REQUESTS) and final.status == "closed"
        if options.deterministic:
            expected = sorted((text, label) for text, label in REQUESTS)
            return all_routed and sorted((r, label) for r, label, _ in routed) == expected
        return all_routed


if __name__ == "__main__":
    run(main, "hub-and-spoke: a triage agent routes intake requests to specialist threads")
