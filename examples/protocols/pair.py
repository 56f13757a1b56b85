"""pair: two agents with complementary roles work in one conversation until its time box ends.

The "pair" pattern: a researcher and a writer (two perspectives, one focused task) in a
``conversation`` thread (exactly two participants, free turns). The researcher opens it with a
time box (``ttl``) and posts the task; then both answer each other through their participate
routines. Nobody closes it: when the TTL runs out the hub writes ``thread.closing``
(``ttl_expired``) and ``thread.closed``. The runaway budget (``agent_budget=4``) caps the
exchange at four agent messages, so the pair cannot talk forever inside its time box either.

(``conversation.py`` shows the other ending, an explicit close.)

    .venv/bin/python examples/protocols/pair.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

from _common import Network, Options, messages, report, run

BUDGET = 4


async def main(options: Options) -> bool:
    async with Network(options) as net:
        researcher = await net.agent(
            "Research Agent",
            "You are a research specialist: you find facts and state them briefly.",
            key="researcher",
        )
        await net.agent(
            "Writer Agent",
            "You are a writing specialist: you turn facts into one clear summary sentence.",
            key="writer",
        )
        ttl = options.seconds(6, 60)  # room for four test-model replies on a loaded machine
        channel = await researcher.open(
            "market analysis", target="writer", adapter="conversation", ttl=ttl, agent_budget=BUDGET
        )
        net.watch(channel.thread_id)
        await channel.send(
            "Fact: three frameworks dominate AI agents today. Summarize it for a CEO."
        )
        thread = await net.until_closed(channel.thread_id, timeout=ttl + 60)
        report(thread)
        count = len(messages(net.seen[channel.thread_id]))
        print(f"messages: {count}")
        ok = thread.status == "closed" and thread.close_reason == "ttl_expired"
        return ok and (count == BUDGET if options.deterministic else 1 <= count <= BUDGET)


if __name__ == "__main__":
    run(main, "pair: two complementary agents in a time-boxed conversation")
