"""Tests of generate_reply (runtime/runner.py): cleaning, echoes, resampling, seeds."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agent_network.runtime.models import register_model
from agent_network.runtime.prompt import Prompt, build_prompt
from agent_network.runtime.runner import (
    REPLY_ATTEMPTS,
    RETRY_TEMPERATURE,
    generate_reply,
    local_seed,
)

KICKOFF = "We are ready to move the billing migration to production on Thursday."
FACT = "Status before the production cutover: 7 of 8 checklist items are done."


def prompt() -> Prompt:
    return build_prompt(
        agent_name="Delivery Agent",
        org_name="Globex",
        identity="",
        thread_title="rollout-status",
        history=[("Alex Rivera (project lead)", "Acme", KICKOFF)],
        knowledge=[{"text": FACT}],
    )


class Scripted:
    """A model answering the given texts in turn (the last one again when they run out),
    recording what it was asked and with which settings."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []
        self.settings: list[dict[str, Any]] = []

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.asked.append(
            "\n".join(
                str(p.content) for m in messages for p in m.parts if isinstance(p.content, str)
            )
        )
        self.settings.append(dict(info.model_settings or {}))
        answer = self.answers[min(len(self.asked), len(self.answers)) - 1]
        return ModelResponse(parts=[TextPart(answer)])


@pytest.fixture
def scripted() -> Iterator[Any]:
    names: list[str] = []

    def make(*answers: str, name: str = "scripted") -> Scripted:
        model = Scripted(*answers)
        register_model(name, FunctionModel(model))
        names.append(name)
        return model

    yield make
    for name in names:
        register_model(name, None)


async def reply(model_name: str = "scripted", **kw: Any) -> str:
    answer = await generate_reply(
        model_name=model_name,
        prompt=prompt(),
        speaker_name="Delivery Agent",
        other_names=["Alex Rivera (project lead)"],
        seed_key="reply:agt:env",
        **kw,
    )
    return answer.content


@pytest.mark.anyio
async def test_a_defective_reply_is_sampled_again_with_the_retry_prompt(scripted: Any) -> None:
    model = scripted("Hi [Customer Name]! I'm Alex Rivera, the project lead.", f"{FACT} Go.")
    assert await reply() == f"{FACT} Go."
    assert len(model.asked) == 2
    assert model.asked[0].endswith(f'Start with this fact: "{FACT}"')
    assert f"{KICKOFF}\n\nReply to Alex Rivera of Acme" in model.asked[0]  # the user turn
    assert f'The message you reply to: "{KICKOFF}"' in model.asked[1]


@pytest.mark.anyio
async def test_the_third_attempt_leaves_the_message_out(scripted: Any) -> None:
    model = scripted(KICKOFF, KICKOFF, FACT)
    assert await reply() == FACT
    assert [KICKOFF in asked for asked in model.asked] == [True, True, False]


@pytest.mark.anyio
async def test_when_every_sample_is_defective_the_defective_sentences_are_dropped(
    scripted: Any,
) -> None:
    model = scripted("I'm Alex Rivera. The parcel ships on Monday. Call [Your Name].")
    assert await reply() == "The parcel ships on Monday."
    assert len(model.asked) == REPLY_ATTEMPTS


@pytest.mark.anyio
async def test_nothing_is_posted_when_nothing_but_defects_came_out(scripted: Any) -> None:
    scripted("Dear [Customer Name], I'm Alex Rivera.")
    assert await reply() == ""


@pytest.mark.anyio
async def test_echoes_of_the_message_and_of_the_ask_are_dropped(scripted: Any) -> None:
    model = scripted(f"{KICKOFF} Reply to Alex Rivera of Acme in 2 sentences. {FACT}")
    assert await reply() == FACT
    assert len(model.asked) == 1


@pytest.mark.anyio
async def test_a_reply_that_only_repeats_the_message_is_sampled_again(scripted: Any) -> None:
    model = scripted(KICKOFF, FACT)
    assert await reply() == FACT
    assert len(model.asked) == 2


@pytest.mark.anyio
async def test_local_model_seeds_mix_the_model_seed_and_heat_up_late_retries(
    scripted: Any,
) -> None:
    model = scripted("[Your Name]", name="local:scripted")
    assert await reply("local:scripted", model_seed=7) == ""
    seeds = [s["seed"] for s in model.settings]
    assert seeds == [local_seed("reply:agt:env", a, 7) for a in range(REPLY_ATTEMPTS)]
    assert len(set(seeds)) == REPLY_ATTEMPTS
    assert [s.get("temperature") for s in model.settings][:3] == [None, None, RETRY_TEMPERATURE]


def test_local_seed_without_a_model_seed_is_the_seed_of_earlier_versions() -> None:
    assert local_seed("reply:a:e", 1) == zlib.crc32(b"reply:a:e:1")
    assert local_seed("reply:a:e", 1, 0) == local_seed("reply:a:e", 1)
    assert local_seed("reply:a:e", 1, 3) != local_seed("reply:a:e", 1)


@pytest.mark.anyio
async def test_provider_models_get_no_local_sampling_settings(scripted: Any) -> None:
    model = scripted("[Your Name]")
    await reply(model_seed=7)
    assert all("seed" not in s and "temperature" not in s for s in model.settings)
