"""validation.first_error: how a request's first validation error reads (HTTP 422 and MCP)."""

from __future__ import annotations

from typing import Any

import pytest

from halldyll_ray.validation import first_error


@pytest.mark.parametrize(
    ("error", "message", "field"),
    [
        (
            {
                "type": "missing",
                "loc": ("body", "memories", 3, "statement"),
                "msg": "Field required",
            },
            "memories.3.statement: Field required",
            "memories.3.statement",
        ),
        (
            {"type": "missing", "loc": ("body",), "msg": "Field required"},
            "body: Field required",
            "body",
        ),
        (
            {
                "type": "json_invalid",
                "loc": ("body", 12),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            },
            "body: not valid JSON: Expecting value at character 12",
            "body",
        ),
        (
            {"type": "int_parsing", "loc": ("limit",), "msg": "Input should be a valid integer"},
            "limit: Input should be a valid integer",
            "limit",
        ),
    ],
)
def test_the_first_error_names_its_field(error: dict[str, Any], message: str, field: str) -> None:
    second = {"type": "missing", "loc": ("body", "other"), "msg": "Field required"}
    found = first_error([error, second], skip=("body",))
    assert (found.message, found.field) == (message, field)


def test_a_query_parameter_is_named_as_the_engine_names_it() -> None:
    """GET ...?limit=0 said "query.limit" where the engine, MCP and a body say "limit"; a body
    field called "query" (a search's) is still "query", not the body as a whole."""
    in_query = {"type": "greater_than_equal", "loc": ("query", "limit"), "msg": "too small"}
    assert first_error([in_query], skip=("body", "query")).field == "limit"
    in_body = {"type": "string_too_long", "loc": ("body", "query"), "msg": "too long"}
    assert first_error([in_body], skip=("body", "query")).field == "query"
    whole = {"type": "missing", "loc": ("body",), "msg": "Field required"}
    assert first_error([whole], skip=("body", "query")).field == "body"


def test_the_rejected_value_is_never_repeated() -> None:
    error = {"type": "int_parsing", "loc": ("limit",), "msg": "bad", "input": "hr_secret_value"}
    found = first_error([error])
    assert "hr_secret" not in found.message and found.field == "limit"


def test_no_error_at_all_still_reads() -> None:
    found = first_error([])
    assert found.message == "invalid request" and found.field is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "fact", "statement": "a\x00b"}, "fact.statement"),  # a model-level check
        (
            {"type": "conversation", "messages": [{"role": "user", "content": "x\x00"}]},
            "conversation.messages.0.content",
        ),
        ({"type": "fact", "statement": "x", "metadata": {"k": "\ud800"}}, "fact.metadata"),
        ({"statement": "no type"}, "type"),
        ({"type": "recipe", "statement": "x"}, "type"),
    ],
)
def test_the_python_and_the_http_mapping_name_the_same_field(
    body: dict[str, Any], field: str
) -> None:
    """A NUL in a fact's statement read ``fact`` over HTTP and ``fact.statement`` in Python,
    a missing type tag ``body`` and ``type``: the two mappings of pydantic's errors named
    fields apart."""
    from pydantic import BaseModel, ValidationError

    from halldyll_ray.components.memories import MEMORY
    from halldyll_ray.errors import InvalidInput
    from halldyll_ray.models import Memory
    from halldyll_ray.validation import validate

    class Request(BaseModel):  # a request body holding a memory, as the HTTP API's
        memory: Memory

    with pytest.raises(InvalidInput) as in_python:
        validate(MEMORY, body, "memory")
    with pytest.raises(ValidationError) as in_request:
        Request.model_validate({"memory": body})
    as_http = [{**e, "loc": ("body", *e["loc"])} for e in in_request.value.errors()]
    assert in_python.value.field == field
    assert first_error(as_http, skip=("body",)).field == f"memory.{field}"
    assert first_error(in_request.value.errors()).field == f"memory.{field}"  # MCP's form
