"""Tracing in one process, with the SDK's in-memory exporter: real spans of a real search
(PostgreSQL through the asyncpg instrumentation, Redis through the redis one), the request
id on every span, the trace context carried into a handle method, a batch's parent and
links, and the trace ids in log records. The trace across Ray replicas is tested in
tests/serve/test_tracing_http.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from halldyll_ray import ConfigurationError, Fact, MemoryEngine, tracing
from halldyll_ray.serve.deployments import use_serve_logging


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("test", processors=[SimpleSpanProcessor(exporter)])
    yield exporter
    # Tracing off again for the rest of the session (the global provider stays: OpenTelemetry
    # sets it once per process, and without instrumentation nothing else uses it).
    AsyncPGInstrumentor().uninstrument()
    RedisInstrumentor().uninstrument()
    logging.getLogger("ray.serve").removeFilter(tracing._TRACE_IDS)
    tracing._tracer = None


@pytest.fixture
def exported(spans: InMemorySpanExporter) -> InMemorySpanExporter:
    spans.clear()
    return spans


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


async def test_a_search_traces_its_queries_and_redis_calls_with_the_request_id(
    engine: MemoryEngine, exported: InMemorySpanExporter
) -> None:
    user = await engine.create_user("traced", None)
    await engine.store_memory(user.id, Fact(statement="Ada drinks green tea every morning"))
    exported.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request") as root, tracing.request_scope("req-42"):
        results = await engine.search(user.id, "what does Ada drink?")
    assert results
    spans = exported.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    root_id = root.get_span_context()
    assert {s.context.trace_id for s in spans} == {root_id.trace_id}
    queries = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    commands = [s for s in spans if s.attributes.get("db.system") == "redis"]
    assert queries, [s.name for s in spans]
    assert commands, [s.name for s in spans]
    # Each one descends from the request's span, and carries its id; no statement parameters.
    for span in queries + commands:
        assert "request" in _ancestors(span, by_id), span.name
    assert all(s.attributes.get(tracing.REQUEST_ID) == "req-42" for s in spans)
    assert not any("db.statement.parameters" in s.attributes for s in queries)
    assert all(
        "what does Ada drink" not in str(s.attributes.get("db.statement", "")) for s in commands
    )


async def test_calls_outside_a_request_are_not_traced(
    engine: MemoryEngine, exported: InMemorySpanExporter
) -> None:
    user = await engine.create_user("untraced", None)
    await engine.search(user.id, "anything at all?")  # health checks, background work
    assert exported.get_finished_spans() == ()
    with trace.get_tracer("test").start_as_current_span("request"):
        await engine.search(user.id, "anything at all?")
    assert any(s.attributes.get("db.system") for s in exported.get_finished_spans())


async def test_a_handle_method_continues_the_callers_trace(
    exported: InMemorySpanExporter,
) -> None:
    class Deployment:
        @tracing.handle_method
        async def work(self, value: int, *, request_id: str | None) -> int:
            with tracing.span("inner"):
                return value * 2

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    # As a replica receives it: another task, nothing current, the context in the keyword.
    assert await Deployment().work(21, trace_context=carrier, request_id="req-7") == 42
    assert "traceparent" in carrier
    finished = {s.name: s for s in exported.get_finished_spans()}
    served = finished["test.work"]
    assert served.kind is trace.SpanKind.SERVER
    assert served.context.trace_id == caller.get_span_context().trace_id
    assert served.parent is not None
    assert served.parent.span_id == caller.get_span_context().span_id
    assert finished["inner"].parent is not None
    assert finished["inner"].parent.span_id == served.context.span_id
    assert finished["inner"].attributes[tracing.REQUEST_ID] == "req-7"
    # Without a carrier it still runs (a handle caller with tracing off): a new trace.
    assert await Deployment().work(1, request_id=None) == 2


def test_a_batch_is_a_child_of_its_first_request_and_links_the_others(
    exported: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test")
    contexts, ids = [], []
    for name in ("first", "second"):
        with tracer.start_as_current_span(name) as span:
            contexts.append(tracing.current_context())
            ids.append(span.get_span_context())
    with tracing.batch_span("batch", contexts, **{"halldyll.batch.requests": 2}):
        pass
    batch = next(s for s in exported.get_finished_spans() if s.name == "batch")
    assert batch.parent is not None and batch.parent.span_id == ids[0].span_id
    assert [link.context.span_id for link in batch.links] == [ids[1].span_id]
    assert batch.attributes["halldyll.batch.requests"] == 2


def test_log_records_carry_the_trace_and_span_ids(exported: InMemorySpanExporter) -> None:
    serve, ours = logging.getLogger("ray.serve"), logging.getLogger("halldyll_ray")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (serve, ours)]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    try:
        serve.handlers[:] = [Keep()]
        use_serve_logging("info")
        log = logging.getLogger("halldyll_ray.engine")
        log.info("outside")
        with trace.get_tracer("test").start_as_current_span("logged") as span:
            log.info("inside")
    finally:
        for lg, handlers, level, propagate_ in saved:
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate_
    outside, inside = records
    assert not hasattr(outside, "trace_id")
    assert inside.trace_id == format(span.get_span_context().trace_id, "032x")
    assert inside.span_id == format(span.get_span_context().span_id, "016x")


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
    ],
)
def test_the_standard_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by_environment(env) is on


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_an_unsupported_exporter_is_a_configuration_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="OTEL_"):
        tracing._exporting_processors()


async def test_the_request_metrics_name_the_trace_of_each_windows_slowest_request(
    exported: InMemorySpanExporter,
) -> None:
    # The Ingress's middleware inside the ASGI instrumentation, as instrument_fastapi
    # places it: what it records carries the request's trace id.
    import httpx
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.responses import PlainTextResponse

    from halldyll_ray.serve import http as served
    from halldyll_ray.serve.http import RecentRequests

    async def hello(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("hi")(scope, receive, send)

    app = OpenTelemetryMiddleware(served._RequestContext(hello))
    before = getattr(served.api.state, "metrics", None)
    served.api.state.metrics = recent = RecentRequests()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get("/hello", headers={"X-Request-ID": "exemplar-1"})
        assert answer.status_code == 200
    finally:
        served.api.state.metrics = before
    slowest = recent.snapshot()["routes"][0]["slowest"]
    server = [s for s in exported.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    assert slowest["request_id"] == "exemplar-1"
    assert slowest["trace_id"] == format(server[0].context.trace_id, "032x")


async def test_an_api_key_in_the_url_is_in_no_span_nor_request_log_line(
    exported: InMemorySpanExporter,
) -> None:
    # A client that puts its key in the URL (a path segment, ?api_key=): the FastAPI
    # instrumentation quotes the URL in its attributes (url.path and url.query, or
    # http.target and http.url), the request log the path.
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from halldyll_ray.keys import generate_key
    from halldyll_ray.serve import http as served

    prefix, key = generate_key()
    secret = key.removeprefix(prefix + "_")
    app = FastAPI()

    @app.get("/v1/users/{user_id}/memories")
    async def memories(user_id: str) -> PlainTextResponse:
        return PlainTextResponse("no key", status_code=401)

    tracing.instrument_fastapi(app)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("halldyll_ray.http")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        transport = httpx.ASGITransport(app=served._RequestContext(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get(f"/v1/users/{key}/memories", params={"api_key": key})
        assert answer.status_code == 401
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    spans = exported.get_finished_spans()
    server = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert server and f"api_key={prefix}_[redacted]" in repr(dict(server[0].attributes or {}))
    for span in spans:
        assert secret not in repr(dict(span.attributes or {})), span.name
        assert secret not in span.name
    (line,) = [r for r in records if r.getMessage() == "request"]
    assert line.path == f"/v1/users/{prefix}_[redacted]/memories"  # type: ignore[attr-defined]


def test_a_failed_handle_call_records_its_error_without_credentials(
    exported: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        try:
            raise RuntimeError("connect to redis://:hunter2-redis@cache:6379/0 failed")
        except RuntimeError as exc:
            tracing._fail(span, exc)
    (finished,) = [s for s in exported.get_finished_spans() if s.name == "call"]
    (event,) = finished.events
    assert event.name == "exception"
    assert "redis://:[redacted]@cache" in str(event.attributes["exception.message"])
    assert "hunter2-redis" not in repr(dict(event.attributes or {}))
