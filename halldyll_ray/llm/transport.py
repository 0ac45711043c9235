"""The LLM client's parts: transports (doors), response checks, limits, accounting (#14).

A :class:`ChatTransport` takes an OpenAI chat-completions request body and returns the
response body, both as plain dicts, so every door speaks the same wire format:

- :class:`OpenAITransport`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM,
  Ray Serve LLM's OpenAI app, Ollama, llama.cpp or dasllama servers, OpenAI itself), through
  the ``openai`` SDK's ``AsyncOpenAI``: its per-attempt timeout and its retries with
  exponential backoff (408/409/429/5xx and connection errors, honouring ``Retry-After``).
- a Ray Serve handle to a co-located LLM application: built in
  ``halldyll_ray.serve.llm_handle`` (the core never imports Ray) and passed in here.

:class:`LLMClient` sits in front of either: a concurrency limit (a semaphore), the response
checked into a :class:`ChatResponse`, and token accounting in :class:`LLMMetrics` (whose
observers feed Ray's metrics in a Serve replica). ``halldyll_ray.llm.client`` builds the
whole chain from settings (and re-exports these names).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import openai
from pydantic import SecretStr

from halldyll_ray.errors import ConfigurationError, register_secret
from halldyll_ray.llm.protocol import LLMOutputInvalid, LLMUnavailable, Usage

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses a retry cannot fix: the server understood the request and refused it.
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 413, 422})


class LLMRequestRefused(LLMUnavailable):
    """The server refused the request itself (a 4xx such as 400 or 404), so retrying the same
    request cannot help: an unsupported ``response_format``, an unknown model, a bad key.

    It is an :class:`LLMUnavailable` (a job fails this try and is retried later, when the
    configuration may have been fixed); ``status`` is the HTTP status (or the co-located
    app's error code).
    """

    code = "llm_request_refused"

    def __init__(self, message: str, *, status: int, **fields: Any) -> None:
        super().__init__(message, status=status, **fields)
        self.status = status


class ChatTransport(Protocol):
    """One door to a chat-completions model.

    ``complete`` takes an OpenAI chat-completions request body (``model``, ``messages``,
    ``response_format``, ...) and returns the response body as the OpenAI API shapes it
    (``choices[0].message.content``, ``usage``). It retries transient failures itself and
    raises :class:`LLMUnavailable` when they persist, :class:`LLMRequestRefused` when the
    server refuses the request.
    """

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]: ...


class OpenAITransport:
    """Any OpenAI-compatible chat-completions endpoint, through ``openai.AsyncOpenAI``.

    Args:
        base_url: The API root, ending in ``/v1`` (``http://127.0.0.1:8080/v1``).
        api_key: Sent as a bearer token; never logged. None: servers that need none.
        timeout_s: Seconds one attempt may take (connect, send, generate, read).
        max_retries: Further attempts after a transient failure (the SDK's backoff).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        self.base_url = base_url
        key = api_key.get_secret_value() if api_key is not None else None
        # The server's error text ends up in our messages (job rows, audit rows, logs), and a
        # server or proxy may quote the key it was sent ("Received API Key = ..."): hidden
        # there, as every credential (errors.redact).
        register_secret(key)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # The SDK insists on a key; local servers ignore this placeholder.
            api_key=key if key is not None else "unused",
            timeout=timeout_s,
            max_retries=max_retries,
        )

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            # The SDK's generic POST: the body goes as is and the JSON answer comes back
            # as a dict, so a field the SDK's typed models do not know is neither refused
            # nor dropped.
            response = await self._client.post("/chat/completions", body=body, cast_to=object)
        except openai.APIStatusError as exc:
            status = exc.status_code
            message = _error_message(exc.body) or str(exc)
            if status in REFUSED_STATUSES:
                raise LLMRequestRefused(
                    f"the LLM endpoint refused the request ({status}): {message}",
                    status=status,
                ) from None
            raise LLMUnavailable(
                f"the LLM endpoint kept failing ({status}): {message}", status=status
            ) from None
        except openai.APIConnectionError as exc:  # APITimeoutError is one
            raise LLMUnavailable(
                f"the LLM endpoint at {self.base_url} cannot be reached: {exc}"
            ) from None
        if not isinstance(response, dict):
            raise LLMOutputInvalid("the LLM endpoint's answer is not a JSON object")
        return response

    async def aclose(self) -> None:
        await self._client.close()


def _error_message(body: object) -> str | None:
    """The ``message`` of an OpenAI-style error body (``{"error": {"message": ...}}`` or the
    SDK's already unwrapped ``{"message": ...}``)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])[:500]
    return None


def raise_for_error_body(response: dict[str, Any]) -> None:
    """Raise the typed error an OpenAI-style error body stands for (``{"error": {...}}``,
    as a co-located app returns it instead of raising across Ray); no-op on a completion.

    A ``code`` that is a refused HTTP status (400, 404, ...) raises
    :class:`LLMRequestRefused`; anything else :class:`LLMUnavailable`.
    """
    error = response.get("error")
    if error is None:
        return
    message = _error_message(response) or "the LLM app answered with an error"
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) else None
    if status in REFUSED_STATUSES:
        raise LLMRequestRefused(f"the LLM app refused the request: {message}", status=status)
    raise LLMUnavailable(f"the LLM app failed: {message}", status=status)


@dataclass(frozen=True)
class ChatResponse:
    """The parts of a chat completion the memory model reads."""

    content: str
    finish_reason: str | None
    usage: Usage
    model: str | None


def parse_response(response: dict[str, Any]) -> ChatResponse:
    """The first choice's text and the token usage of an OpenAI chat-completions response.

    Raises:
        LLMOutputInvalid: no choice, or no text content in it.
    """
    try:
        choice = response["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMOutputInvalid("the LLM response has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise LLMOutputInvalid("the LLM response's message content is not text")
    raw_usage = response.get("usage")
    usage = Usage()
    if isinstance(raw_usage, dict):
        usage = Usage(
            prompt_tokens=_count(raw_usage.get("prompt_tokens")),
            completion_tokens=_count(raw_usage.get("completion_tokens")),
        )
    model = response.get("model")
    reason = choice.get("finish_reason") if isinstance(choice, dict) else None
    return ChatResponse(
        content=content,
        finish_reason=reason if isinstance(reason, str) else None,
        usage=usage,
        model=model if isinstance(model, str) else None,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


Outcome = Literal["ok", "unavailable", "invalid"]


@dataclass(frozen=True)
class LLMCall:
    """One call through :class:`LLMClient`, as :class:`LLMMetrics` records it.

    ``seconds`` is the wall time of the call including the transport's retries, not the
    time spent waiting for the concurrency limit; ``usage`` is zero unless the server
    reported it.
    """

    model: str
    task: str
    outcome: Outcome
    seconds: float
    usage: Usage


@dataclass
class _Tally:
    calls: int = 0
    unavailable: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class LLMMetrics:
    """Calls, failures, seconds and tokens of the LLM, per model, in this process.

    ``observers`` get every :class:`LLMCall` too: the Serve edge adds one that feeds Ray's
    metrics (Prometheus counters ``halldyll_llm_prompt_tokens`` and
    ``halldyll_llm_completion_tokens``, see ``halldyll_ray.serve.llm_handle``). Thread-safe.
    """

    observers: list[Callable[[LLMCall], None]] = field(default_factory=list)
    _by_model: dict[str, _Tally] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, call: LLMCall) -> None:
        with self._lock:
            tally = self._by_model.setdefault(call.model, _Tally())
            tally.calls += 1
            tally.unavailable += call.outcome == "unavailable"
            tally.invalid += call.outcome == "invalid"
            tally.prompt_tokens += call.usage.prompt_tokens
            tally.completion_tokens += call.usage.completion_tokens
            tally.seconds += call.seconds
        for observer in self.observers:
            try:
                observer(call)
            except Exception:  # a metrics exporter must never fail a model call
                log.exception("an LLM metrics observer failed")

    def snapshot(self) -> dict[str, Any]:
        """``{"models": [{model, calls, unavailable, invalid, prompt_tokens,
        completion_tokens, mean_seconds}]}``, models sorted by name."""
        with self._lock:
            rows = [
                {
                    "model": model,
                    "calls": t.calls,
                    "unavailable": t.unavailable,
                    "invalid": t.invalid,
                    "prompt_tokens": t.prompt_tokens,
                    "completion_tokens": t.completion_tokens,
                    "mean_seconds": round(t.seconds / t.calls, 4) if t.calls else 0.0,
                }
                for model, t in sorted(self._by_model.items())
            ]
        return {"models": rows}


class LLMClient:
    """A chat-completions model behind a transport: concurrency limit, checks, accounting.

    Args:
        transport: The door (:class:`OpenAITransport`, the Serve handle's, a replay).
        model: The model id sent in each request's ``model`` field.
        max_concurrency: Calls in flight at once from this client; more wait their turn.
        metrics: Where calls are counted (a new :class:`LLMMetrics` when None).
    """

    def __init__(
        self,
        transport: ChatTransport,
        *,
        model: str,
        max_concurrency: int = 4,
        metrics: LLMMetrics | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigurationError("LLM_MAX_CONCURRENCY must be at least 1")
        self.transport = transport
        self.model = model
        self.max_concurrency = max_concurrency
        self.metrics = metrics if metrics is not None else LLMMetrics()
        self._slots = asyncio.Semaphore(max_concurrency)

    async def chat(self, body: dict[str, Any], *, task: str = "chat") -> ChatResponse:
        """Send ``body`` (its ``model`` set to this client's); the checked response.

        Raises:
            LLMUnavailable: the transport failed (LLMRequestRefused: the server refused).
            LLMOutputInvalid: the response has no text choice.
        """
        return await self.ask(body, task=task, parse=lambda response: response)

    async def ask(
        self, body: dict[str, Any], *, task: str, parse: Callable[[ChatResponse], T]
    ) -> T:
        """Send ``body`` (its ``model`` set to this client's) and parse the answer.

        ``parse`` turns the response into the caller's answer inside the
        accounting, so an answer it refuses (raising :class:`LLMOutputInvalid`) is counted
        as an invalid call, not a good one. ``task`` names the call in the metrics.

        Raises:
            LLMUnavailable: the transport failed (LLMRequestRefused: the server refused).
            LLMOutputInvalid: the response has no text choice, or ``parse`` refused it.
        """
        body = {**body, "model": self.model}
        async with self._slots:
            start = time.perf_counter()
            outcome: Outcome = "unavailable"
            usage = Usage()
            try:
                response = parse_response(await self.transport.complete(body))
                usage = response.usage
                answer = parse(response)
                outcome = "ok"
                return answer
            except LLMOutputInvalid:
                outcome = "invalid"
                raise
            finally:
                self.metrics.record(
                    LLMCall(
                        model=self.model,
                        task=task,
                        outcome=outcome,
                        seconds=time.perf_counter() - start,
                        usage=usage,
                    )
                )

    async def aclose(self) -> None:
        closer = getattr(self.transport, "aclose", None)
        if closer is not None:
            await closer()


__all__ = [
    "ChatResponse",
    "ChatTransport",
    "LLMCall",
    "LLMClient",
    "LLMMetrics",
    "LLMRequestRefused",
    "OpenAITransport",
    "parse_response",
    "raise_for_error_body",
]
