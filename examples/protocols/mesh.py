"""mesh: three agents share one round-robin thread, and each opens a thread with another one.

The "mesh" pattern: every agent can talk to every other one, no coordinator.

1. The planner opens a shared ``workflow`` thread with the engineer and the critic whose graph is
   ``TransitionGraph.round_robin([planner, engineer, critic], max_turns=6)``: each speaks in turn,
   twice, and the workflow closes itself with reason ``max_turns``.
2. Then each agent opens a ``consulting`` thread with the next one (planner -> engineer ->
   critic -> planner), all three at once. Nobody types anything: the asker's participate routine
   is triggered by the thread becoming active (it is the expected speaker) and writes the
   question from the title; the respondent answers; each closes with ``consulting_complete``.

    .venv/bin/python examples/protocols/mesh.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

import anyio
from _common import Network, Options, messages, report, run

from agent_network.client import AgentClient, Thread
from agent_network.protocol import TransitionGraph

TURNS = 6


async def main(options: Options) -> bool:
    async with Network(options) as net:
        crew = [
            await net.agent("Planner", "You plan the rollout. One short sentence.", key="planner"),
            await net.agent(
                "Engineer", "You build the rollout. One short sentence.", key="engineer"
            ),
            await net.agent(
                "Critic", "You find risks in the rollout. One short sentence.", key="critic"
            ),
        ]
        keys = ["planner", "engineer", "critic"]
        timeout = options.seconds(60, 900)

        shared = await crew[0].open(
            "Rollout plan for the new billing system",
            target=keys[1:],
            adapter="workflow",
            graph=TransitionGraph.round_robin(keys, max_turns=TURNS),
            agent_budget=TURNS,
            ttl=timeout,
        )
        net.watch(shared.thread_id, "all")
        shared_final = await net.until_closed(shared.thread_id, timeout=timeout)

        results: dict[str, Thread] = {}

        async def consult(asker: AgentClient, respondent: AgentClient) -> None:
            channel = await asker.open(
                f"{asker.name} asks {respondent.name}: what worries you most about the rollout?",
                target=respondent.id,
                adapter="consulting",
                ttl=timeout,
            )
            label = f"{asker.name}->{respondent.name}"
            net.watch(channel.thread_id, label)
            results[label] = await net.until_closed(channel.thread_id, timeout=timeout)

        async with anyio.create_task_group() as tg:
            for i, asker in enumerate(crew):
                tg.start_soon(consult, asker, crew[(i + 1) % len(crew)])

        report(shared_final, "all")
        for label, thread in sorted(results.items()):
            report(thread, label)
        shared_speakers = [e.sender.id for e in messages(net.seen[shared.thread_id])]
        expected = [a.id for a in crew] * (TURNS // len(crew))
        consulting_ok = len(results) == len(crew) and all(
            t.close_reason == "consulting_complete" for t in results.values()
        )
        return (
            shared_final.close_reason == "max_turns"
            and shared_speakers == expected
            and consulting_ok
        )


if __name__ == "__main__":
    run(main, "mesh: any agent opens threads with any other; a shared round robin")
