"""The LLM client: two doors to a chat-completions model, one contract (issue #14).

A :class:`ChatTransport` takes an OpenAI chat-completions request body and returns the
response body, both as plain dicts, so every door speaks the same wire format:

- :class:`OpenAITransport`: any OpenAI-compatible ``/v1/chat/completions`` endpoint, through
  the ``openai`` SDK's ``AsyncOpenAI`` (its timeouts and retries with backoff);
- a Ray Serve handle to a co-located LLM application: built in
  ``halldyll_ray.serve.llm_handle`` (the core never imports Ray) and passed in here.

:class:`LLMClient` adds the concurrency limit, the response checks and token accounting
(:class:`LLMMetrics`); :func:`memory_model_from_settings` builds the whole chain, up to the
:class:`~halldyll_ray.llm.openai_model.LLMMemoryModel`, from settings. The parts live in
:mod:`halldyll_ray.llm.transport` and are re-exported here.
"""

from __future__ import annotations

from halldyll_ray.config import Settings
from halldyll_ray.errors import ConfigurationError
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.transport import (
    ChatResponse,
    ChatTransport,
    LLMCall,
    LLMClient,
    LLMMetrics,
    LLMRequestRefused,
    OpenAITransport,
    parse_response,
    raise_for_error_body,
)


def memory_model_from_settings(
    settings: Settings,
    *,
    transport: ChatTransport | None = None,
    metrics: LLMMetrics | None = None,
) -> LLMMemoryModel | None:
    """The LLM-backed memory model the settings ask for, or None when ``LLM_PROVIDER=none``.

    ``LLM_PROVIDER=openai`` builds an :class:`OpenAITransport` from ``LLM_BASE_URL``,
    ``LLM_API_KEY``, ``LLM_TIMEOUT_S`` and ``LLM_MAX_RETRIES`` unless ``transport`` is given
    (a recording's replay in tests). ``LLM_PROVIDER=serve`` needs ``transport``: the Serve
    handle's, which ``halldyll_ray.serve.llm_handle.serve_memory_model`` builds inside a
    Ray process.

    Raises:
        ConfigurationError: ``LLM_PROVIDER=serve`` without a transport.
    """
    if settings.llm_provider == "none":
        return None
    assert settings.llm_model is not None  # Settings checks it with the provider
    if transport is None:
        if settings.llm_provider == "serve":
            raise ConfigurationError(
                "LLM_PROVIDER=serve reaches the model through a Ray Serve handle: build it "
                "with halldyll_ray.serve.llm_handle.serve_memory_model(settings) inside the "
                "Ray cluster"
            )
        assert settings.llm_base_url is not None
        transport = OpenAITransport(
            settings.llm_base_url,
            api_key=settings.llm_api_key,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
    client = LLMClient(
        transport,
        model=settings.llm_model,
        max_concurrency=settings.llm_max_concurrency,
        metrics=metrics,
    )
    return LLMMemoryModel(client, structured_output=settings.llm_structured_output)


__all__ = [
    "ChatResponse",
    "ChatTransport",
    "LLMCall",
    "LLMClient",
    "LLMMetrics",
    "LLMRequestRefused",
    "OpenAITransport",
    "memory_model_from_settings",
    "parse_response",
    "raise_for_error_body",
]
