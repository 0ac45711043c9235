"""GraphQL requests the spec refuses are refused before anything runs, and the log says what
a client got wrong in one line, keeping tracebacks for the server's own failures.

The GraphQL app runs in process over a stand-in for the REST API it calls (the Loopback's
target): the stand-in counts the calls, so a resolver that ran shows."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

from halldyll_ray.serve.graphql_api import GraphQLContext, _GraphQL, schema
from halldyll_ray.serve.loopback import Loopback

AUTH = {"authorization": "Bearer hk_test"}


def _rest(calls: list[str]) -> FastAPI:
    """What the resolvers call: ``GET /v1/me`` refuses (403), a delete is counted."""
    app = FastAPI()

    @app.get("/v1/me")
    async def me(request: Request) -> JSONResponse:
        calls.append("me")
        error = {"code": "permission_denied", "message": "not you", "request_id": "r-1"}
        return JSONResponse({"error": error}, status_code=403)

    @app.delete("/v1/users/me/memories/{memory_id}")
    async def delete(memory_id: str) -> JSONResponse:
        calls.append(f"delete {memory_id}")
        return JSONResponse({"id": memory_id})

    return app


@pytest_asyncio.fixture
async def graphql(calls: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_GraphQL(Loopback(_rest(calls))))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
def calls() -> list[str]:
    return []


async def test_several_operations_without_an_operation_name_run_none(
    graphql: httpx.AsyncClient, calls: list[str]
) -> None:
    document = 'mutation Forget { deleteMemory(id: "m-1") } query Who { me { id } }'
    answer = await graphql.post("/graphql", json={"query": document}, headers=AUTH)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_input" and "operationName" in error["message"]
    # A name that no operation has: refused too.
    named = {"query": document, "operationName": "Remember"}
    answer = await graphql.post("/graphql", json=named, headers=AUTH)
    assert answer.status_code == 400 and "Remember" in answer.json()["error"]["message"]
    assert calls == []  # the mutation never ran
    # Named, the operation runs.
    named = {"query": document, "operationName": "Forget"}
    answer = await graphql.post("/graphql", json=named, headers=AUTH)
    assert answer.json() == {"data": {"deleteMemory": True}}
    assert calls == ["delete m-1"]


async def test_a_subscription_over_post_is_told_to_use_the_websocket(
    graphql: httpx.AsyncClient, calls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    document = "subscription { memoryEvents { ... on MemoryEvent { id } } }"
    answer = await graphql.post("/graphql", json={"query": document}, headers=AUTH)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_input" and "WebSocket" in error["message"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_refused_call_logs_one_line_and_a_crash_its_traceback(
    calls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    scope = {"type": "http", "headers": [(b"authorization", AUTH["authorization"].encode())]}
    context = GraphQLContext(Loopback(_rest(calls)), Request(scope))
    refused = await schema.execute("{ me { id } }", context_value=context)
    assert refused.errors and refused.errors[0].extensions["code"] == "permission_denied"
    assert calls == ["me"]
    logged = [r for r in caplog.records if r.name.startswith(("strawberry", "halldyll_ray"))]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].levelno == logging.INFO and logged[0].exc_info is None
    assert "\n" not in logged[0].getMessage() and "not you" in logged[0].getMessage()

    # A resolver that fails unexpectedly (no context to call with): ERROR, with the traceback.
    caplog.clear()
    crashed = await schema.execute("{ me { id } }")
    assert crashed.errors
    logged = [r for r in caplog.records if r.name.startswith(("strawberry", "halldyll_ray"))]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert logged[0].exc_info and isinstance(logged[0].exc_info[1], AttributeError)
    # The client is told no more than REST's 500 tells: the message named internals.
    assert [(e.message, e.extensions) for e in crashed.errors] == [
        ("internal error", {"code": "internal_error", "status_code": 500})
    ]
    assert "NoneType" not in str(crashed.errors) and "NoneType" in logged[0].getMessage()

    # A document the schema refuses: one line, no traceback.
    caplog.clear()
    invalid = await schema.execute("{ me { nonsense } }", context_value=context)
    assert invalid.errors
    logged = [r for r in caplog.records if r.name.startswith(("strawberry", "halldyll_ray"))]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert logged[0].exc_info is None and "\n" not in logged[0].getMessage()


async def test_over_a_websocket_the_same_refusals_are_error_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a WebSocket's handlers call: the refusals come back as the operation's errors.
    caplog.set_level(logging.INFO)
    for document, operation_name, words in (
        ("subscription A { memoryEvents { __typename } } query B { __typename }", None, "2"),
        ("subscription A { memoryEvents { __typename } }", "C", '"C"'),
    ):
        results = await schema.stream(document, operation_name=operation_name)
        first = await anext(aiter(results))
        assert first.errors and words in first.errors[0].message, first.errors
    logged = [r for r in caplog.records if r.name.startswith(("strawberry", "halldyll_ray"))]
    assert len(logged) == 2 and all(r.levelno == logging.INFO for r in logged)
    assert not [r for r in logged if r.exc_info]


def _fragment_bomb(levels: int) -> str:
    """A document of a few hundred tokens whose fragments, written out, select 2**levels
    fields: each fragment spreads the next one twice."""
    lines = ["query Q { me { id ...F0 } }"]
    lines += [f"fragment F{n} on User {{ id ...F{n + 1} ...F{n + 1} }}" for n in range(levels)]
    lines.append(f"fragment F{levels} on User {{ id }}")
    return "\n".join(lines)


async def test_fragments_that_multiply_are_refused_before_validation(
    graphql: httpx.AsyncClient, calls: list[str]
) -> None:
    """Fragments spreading fragments twice, 20 deep (196 tokens, one alias-free field each):
    the depth and alias limits walked all 2**20 spreads and held the event loop 12.8 s. The
    document is refused, by its size with its fragments written out, before validation and
    before any resolver runs."""
    from graphql import get_introspection_query

    started = time.perf_counter()
    answer = await graphql.post("/graphql", json={"query": _fragment_bomb(20)}, headers=AUTH)
    elapsed = time.perf_counter() - started
    errors = answer.json().get("errors")
    assert errors and [e["extensions"]["code"] for e in errors] == ["invalid_input"], answer.text
    assert "2000 fields" in errors[0]["message"]
    assert elapsed < 1.0, elapsed
    assert calls == []  # nothing ran
    # Fragments used as meant (the tools' introspection query: fragments spread many times
    # over) still pass, and so does a small bomb.
    introspection = await schema.execute(get_introspection_query())
    assert introspection.errors is None
    answer = await graphql.post("/graphql", json={"query": _fragment_bomb(4)}, headers=AUTH)
    assert answer.json()["errors"][0]["extensions"]["code"] == "permission_denied"
    assert calls == ["me"]


BIG = "Z" * 10_000


@pytest.mark.parametrize(
    "body",
    [
        {"query": "query { " + BIG + " }"},
        {"query": "query { me { " + BIG + " } }"},
        {"query": "query { memories(types: [" + BIG + "]) { items { id } } }"},
        {
            "query": 'query Q($m: SearchMode) { search(query: "x", mode: $m) { score } }',
            "variables": {"m": BIG},
        },
        {
            "query": 'query Q($m: SearchMode) { search(query: "x", mode: $m) { score } }',
            "variables": {"m": "Z " * 5_000},
        },
        {"query": "query A { me { id } } query B { me { id } }", "operationName": BIG},
    ],
)
async def test_a_huge_name_or_value_is_quoted_short(
    graphql: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """graphql-core's and strawberry's messages repeated a field, an enum value or an
    operation name whole; they quote its first 40 characters now."""
    answer = await graphql.post("/graphql", json=body, headers=AUTH)
    assert "Z" * 41 not in answer.text and "Z " * 600 not in answer.text
    assert len(answer.text) < 1500, answer.text[:300]
