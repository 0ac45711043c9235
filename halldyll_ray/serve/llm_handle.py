"""The Serve-handle door to a co-located LLM application, and Ray metrics for LLM calls (#14).

``LLM_PROVIDER=serve`` reaches the model through a Ray Serve handle to another application
in the same cluster (``LLM_SERVE_APP``), whose ingress deployment has a method
(``LLM_SERVE_METHOD``, default ``chat_completions``) taking an OpenAI chat-completions request
body as a dict and returning the response body, or an OpenAI error body
``{"error": {"message", "type", "code"}}``. ``examples/llm_server_app.py`` is one. The core
never imports Ray: this module builds the transport and hands it to
:func:`halldyll_ray.llm.client.memory_model_from_settings`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve import metrics
from ray.serve.exceptions import RayServeException
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from halldyll_ray.config import Settings
from halldyll_ray.llm.client import (
    LLMCall,
    LLMMetrics,
    LLMRequestRefused,
    memory_model_from_settings,
    raise_for_error_body,
)
from halldyll_ray.llm.openai_model import LLMMemoryModel
from halldyll_ray.llm.protocol import LLMOutputInvalid, LLMUnavailable

#: Failures of the hop itself that a later attempt may not meet: the replica was busy
#: (BackPressureError), restarting or moving, or the application is not (yet) deployed.
_TRANSIENT = (RayServeException, RayActorError)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, LLMUnavailable) and not isinstance(exc, LLMRequestRefused)


class ServeHandleTransport:
    """A :class:`~halldyll_ray.llm.client.ChatTransport` over a Ray Serve handle.

    Each attempt may take ``timeout_s``; transient failures (back-pressure, a replica
    unavailable, a timeout, an error body that is not a refusal) are retried
    ``max_retries`` times with exponential backoff and jitter (tenacity).

    Args:
        app_name: The Serve application serving the model.
        method: Its ingress deployment's method (body dict in, response dict out).
        timeout_s: Seconds one attempt may take.
        max_retries: Further attempts after a transient failure.
        backoff_s: First backoff; it doubles up to 10 s.
    """

    def __init__(
        self,
        app_name: str,
        *,
        method: str = "chat_completions",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        self.app_name = app_name
        self.method = method
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._handle: Any = None

    async def _once(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            if self._handle is None:
                # Looked up at the first call: the LLM app may be deployed after this one.
                self._handle = serve.get_app_handle(self.app_name)
            call = getattr(self._handle, self.method).remote(body)
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await call
            except TimeoutError:
                call.cancel()
                raise LLMUnavailable(
                    f"the LLM app {self.app_name!r} did not answer within {self.timeout_s} s"
                ) from None
        except (*_TRANSIENT, TimeoutError) as exc:
            raise LLMUnavailable(
                f"the LLM app {self.app_name!r} is unavailable: {type(exc).__name__}"
            ) from None
        except RayError as exc:  # the app's method raised: not the hop's fault, not retried
            raise LLMRequestRefused(
                f"the LLM app {self.app_name!r} failed: {str(exc).splitlines()[0][:300]}",
                status=500,
            ) from None
        if not isinstance(response, dict):
            raise LLMOutputInvalid(f"the LLM app {self.app_name!r} did not answer with a dict")
        raise_for_error_body(response)
        return response

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.backoff_s, max=10)
            + wait_random(0, self.backoff_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        ):
            with attempt:
                return await self._once(body)
        raise AssertionError("unreachable: tenacity reraises the last failure")


class RayLLMMetrics:
    """An :class:`~halldyll_ray.llm.client.LLMMetrics` observer feeding Ray's metrics API
    (Prometheus, on each node's metrics port): ``halldyll_llm_calls`` (by model, task and
    outcome), ``halldyll_llm_prompt_tokens`` and ``halldyll_llm_completion_tokens`` (by
    model and task), ``halldyll_llm_latency_ms`` (by model and task)."""

    def __init__(self) -> None:
        tags = ("model", "task")
        self.calls = metrics.Counter(
            "halldyll_llm_calls",
            description="LLM calls by model, task and outcome (ok, unavailable, invalid).",
            tag_keys=("model", "task", "outcome"),  # type: ignore[arg-type]  # typed as a 1-tuple
        )
        self.prompt_tokens = metrics.Counter(
            "halldyll_llm_prompt_tokens",
            description="Prompt tokens the LLM server reported, by model and task.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self.completion_tokens = metrics.Counter(
            "halldyll_llm_completion_tokens",
            description="Completion tokens the LLM server reported, by model and task.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self.latency = metrics.Histogram(
            "halldyll_llm_latency_ms",
            description="LLM call latency (retries included), by model and task.",
            boundaries=[50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000],
            tag_keys=tags,  # type: ignore[arg-type]
        )

    def __call__(self, call: LLMCall) -> None:
        tags = {"model": call.model, "task": call.task}
        self.calls.inc(tags={**tags, "outcome": call.outcome})
        if call.usage.prompt_tokens:
            self.prompt_tokens.inc(call.usage.prompt_tokens, tags=tags)
        if call.usage.completion_tokens:
            self.completion_tokens.inc(call.usage.completion_tokens, tags=tags)
        self.latency.observe(call.seconds * 1000, tags=tags)


def ray_llm_metrics() -> LLMMetrics:
    """In-process LLM metrics that also feed Ray's metrics (build it inside a replica)."""
    return LLMMetrics(observers=[RayLLMMetrics()])


def serve_memory_model(
    settings: Settings, *, metrics: LLMMetrics | None = None
) -> LLMMemoryModel | None:
    """The memory model the settings ask for, from inside the Ray cluster: either door.

    ``LLM_PROVIDER=serve`` gets a :class:`ServeHandleTransport` to ``LLM_SERVE_APP``;
    ``openai`` its HTTP transport; ``none`` gives None. ``metrics`` defaults to
    :func:`ray_llm_metrics` when there is a model.
    """
    if settings.llm_provider == "none":
        return None
    metrics = metrics if metrics is not None else ray_llm_metrics()
    transport = None
    if settings.llm_provider == "serve":
        assert settings.llm_serve_app is not None  # Settings checks it with the provider
        transport = ServeHandleTransport(
            settings.llm_serve_app,
            method=settings.llm_serve_method,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
    return memory_model_from_settings(settings, transport=transport, metrics=metrics)


__all__ = ["RayLLMMetrics", "ServeHandleTransport", "ray_llm_metrics", "serve_memory_model"]
