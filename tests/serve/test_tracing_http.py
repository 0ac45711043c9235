"""One search over HTTP makes one trace across the Ray replicas (tracing on with OTEL_*).

A second app of the session's Serve instance (``/traced``) runs with the standard variables
pointing its replicas' OTLP/HTTP exporters at a receiver in this process, which decodes what
they send with opentelemetry-proto: real SDK spans from every replica, through the exporter
the product ships. Its Search replica sends every text to Embedding, so the hop is traced.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from halldyll_ray.serve_local import free_port

APP = "traced"


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    component: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) in a thread."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for s in scope_spans.spans:
                            received = ReceivedSpan(
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(),
                                name=s.name,
                                kind=SpanProto.SpanKind.Name(s.kind),
                                component=resource.get("halldyll.component", ""),
                                service=resource.get("service.name", ""),
                                start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano,
                                attributes={a.key: _value(a.value) for a in s.attributes},
                            )
                            with receiver.lock:
                                receiver.spans.append(received)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def of(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced_url(ray_serve: dict[str, Any], receiver: Receiver) -> AsyncIterator[str]:
    from ray import serve

    from halldyll_ray.serve import build_app, with_options

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "halldyll-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans arrive soon after they end
        "RAY_SERVE_LOG_TO_STDERR": "0",
    }
    app = with_options(
        build_app({"settings": ray_serve["settings"], "local_embedding_max_texts": 0}),
        ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
    )
    await asyncio.to_thread(serve.run, app, name=APP, route_prefix=f"/{APP}")
    yield f"{ray_serve['url']}/{APP}"
    await asyncio.to_thread(serve.delete, APP)


async def _spans_of(
    receiver: Receiver, trace_id: str, wanted: set[tuple[str, str]], seconds: float = 20
) -> list[ReceivedSpan]:
    """The trace's spans once every (component, name) of ``wanted`` arrived."""
    for _ in range(int(seconds / 0.2)):
        spans = receiver.of(trace_id)
        if wanted <= {(s.component, s.name) for s in spans}:
            await asyncio.sleep(0.5)  # the stragglers of the same batches
            return receiver.of(trace_id)
        await asyncio.sleep(0.2)
    seen = sorted({(s.component, s.name) for s in receiver.of(trace_id)})
    raise AssertionError(f"missing {sorted(wanted - set(seen))}; got {seen}")


def render(spans: list[ReceivedSpan]) -> str:
    """The spans as an indented tree (the README shows one)."""
    children: dict[str, list[ReceivedSpan]] = {}
    ids = {s.span_id for s in spans}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            kind = s.kind.removeprefix("SPAN_KIND_").lower()
            ms = (s.end_ns - s.start_ns) / 1e6
            statement = " ".join(str(s.attributes.get("db.statement", "")).split())
            detail = f"  {statement[:48]}{'...' if len(statement) > 48 else ''}"
            lines.append(f"{'  ' * depth}{s.name}  [{s.component} {kind} {ms:.1f} ms]{detail}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


async def test_one_search_is_one_trace_across_the_replicas(
    traced_url: str, receiver: Receiver, admin_key: str
) -> None:
    auth = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=traced_url, headers=auth, timeout=60) as http:
        stored = await http.post(
            "/v1/users/me/memories",
            json={"type": "fact", "statement": "Ada keeps bees on the roof of her house"},
        )
        assert stored.status_code == 201, stored.text
        # The caller's own trace: its traceparent is honoured, so the caller's span is the
        # root of the service's spans.
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        request_id = f"trace-{uuid.uuid4().hex}"
        found = await http.post(
            "/v1/users/me/search",
            json={"query": f"what does Ada keep on her roof? {uuid.uuid4().hex[:6]}"},
            headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "X-Request-ID": request_id},
        )
        assert found.status_code == 200, found.text
        assert found.json()["results"]
    spans = await _spans_of(
        receiver,
        trace_id,
        {
            ("Ingress", "Search.search_json"),
            ("Search", "Search.search_json"),
            ("Search", "Embedding.embed"),
            ("Embedding", "Embedding.embed"),
            ("Embedding", "Embedding.embed_batch"),
        },
    )
    print(render(spans))
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans)
    # One tree: the HTTP request's span is the only child of the caller's span, and every
    # other span's parent is a span of this trace.
    (http_span,) = [s for s in spans if s.parent_id == caller_span]
    assert (http_span.component, http_span.kind) == ("Ingress", "SPAN_KIND_SERVER")
    assert http_span.attributes.get("http.route", "").endswith("/v1/users/{user_id}/search")
    assert all(s.parent_id in by_id for s in spans if s is not http_span)
    assert {s.service for s in spans} == {"halldyll-test"}

    def one(component: str, name: str, kind: str) -> ReceivedSpan:
        kind = f"SPAN_KIND_{kind}"
        (span,) = [s for s in spans if (s.component, s.name, s.kind) == (component, name, kind)]
        return span

    def chain(span: ReceivedSpan) -> list[str]:
        names = []
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            names.append(f"{span.component}:{span.name}")
        return names

    call = one("Ingress", "Search.search_json", "CLIENT")
    served = one("Search", "Search.search_json", "SERVER")
    embed_call = one("Search", "Embedding.embed", "CLIENT")
    embedded = one("Embedding", "Embedding.embed", "SERVER")
    batch = one("Embedding", "Embedding.embed_batch", "INTERNAL")
    assert chain(call)[-1] == f"Ingress:{http_span.name}"
    assert served.parent_id == call.span_id
    assert f"Search:{served.name}" in chain(embed_call)
    assert embedded.parent_id == embed_call.span_id
    assert batch.parent_id == embedded.span_id
    # PostgreSQL: the key's check in the Ingress, the search's queries in Search; Redis too.
    queries = [s for s in spans if s.attributes.get("db.system") == "postgresql"]
    assert {s.component for s in queries} >= {"Ingress", "Search"}
    assert all(f"Search:{served.name}" in chain(s) for s in queries if s.component == "Search")
    assert any(s.attributes.get("db.system") == "redis" for s in spans)
    # The request id is on every span, the instrumentations' included.
    assert {s.attributes.get("halldyll.request_id") for s in spans} == {request_id}


async def test_the_untraced_app_sends_nothing(
    ray_serve: dict[str, Any], receiver: Receiver, admin_key: str, traced_url: str
) -> None:
    trace_id = secrets.token_hex(16)
    async with httpx.AsyncClient(base_url=ray_serve["url"], timeout=60) as http:
        found = await http.post(
            "/v1/users/me/search",
            json={"query": "what does Ada keep?"},
            headers={
                "Authorization": f"Bearer {admin_key}",
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
            },
        )
    assert found.status_code == 200, found.text
    await asyncio.sleep(1)  # ten times the traced replicas' export delay
    assert receiver.of(trace_id) == []
