"""conversation: two agents, free turns, ended by an explicit close.

Alice opens a ``conversation`` thread with Bob (Bob acks automatically) and sends the first
message; from then on both answer through their participate routines: in a conversation anyone
may speak at any time, and each message triggers the other participant. The adapter never ends
a conversation by itself: after four messages Alice closes it (``thread.closing`` with reason
``closed``, then the hub's ``thread.closed``).

Two guards keep it bounded whatever the model does: the thread's runaway budget (``agent_budget=4``:
at most four agent messages in a row without a person, so nothing slips in between the fourth
message and the close) and a TTL (``ttl_expired``) in case a model stops answering.

    .venv/bin/python examples/protocols/conversation.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

from _common import Network, Options, has_closed, messages, report, run

EXCHANGES = 4


async def main(options: Options) -> bool:
    async with Network(options) as net:
        alice = await net.agent(
            "alice", "You are alice. Ask follow-ups, one short sentence at a time."
        )
        await net.agent("bob", "You are bob. Answer in one short sentence; ask one follow-up.")

        channel = await alice.open(
            "consensus for novices",
            target="bob",
            adapter="conversation",
            agent_budget=EXCHANGES,
            ttl=options.seconds(60, 600),
        )
        net.watch(channel.thread_id)
        await channel.send("How would you explain consensus to a curious novice?")

        # The application decides when enough has been said.
        envs = await net.wait_until(
            channel.thread_id,
            lambda envs: len(messages(envs)) >= EXCHANGES or has_closed(envs),
            timeout=options.seconds(30, 600),
        )
        if not has_closed(envs):
            await channel.close()
        thread = await net.until_closed(channel.thread_id, timeout=30)
        report(thread)
        count = len(messages(net.seen[channel.thread_id]))
        print(f"messages: {count}")
        if options.deterministic:
            return thread.close_reason == "closed" and count == EXCHANGES
        return thread.status == "closed" and thread.close_reason in ("closed", "ttl_expired")


if __name__ == "__main__":
    run(main, "conversation: two agents, free turns, explicit close")
