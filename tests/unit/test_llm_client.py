"""Pure logic of the LLM client and memory model: settings, parsing, fallbacks, limits.

Transports here are small in-process ChatTransports (pure-logic tier); what a model answers
comes from the recordings (tests/data/llm_recordings), never written by hand.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from llm_replay import recording
from pydantic import SecretStr

from halldyll_ray.components.jobs import describe_error
from halldyll_ray.config import Settings
from halldyll_ray.errors import ConfigurationError
from halldyll_ray.llm.client import (
    LLMClient,
    LLMMetrics,
    LLMRequestRefused,
    OpenAITransport,
    memory_model_from_settings,
    parse_response,
    raise_for_error_body,
)
from halldyll_ray.llm.openai_model import (
    LLMMemoryModel,
    facts_from_answer,
    parse_json,
    text_within,
)
from halldyll_ray.llm.protocol import (
    DatedText,
    FactCandidate,
    LLMOutputInvalid,
    LLMUnavailable,
    Neighbour,
)

OPENAI = {"llm_provider": "openai", "llm_base_url": "http://127.0.0.1:9/v1", "llm_model": "m"}


# --- settings ---------------------------------------------------------------------------


def test_no_llm_by_default() -> None:
    settings = Settings.from_env()
    assert settings.llm_provider == "none"
    assert memory_model_from_settings(settings) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"llm_provider": "openai"}, "needs LLM_MODEL"),
        ({"llm_provider": "openai", "llm_model": "m"}, "needs LLM_BASE_URL"),
        ({**OPENAI, "llm_serve_app": "llm"}, "LLM_SERVE_APP is for LLM_PROVIDER=serve"),
        ({"llm_provider": "serve", "llm_model": "m"}, "needs LLM_SERVE_APP"),
        (
            {
                "llm_provider": "serve",
                "llm_model": "m",
                "llm_serve_app": "llm",
                "llm_base_url": "http://x/v1",
            },
            "are for LLM_PROVIDER=openai",
        ),
        ({"llm_base_url": "http://x/v1"}, "LLM_PROVIDER is none"),
        ({**OPENAI, "llm_base_url": "ftp://x"}, "LLM_BASE_URL"),
        ({**OPENAI, "llm_provider": "vllm"}, "LLM_PROVIDER"),
        ({**OPENAI, "llm_max_concurrency": 0}, "LLM_MAX_CONCURRENCY"),
        ({**OPENAI, "llm_serve_method": "a.b"}, "LLM_SERVE_METHOD"),
    ],
)
def test_bad_llm_settings_fail_fast(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(**values)


def test_the_api_key_is_never_in_an_error_message() -> None:
    secret = "sk-do-not-show-0123456789"
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(
            llm_provider="serve", llm_model="m", llm_serve_app="llm", llm_api_key=secret
        )
    assert secret not in str(caught.value) and secret not in repr(caught.value.to_dict())
    settings = Settings.from_env(**OPENAI, llm_api_key=secret)
    assert secret not in repr(settings) and secret not in str(settings.model_dump())


class _EchoingEndpoint(ThreadingHTTPServer):
    """A chat endpoint that refuses every call and quotes the key it was sent, as some
    proxies do ("Received API Key = ..."): with ``Bearer`` on /401 paths, bare otherwise."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                sent = self.headers.get("authorization", "")
                refused = "refuse" in self.path
                quoted = sent if refused else sent.removeprefix("Bearer ")
                body = json.dumps({"error": {"message": f"Received API Key = {quoted}"}})
                self.send_response(401 if refused else 500)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


async def test_an_endpoint_quoting_the_key_does_not_put_it_in_an_error() -> None:
    # The error's text is a job's last_error, its audit row and a log line.
    secret = "llm-key-" + "7f3a9c1e5b2d"
    server = _EchoingEndpoint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path, error in (("/refuse/v1", LLMRequestRefused), ("/v1", LLMUnavailable)):
            door = OpenAITransport(root + path, api_key=SecretStr(secret), max_retries=0)
            with pytest.raises(error) as caught:
                await door.complete({"model": "m", "messages": []})
            await door.aclose()
            assert "Received API Key = " in caught.value.message
            assert secret not in caught.value.message and secret not in str(caught.value)
            assert secret not in describe_error(caught.value)
            assert secret not in repr(pickle.loads(pickle.dumps(caught.value)).to_dict())
    finally:
        server.shutdown()
        server.server_close()
    # An endpoint that cannot be reached: its URL's password is not in the message.
    door = OpenAITransport("http://bot:url-pass-91b2@127.0.0.1:9/v1", max_retries=0)
    with pytest.raises(LLMUnavailable) as caught:
        await door.complete({"model": "m", "messages": []})
    await door.aclose()
    assert "http://bot:[redacted]@127.0.0.1:9/v1" in caught.value.message
    assert "url-pass-91b2" not in str(caught.value)


def test_the_settings_build_the_openai_door() -> None:
    model = memory_model_from_settings(
        Settings.from_env(**OPENAI, llm_max_concurrency=3, llm_structured_output="JSON_OBJECT")
    )
    assert isinstance(model, LLMMemoryModel) and model.name == "m"
    assert isinstance(model.client.transport, OpenAITransport)
    assert model.client.max_concurrency == 3 and model.structured_output == "json_object"


def test_the_serve_door_needs_the_handle_transport() -> None:
    settings = Settings.from_env(llm_provider="serve", llm_model="m", llm_serve_app="llm")
    with pytest.raises(ConfigurationError, match="serve_memory_model"):
        memory_model_from_settings(settings)


def test_a_refusal_pickles_with_its_status() -> None:
    """Errors cross Ray actors."""
    again = pickle.loads(pickle.dumps(LLMRequestRefused("no such model", status=404)))
    assert isinstance(again, LLMUnavailable) and again.status == 404
    assert again.to_dict()["code"] == "llm_request_refused"


# --- response and answer parsing -----------------------------------------------------------


def _response(content: Any, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"content": content}, "finish_reason": "stop"}], **extra}


def test_parse_response_reads_text_and_usage() -> None:
    parsed = parse_response(_response("hi", usage={"prompt_tokens": 5, "completion_tokens": 2}))
    assert parsed.content == "hi" and parsed.usage.prompt_tokens == 5
    assert parse_response(_response("hi")).usage.completion_tokens == 0
    for broken in ({}, {"choices": []}, _response(None), {"choices": [{"message": {}}]}):
        with pytest.raises(LLMOutputInvalid):
            parse_response(broken)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Sure! Here it is: {"a": [1, 2]} Hope it helps.', {"a": [1, 2]}),
        ('[1] first, then {"facts": ["x", "y"]}', {"facts": ["x", "y"]}),
        ('["x"]', ["x"]),
    ],
)
def test_json_is_found_leniently(text: str, value: Any) -> None:
    assert parse_json(text) == value


@pytest.mark.parametrize("text", ["", "no json here", '{"a": 1', "```\nnot json\n```"])
def test_text_without_json_is_refused(text: str) -> None:
    with pytest.raises(LLMOutputInvalid):
        parse_json(text)


def test_facts_take_strings_or_objects_and_drop_repeats() -> None:
    facts = facts_from_answer(
        {
            "facts": [
                "Ada likes tea.",
                {"statement": "ada likes  tea", "kind": "ephemeral"},
                "Ada is 30.",
            ]
        }
    )
    assert [f.statement for f in facts] == ["Ada likes tea.", "Ada is 30."]
    assert facts_from_answer(["x"]) == [FactCandidate(statement="x")]
    assert len(facts_from_answer([f"fact {i}" for i in range(30)])) == 20


@pytest.mark.parametrize(
    "answer",
    [
        {"facts": [{"statement": "x", "confidence": 7}]},
        {"facts": [{"statement": "x", "kind": "forever"}]},
        {"facts": [{"statement": "x", "source": "me"}]},
        {"facts": ["   "]},
        # What no stored fact may say (kodus-ai/kodus-ai#1683: LLM answers carry U+0000): they
        # passed here and broke the job that stored them with a bare ValidationError.
        {"facts": ["Ada\u0000 likes tea"]},
        {"facts": [{"statement": "\u200b\u200b"}]},
        {"facts": ["\u3164"]},
        {"facts": [3]},
        {"facts": "x"},
        {"facts": [], "more": []},
        "x",
    ],
)
def test_invalid_facts_are_refused(answer: Any) -> None:
    with pytest.raises(LLMOutputInvalid):
        facts_from_answer(answer)


def test_text_within_strips_labels_and_fences() -> None:
    assert text_within("```\nSummary: Ada met Bo.\n```", 10) == "Ada met Bo."
    assert text_within("one two three four", 2) == "one two"
    with pytest.raises(LLMOutputInvalid):
        text_within("  \n ", 10)


# --- structured output fallback -------------------------------------------------------------


class RefusingFirst:
    """Refuses requests carrying a response_format of ``refused`` (as a server without that
    mode does), answers the others with a recorded response."""

    def __init__(self, refused: set[str], response: dict[str, Any], *, status: int = 400):
        self.refused, self.response, self.status = refused, response, status
        self.bodies: list[dict[str, Any]] = []

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        mode = body.get("response_format", {}).get("type", "none")
        if mode in self.refused:
            raise LLMRequestRefused(f"{mode} is not supported", status=self.status)
        return self.response


def _recorded_consolidation() -> tuple[dict[str, Any], FactCandidate, list[Neighbour]]:
    record = recording("consolidate_related")
    fact = FactCandidate.model_validate(record["inputs"]["fact"])
    shown = [Neighbour.model_validate(n) for n in record["inputs"]["neighbours"]]
    return record["exchanges"][0]["response"], fact, shown


async def test_a_refused_json_schema_falls_back_to_json_object_and_stays_there() -> None:
    response, fact, shown = _recorded_consolidation()
    transport = RefusingFirst({"json_schema"}, response)
    model = LLMMemoryModel(LLMClient(transport, model="m"))
    decision = await model.consolidate(fact, shown)
    assert decision.target is None or decision.target in {n.id for n in shown}
    first, second = transport.bodies
    assert first["response_format"]["type"] == "json_schema"
    assert second["response_format"] == {"type": "json_object"}
    assert '"anyOf"' in second["messages"][-1]["content"]  # the schema went into the prompt
    assert model.structured_output == "json_object"
    await model.consolidate(fact, shown)
    assert transport.bodies[2]["response_format"] == {"type": "json_object"}


async def test_without_any_response_format_the_prompt_carries_the_schema() -> None:
    response, fact, shown = _recorded_consolidation()
    transport = RefusingFirst({"json_schema", "json_object"}, response)
    model = LLMMemoryModel(LLMClient(transport, model="m"))
    await model.consolidate(fact, shown)
    assert "response_format" not in transport.bodies[-1]
    assert model.structured_output == "none"


async def test_other_refusals_are_not_retried_in_another_mode() -> None:
    response, fact, shown = _recorded_consolidation()
    transport = RefusingFirst({"json_schema", "json_object", "none"}, response, status=404)
    model = LLMMemoryModel(LLMClient(transport, model="m"))
    with pytest.raises(LLMRequestRefused) as caught:
        await model.consolidate(fact, shown)
    assert caught.value.status == 404 and len(transport.bodies) == 1
    assert model.structured_output == "json_schema"


def test_an_error_body_raises_its_typed_error() -> None:
    raise_for_error_body(_response("fine"))
    with pytest.raises(LLMRequestRefused) as refused:
        raise_for_error_body({"error": {"message": "no model x", "code": 404}})
    assert refused.value.status == 404 and "no model x" in refused.value.message
    with pytest.raises(LLMUnavailable) as failed:
        raise_for_error_body({"error": {"message": "busy", "code": 503}})
    assert not isinstance(failed.value, LLMRequestRefused)


# --- concurrency and accounting -------------------------------------------------------------


class Gate:
    """Holds every call until released; counts the calls in flight."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.in_flight = self.peak = 0
        self.release = asyncio.Event()

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1
        return self.response


async def test_the_concurrency_limit_holds_calls_back() -> None:
    response = recording("summarize_conv26_session1")["exchanges"][0]["response"]
    gate = Gate(response)
    client = LLMClient(gate, model="m", max_concurrency=2)
    calls = [asyncio.create_task(client.chat({"messages": []})) for _ in range(5)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert gate.in_flight == 2
    gate.release.set()
    await asyncio.gather(*calls)
    assert gate.peak == 2
    (row,) = client.metrics.snapshot()["models"]
    assert row["calls"] == 5
    assert row["prompt_tokens"] == 5 * response["usage"]["prompt_tokens"]


async def test_an_unavailable_call_is_counted_and_observers_see_every_call() -> None:
    class Down:
        async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
            raise LLMUnavailable("down")

    seen: list[str] = []

    def broken_observer(call: Any) -> None:
        raise RuntimeError("an exporter bug")

    metrics = LLMMetrics(observers=[lambda call: seen.append(call.outcome), broken_observer])
    model = LLMMemoryModel(LLMClient(Down(), model="m", metrics=metrics))
    with pytest.raises(LLMUnavailable):
        await model.summarize([DatedText(text="a: hi")], max_words=10)
    assert seen == ["unavailable"]
    assert metrics.snapshot()["models"][0]["unavailable"] == 1


async def test_nothing_to_extract_asks_nothing() -> None:
    class Never:
        async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
            raise AssertionError("called")

    model = LLMMemoryModel(LLMClient(Never(), model="m"))
    assert await model.extract_facts([]) == []
    with pytest.raises(ValueError):
        await model.summarize([DatedText(text="x")], max_words=0)
