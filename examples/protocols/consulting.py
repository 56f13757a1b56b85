"""consulting: one question, one answer, then the thread closes (``consulting_complete``).

Alice opens a ``consulting`` thread with Bob. Bob is invited and acks automatically (his rule
admits the adapter and the initiator), which makes the thread active. Bob trying to speak first
is refused (409 ``not_your_turn``); Alice asks one question addressed to Bob (``audience``);
Bob's participate routine answers on the model; that one reply closes the thread with reason
``consulting_complete``. A second question finds the thread closed (409 ``thread_closed``).

    .venv/bin/python examples/protocols/consulting.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

from _common import Network, Options, messages, refused, report, run


async def main(options: Options) -> bool:
    async with Network(options) as net:
        # Alice's turns are this script's (no routine); Bob answers through the runner.
        alice = await net.agent("alice", "Ask one focused question and stop.", routine=False)
        bob = await net.agent("bob", "You answer in one short sentence.")

        channel = await alice.open(
            "distributed systems",
            target="bob",
            adapter="consulting",
            ttl=options.seconds(60, 600),  # the last resort if the model never answers
        )
        net.watch(channel.thread_id)
        # active once Bob acked (automatically, inside the open)
        await net.wait_until(
            channel.thread_id, lambda envs: any(e.type == "thread.ack" for e in envs), timeout=30
        )
        first = await refused(
            "bob speaks before the question",
            bob.channel(channel.thread_id).send("I answer before anyone asks."),
        )
        await channel.send(
            "What's the single most important property of a distributed system?",
            audience=[bob.agent_id],
        )
        thread = await net.until_closed(channel.thread_id, timeout=options.seconds(30, 600))
        second = await refused(
            "a second question", channel.send("And the second most important one?")
        )

        print("\nReplay from the WAL:")
        for env in messages(await channel.read()):
            print(f"  {env.sender.name}: {env.content}")
        report(thread)
        texts = messages(await channel.read())
        return (
            thread.status == "closed"
            and thread.close_reason == "consulting_complete"
            and first == "not_your_turn"
            and second == "thread_closed"
            and [e.sender.id for e in texts] == [alice.agent_id, bob.agent_id]
        )


if __name__ == "__main__":
    run(main, "consulting: one question, one answer, then the thread closes")
