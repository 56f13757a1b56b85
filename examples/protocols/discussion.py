"""discussion: round-robin among a moderator and three agents, starting with the creator.

Maya (a person, driven by this script like a UI would be) opens a ``discussion`` thread with
an optimist, a realist and a skeptic (agents; they ack automatically). The order is the
creator first, then the participants as listed, wrapping around: Maya, optimist, realist,
skeptic, Maya, ... The hub enforces it: the skeptic speaking out of turn is refused (409
``not_your_turn``), and the runner only calls the model of the agent whose turn it is (the
others make no model call at all). After each round the turn wraps back to Maya, who starts
round two and, after it, closes the thread (reason ``discussion over``).

    .venv/bin/python examples/protocols/discussion.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

from _common import Network, Options, has_closed, messages, refused, report, run

from agent_network.client import Envelope

ROUNDS = 2


async def main(options: Options) -> bool:
    async with Network(options) as net:
        maya = await net.person("Maya")
        optimist = await net.agent("Optimist", "You are the optimist. One short sentence.")
        realist = await net.agent("Realist", "You are the realist. One short sentence.")
        skeptic = await net.agent("Skeptic", "You are the skeptic. One short sentence.")
        cast = [maya.id, optimist.id, realist.id, skeptic.id]

        thread = await net.hc.rest.threads.create(
            "Should every developer learn Rust?",
            team_id=await net.team_id(),
            visibility="restricted",
            adapter="discussion",
            participants=[("user", maya.id), *(("agent", a) for a in cast[1:])],
            ttl=options.seconds(60, 900),  # the last resort if a model stops answering
        )
        tid = thread.id
        net.watch(tid)
        await net.wait_until(
            tid, lambda es: sum(e.type == "thread.ack" for e in es) == 3, timeout=30
        )
        first = (await maya.channel(tid).info()).expected_speaker
        print(f"-- expected speaker: {net.names[str(first)]}")
        code = await refused(
            "the skeptic speaks out of turn", skeptic.channel(tid).send("Rust is overrated.")
        )

        prompts = [
            "Topic: should every developer learn Rust? Keep it brief.",
            "Round two: answer the previous speaker in one sentence.",
        ]
        wrapped = True
        for number, prompt in enumerate(prompts[:ROUNDS]):
            await maya.send(tid, prompt)
            wanted = len(cast) * (number + 1)

            def round_done(envs: list[Envelope], wanted: int = wanted) -> bool:
                return len(messages(envs)) >= wanted or has_closed(envs)

            envs = await net.wait_until(tid, round_done, timeout=options.seconds(30, 600))
            if has_closed(envs):
                break
            expected = (await maya.channel(tid).info()).expected_speaker
            print(f"-- round {number + 1} done; the turn wraps to {net.names[str(expected)]}")
            wrapped = wrapped and expected == maya.id
        if not has_closed(net.seen[tid]):
            await maya.close(tid, "discussion over")
        final = await net.until_closed(tid, timeout=30)
        report(final)
        speakers = [e.sender.id for e in messages(net.seen[tid])]
        if options.deterministic:
            return (
                code == "not_your_turn"
                and wrapped
                and speakers == cast * ROUNDS
                and final.close_reason == "discussion over"
            )
        return (
            code == "not_your_turn"
            and final.status == "closed"
            and speakers == (cast * ROUNDS)[: len(speakers)]
        )


if __name__ == "__main__":
    run(main, "discussion: round-robin starting with the creator, out-of-turn refused")
