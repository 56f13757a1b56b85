"""workflow: researcher -> writer -> reviewer, with one revision loop, driven by a TransitionGraph.

The graph (shown as JSON when the example starts):

- the researcher speaks first (``initial_speaker``), then ``from_speaker`` rules route
  researcher -> writer -> reviewer, and a reviewer turn without a decision back to the writer;
- the reviewer has two tools declared by the graph: ``request_revision`` returns
  ``Handoff(target="writer")`` (the tool picks the next speaker: dynamic routing), ``approve`` is
  a plain tool matched by the rule ``tool_called("approve") -> terminate("finished")`` (the graph
  owns the decision: static routing, priority 10 so it wins over ``from_speaker``);
- ``max_turns=5`` allows exactly one revision loop (researcher, writer, reviewer, writer,
  reviewer): whatever a model says, the workflow closes by the fifth message.

All three agents answer through their participate routines. The researcher is triggered by the
thread becoming active (the writer's and reviewer's automatic acks), writes the opening from the
title, and every message triggers whoever the graph names next.

With ``--model test`` the researcher and the writer run on the test model and the reviewer on a
deterministic model registered in this process (``example:reviewer``, a pydantic-ai
FunctionModel that calls the tools like a real model would: ``request_revision`` on the first
draft, ``approve`` on the revised one), so the run always closes with ``finished`` after one
revision. With ``--model local:smollm2`` the reviewer runs on the local model, which cannot
call tools: it gets them as a text convention (``[request_revision: reason]``, ``[approve]`` at
the end of its reply); the run closes with ``finished`` if it approves, else with
``max_turns``.

    .venv/bin/python examples/protocols/workflow.py [--model test|local:smollm2] [--db PATH]
"""

from __future__ import annotations

import json

from _common import Network, Options, messages, report, run
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agent_network.protocol import (
    AgentTarget,
    FromSpeaker,
    TerminateTarget,
    ToolCalled,
    ToolSpec,
    Transition,
    TransitionGraph,
)
from agent_network.runtime.models import register_model

REVIEWER_MODEL = "example:reviewer"

GRAPH = TransitionGraph(
    initial_speaker="researcher",
    transitions=[
        Transition(ToolCalled("approve"), TerminateTarget("finished"), priority=10),
        Transition(FromSpeaker("researcher"), AgentTarget("writer")),
        Transition(FromSpeaker("writer"), AgentTarget("reviewer")),
        Transition(FromSpeaker("reviewer"), AgentTarget("writer")),
    ],
    max_turns=5,
    tools=[
        ToolSpec(
            "request_revision",
            description="Send the draft back to the writer with one concrete suggestion",
            speakers=("reviewer",),
            handoff="writer",
        ),
        ToolSpec(
            "approve", description="Approve the draft and end the workflow", speakers=("reviewer",)
        ),
    ],
)

REVIEWER = (
    "You are a strict-but-fair reviewer. On the FIRST draft, give one concrete suggestion and "
    "end your reply with [request_revision: your suggestion]. On the REVISED draft, end your "
    "reply with [approve]."
)


def deterministic_reviewer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A reviewer that calls its tools like a tool-calling model would: ``request_revision`` when
    it has not spoken in the thread yet (the first draft), ``approve`` when it has; after the
    tool ran, a one-sentence message."""
    last = messages[-1]
    returned = [p for p in last.parts if isinstance(p, ToolReturnPart)]
    if returned:
        if returned[0].tool_name == "approve":
            return ModelResponse(parts=[TextPart("Approved: clear, correct and short.")])
        return ModelResponse(parts=[TextPart("Good start; please add one concrete example.")])
    prompt = "\n".join(
        str(p.content)
        for m in messages
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, SystemPromptPart | UserPromptPart)
    )
    # the earlier messages of the thread are in the prompt as 'Reviewer of <org> wrote "..."'
    spoke_before = "Reviewer of " in prompt
    tools = {t.name for t in info.function_tools}
    if spoke_before and "approve" in tools:
        return ModelResponse(parts=[ToolCallPart("approve", {})])
    if "request_revision" in tools:
        return ModelResponse(
            parts=[ToolCallPart("request_revision", {"reason": "add one concrete example"})]
        )
    return ModelResponse(parts=[TextPart("No tools offered; nothing to decide.")])


async def main(options: Options) -> bool:
    reviewer_model = None
    if options.deterministic:
        register_model(REVIEWER_MODEL, FunctionModel(deterministic_reviewer))
        reviewer_model = REVIEWER_MODEL
    print("graph:", json.dumps(GRAPH.to_dict()))
    async with Network(options) as net:
        researcher = await net.agent(
            "Researcher", "Given a topic, list 3 concrete factual bullets.", key="researcher"
        )
        writer = await net.agent(
            "Writer",
            "Given research bullets, draft a 2-sentence explanation for a novice.",
            key="writer",
        )
        reviewer = await net.agent("Reviewer", REVIEWER, key="reviewer", model=reviewer_model)

        channel = await researcher.open(
            "Topic: how does HTTPS keep traffic private?",
            target=["writer", "reviewer"],
            adapter="workflow",
            graph=GRAPH,
            agent_budget=10,  # 5 agent turns in a row (the default runaway budget is 4)
            ttl=options.seconds(60, 900),  # the last resort if a model stops answering
        )
        thread = await net.until_closed(channel.thread_id, timeout=options.seconds(60, 900))
        texts = messages(net.seen[channel.thread_id])
        report(thread)
        print(f"turns: {thread.turns}")
        speakers = [e.sender.id for e in texts]
        revisions = [
            e
            for e in texts
            if any(c.get("name") == "request_revision" for c in e.data.get("tool_calls") or [])
        ]
        if options.deterministic:
            return (
                thread.close_reason == "finished"
                and speakers == [researcher.id, writer.id, reviewer.id, writer.id, reviewer.id]
                and len(revisions) == 1
            )
        return (
            thread.status == "closed"
            and thread.close_reason in ("finished", "max_turns")
            and 1 <= len(texts) <= 5
            and speakers[0] == researcher.id
        )


if __name__ == "__main__":
    run(main, "workflow: researcher -> writer -> reviewer with one revision loop")
