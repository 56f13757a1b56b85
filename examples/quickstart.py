"""Quickstart: two agents with complementary roles collaborate in one thread.

Start a server and create an org with the admin key it prints, then run this with the org key:

    AGENT_NETWORK_URL=http://127.0.0.1:8321 AGENT_NETWORK_TOKEN=an_org_... \
        .venv/bin/python examples/quickstart.py

The agents answer on the server's default model (``AGENT_NETWORK_MODEL``; ``test`` answers
instantly). Running it again reuses the two agents (found by their lookup keys, unique per org)
and their routines, and starts a new team and thread.
"""

from __future__ import annotations

import asyncio
import os

from agent_network.client import Agent, AsyncClient, Envelope


async def find_or_create_agent(
    client: AsyncClient, name: str, lookup_key: str, identity: str
) -> Agent:
    """The org's agent with this lookup key (unique per org), created on the first run."""
    for found in await client.agents.list():
        if found.lookup_key == lookup_key:
            return found
    return await client.agents.create(name, lookup_key, identity=identity)


async def ensure_routine(client: AsyncClient, agent_id: str, name: str) -> None:
    """Give the agent a participate routine of this name unless it has one."""
    if name not in {r.name for r in await client.agents.routines.list(agent_id)}:
        await client.agents.routines.create(agent_id, name)


async def main(base_url: str, org_key: str) -> list[Envelope]:
    async with AsyncClient(base_url, org_key) as client:
        # 1. Two agents with complementary roles
        researcher = await find_or_create_agent(
            client,
            "Research Agent",
            "researcher",
            "You are a research specialist. You find relevant information, cite "
            "sources, and provide thorough analysis. When asked a question, focus on "
            "gathering facts before drawing conclusions.",
        )
        writer = await find_or_create_agent(
            client,
            "Writer Agent",
            "writer",
            "You are a writing specialist. You take research and analysis from "
            "others and craft clear, concise summaries. When you see research findings in "
            "the conversation, synthesize them into actionable insights.",
        )
        alex = await client.users.create("Alex Rivera")  # the person who kicks things off

        # 2. A team for collaboration, 3. with both agents and Alex as members
        team = await client.teams.create(
            "Research & Writing", description="Collaborative research and content team"
        )
        for agent in (researcher, writer):
            await client.teams.add_member(team.id, agent_id=agent.id)
        await client.teams.add_member(team.id, user_id=alex.id)

        # 4. A shared thread
        thread = await client.threads.create("Market Analysis Project", team_id=team.id)

        # 5. Participate routines make the agents answer in their threads
        await ensure_routine(client, researcher.id, "participate_in_research")
        await ensure_routine(client, writer.id, "participate_in_writing")

        # 6. Observe the conversation in real time
        transcript: list[Envelope] = []
        async with client.realtime() as rt:
            room = await rt.join(thread.id, after=thread.last_seq)

            # 7. Send a message to kick off the collaboration
            await room.post(
                "Research the current state of AI agent frameworks and summarize the top 3 "
                "approaches.",
                user_id=alex.id,
            )
            print(f"Conversation started in thread {thread.id} (team {team.id})")
            async with asyncio.timeout(120):
                async for env in room:
                    if env.type != "message":
                        continue
                    print(f"[{env.sender.name}] {env.content}")
                    transcript.append(env)
                    if {e.sender.id for e in transcript} >= {researcher.id, writer.id}:
                        break  # both agents have spoken
        return transcript


if __name__ == "__main__":
    asyncio.run(
        main(
            os.environ.get("AGENT_NETWORK_URL", "http://127.0.0.1:8321"),
            os.environ["AGENT_NETWORK_TOKEN"],
        )
    )
