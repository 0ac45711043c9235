"""Distributed tracing with OpenTelemetry: off by default, on with the standard ``OTEL_*``
variables, one trace per request across the Ray Serve replicas.

Switch
    Tracing is on in a process when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or ``OTEL_TRACES_EXPORTER`` names an
    exporter (``otlp``, ``console``; ``none`` turns it off), unless ``OTEL_SDK_DISABLED`` is
    ``true``. The SDK reads the rest itself: ``OTEL_SERVICE_NAME`` (default
    ``halldyll-ray``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``,
    ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*`` (headers, timeout, compression). The OTLP
    exporter speaks OTLP/HTTP with protobuf (``http/protobuf``, port 4318 of a collector).

What is traced
    * the HTTP request in the Ingress (the FastAPI instrumentation; ``/healthz`` and
      ``/readyz`` are left out unless ``OTEL_PYTHON_FASTAPI_EXCLUDED_URLS`` says otherwise);
    * each handle call between deployments: a CLIENT span in the caller
      (:func:`traced_handle`) and a SERVER span in the replica that serves it
      (:func:`handle_method`), linked by the W3C trace context (``traceparent``,
      ``tracestate`` and ``baggage``) passed as the ``trace_context`` keyword of the call,
      so every replica's spans join the Ingress's trace;
    * the embedding: a batch of the Embedding deployment (:func:`batch_span`, a child of its
      first request, linked to the others) and a text embedded in the calling replica;
    * each PostgreSQL query (the asyncpg instrumentation: the statement, never its
      parameters) and each Redis command (the redis instrumentation: the command name, its
      arguments replaced by ``?``), within a request: outside any (health checks, background
      work) they are not traced.

    Every span carries the request id as ``halldyll.request_id`` (W3C baggage carries it
    across the hops), and the log records of a replica carry ``trace_id`` and ``span_id``
    while a span is active.

Ray Serve 2.60 has a tracing mode of its own (``serve.start(tracing_config=...)``): it is set
for the whole Serve instance by its own variables, not ``OTEL_*``, and exports through an
import path; this module works under any Serve instance, driven by the replicas' environment.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from halldyll_ray import requestctx
from halldyll_ray.errors import ConfigurationError, quoted, redact

REQUEST_ID = "halldyll.request_id"
"""The span attribute (and baggage entry) that holds the request id."""

DEFAULT_SERVICE_NAME = "halldyll-ray"
_HEALTH_ROUTES = "healthz,readyz"
_TRUE = frozenset({"true", "1", "yes"})

log = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

_tracer: trace.Tracer | None = None  # set by configure(): tracing is on in this process
_component = ""


def enabled_by_environment(env: dict[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables of ``env`` (default: this process's) turn tracing on."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def is_enabled() -> bool:
    """Whether :func:`configure` turned tracing on in this process."""
    return _tracer is not None


def configure(component: str, *, processors: Sequence[Any] | None = None) -> bool:
    """Turn tracing on in this process if the environment says so; once per process.

    Sets the global tracer provider (resource ``service.name`` from ``OTEL_SERVICE_NAME``,
    default ``halldyll-ray``, and ``halldyll.component``), instruments asyncpg and redis,
    and adds ``trace_id`` / ``span_id`` to the records of the ``ray.serve`` logger (where a
    replica's ``halldyll_ray`` records go, see ``use_serve_logging``).

    Args:
        component: What this process serves, e.g. the deployment's name (``Search``).
        processors: Span processors to use instead of the exporters that
            ``OTEL_TRACES_EXPORTER`` names (an in-process test passes one with the SDK's
            in-memory exporter); given, tracing is on whatever the environment says.

    Returns:
        Whether tracing is on in this process (a later call changes nothing).

    Raises:
        ConfigurationError: ``OTEL_TRACES_EXPORTER`` names an exporter other than ``otlp``,
            ``console`` or ``none``, or ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` is not
            ``http/protobuf``.
    """
    global _tracer, _component
    if _tracer is not None:
        return True
    if processors is None and not enabled_by_environment():
        return False
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    span_processors = list(processors) if processors is not None else _exporting_processors()
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME}
    ).merge(Resource({"halldyll.component": component}))
    provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER
    provider.sampler = _InRequestsOnly(provider.sampler)  # before the first tracer takes it
    provider.add_span_processor(_RequestIdProcessor())
    provider.add_span_processor(_NoCredentials())
    for processor in span_processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    logging.getLogger("ray.serve").addFilter(_TRACE_IDS)
    _tracer = provider.get_tracer("halldyll_ray")
    _component = component
    log.info("tracing on (%s)", component)
    return True


def _exporting_processors() -> list[Any]:
    """Batch span processors for the exporters of ``OTEL_TRACES_EXPORTER`` (default otlp)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    names = [
        n.strip().lower()
        for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if n.strip()
    ]
    processors: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol.strip() != "http/protobuf":
                raise ConfigurationError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={quoted(protocol)}: only http/protobuf is "
                    "supported"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={quoted(name)}: use otlp, console or none",
                field="OTEL_TRACES_EXPORTER",
            )
    return processors


def instrument_fastapi(app: Any) -> None:
    """Trace ``app``'s HTTP requests (the FastAPI instrumentation) if tracing is on.

    Incoming ``traceparent`` / ``baggage`` headers are honoured; the per-message ASGI
    ``receive`` / ``send`` spans are left out.
    """
    if _tracer is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=trace.get_tracer_provider(),
        excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", _HEALTH_ROUTES),
        exclude_spans=["receive", "send"],
        # The instrumentation sets the request's attributes again after the span started
        # (past _NoCredentials.on_start), the captured headers too, then calls this.
        server_request_hook=lambda span, scope: _mask(span),
    )


@contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Bind ``request_id`` to the current span and, as baggage, to every span under it."""
    if _tracer is None:
        yield
        return
    trace.get_current_span().set_attribute(REQUEST_ID, request_id)
    token = context.attach(baggage.set_baggage(REQUEST_ID, request_id))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span | None]:
    """An INTERNAL span around a block, when tracing is on (else nothing, and None)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits) when tracing is on and a span is active."""
    if _tracer is None:
        return None
    found = trace.get_current_span().get_span_context()
    return format(found.trace_id, "032x") if found.is_valid else None


def current_context() -> Context | None:
    """The current trace context when tracing is on, to hand to :func:`batch_span`."""
    return context.get_current() if _tracer is not None else None


@contextmanager
def batch_span(
    name: str, requests: Sequence[Context | None], **attributes: Any
) -> Iterator[Span | None]:
    """A span for work merged from several requests (a ``serve.batch`` batch).

    Its parent is the first request's span; it links to the others' (each request's trace
    shows the batch that served it, if only through the link).
    """
    if _tracer is None:
        yield None
        return
    given = [c for c in requests if c is not None]
    parent = given[0] if given else None
    links = [Link(trace.get_current_span(c).get_span_context()) for c in given[1:]]
    with _tracer.start_as_current_span(
        name, context=parent, links=links, attributes=attributes
    ) as current:
        yield current


def handle_method(func: _F) -> _F:
    """A deployment method as a SERVER span, a child of the caller's (see module doc).

    The caller's trace context arrives as the ``trace_context`` keyword (a dict of W3C
    headers); it is removed before ``func`` runs, so ``func``'s signature stays as it is. A
    ``request_id`` keyword of the call also becomes the spans' request id.
    """

    @functools.wraps(func)
    async def traced(
        self: Any, *args: Any, trace_context: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        if _tracer is None:
            return await func(self, *args, **kwargs)
        parent = propagate.extract(trace_context or {})
        request_id = kwargs.get("request_id")
        if isinstance(request_id, str) and baggage.get_baggage(REQUEST_ID, parent) is None:
            parent = baggage.set_baggage(REQUEST_ID, request_id, parent)
        token = context.attach(parent)
        try:
            with _tracer.start_as_current_span(
                f"{_component}.{func.__name__}", kind=SpanKind.SERVER
            ):
                return await func(self, *args, **kwargs)
        finally:
            context.detach(token)

    return cast(_F, traced)


def traced_handle(handle: Any, deployment: str) -> Any:
    """``handle`` (a Serve deployment handle) whose calls are traced, if tracing is on.

    ``traced_handle(h, "Search").search.remote(...)`` starts a CLIENT span
    ``Search.search``, passes the trace context with the call (the ``trace_context``
    keyword that :func:`handle_method` takes) and ends the span when the response is
    awaited. With tracing off it returns ``handle`` itself. Every method called through it
    must take the keyword, that is be decorated with :func:`handle_method`, and its response
    must be awaited (no streaming).
    """
    if _tracer is None or handle is None:
        return handle
    return _TracedHandle(handle, deployment)


class _TracedHandle:
    def __init__(self, handle: Any, deployment: str) -> None:
        self._handle = handle
        self._deployment = deployment

    def options(self, *args: Any, **kwargs: Any) -> _TracedHandle:
        """The handle's ``options(...)``, still traced."""
        return _TracedHandle(self._handle.options(*args, **kwargs), self._deployment)

    def __getattr__(self, name: str) -> _TracedMethod:
        return _TracedMethod(getattr(self._handle, name), f"{self._deployment}.{name}")


class _TracedMethod:
    def __init__(self, method: Any, name: str) -> None:
        self._method = method
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> _TracedResponse:
        assert _tracer is not None  # a _TracedHandle exists only with tracing on
        client = _tracer.start_span(self._name, kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(client))
        try:
            response = self._method.remote(*args, trace_context=carrier, **kwargs)
        except BaseException as exc:
            _fail(client, exc)
            client.end()
            raise
        return _TracedResponse(response, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


class _TracedResponse:
    """Awaits the handle's response; the CLIENT span ends with it."""

    def __init__(self, response: Any, client: Span) -> None:
        self._response = response
        self._client = client

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        try:
            return await self._response
        except BaseException as exc:
            _fail(self._client, exc)
            raise
        finally:
            self._client.end()


def _fail(span: Span, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    span.record_exception(
        exc,
        attributes={"exception.message": redact(str(exc)), "exception.stacktrace": redact(text)},
    )
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class _RequestIdProcessor(SpanProcessor):
    """Puts the request id (baggage, else the audit context's) on every span as it starts,
    those of the asyncpg and redis instrumentations included."""

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        request_id = baggage.get_baggage(REQUEST_ID, parent_context) or (
            requestctx.current().request_id
        )
        if request_id:
            span.set_attribute(REQUEST_ID, str(request_id))


class _NoCredentials(SpanProcessor):
    """Masks credentials (:func:`~halldyll_ray.errors.redact`) in a span's name and
    attributes as it starts: the HTTP instrumentation's ``url.path`` and ``url.query`` (or
    ``http.target``) quote the request's URL, where a client may have put its API key
    (``?api_key=hr_...``), and every exporter (a collector, the console) would keep it."""

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        _mask(span)


def _mask(span: Any) -> None:
    """Credentials out of ``span``'s name and string attributes (a recording span)."""
    if not span.is_recording():
        return
    name = redact(span.name)
    if name != span.name:
        span.update_name(name)
    for key, value in list((span.attributes or {}).items()):
        if isinstance(value, str):
            clean = redact(value)
            if clean != value:
                span.set_attribute(key, clean)


class _InRequestsOnly(Sampler):
    """Drops a CLIENT span that has no parent: a query, Redis command or handle call made
    outside any request (health checks every few seconds, background work), which would
    otherwise be a trace of its own; ``inner`` (from ``OTEL_TRACES_SAMPLER``) decides the
    rest."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT and not (
            trace.get_current_span(parent_context).get_span_context().is_valid
        ):
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"InRequestsOnly{{{self._inner.get_description()}}}"


class _TraceIds(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, as the OTLP backends show them) to a record
    logged while a span is active; Serve's JSON log format writes them as fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


_TRACE_IDS = _TraceIds()
