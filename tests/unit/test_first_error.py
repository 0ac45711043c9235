"""validation.first_error: how a request's first validation error reads (HTTP 422 and MCP);
validation.json_loads: the JSON parser of what clients send."""

from __future__ import annotations

import json
from typing import Any

import pytest

from halldyll_ray.validation import first_error, json_loads


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
            # A raw control character in a string: Python's message ends in "at" itself
            # (json.loads('"\x00"').msg == "Invalid control character at"), which read
            # "... at at character 36" on the HTTP API.
            {
                "type": "json_invalid",
                "loc": ("body", 36),
                "msg": "JSON decode error",
                "ctx": {"error": "Invalid control character at"},
            },
            "body: not valid JSON: Invalid control character at character 36",
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


# ------------------------------------------------------------------ json_loads
@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('{"query": "x", "threshold": NaN}', "NaN"),
        ('{"statement": "NaN and Infinity", "confidence": Infinity}', "Infinity"),
        ('[1, "\\"NaN", -Infinity]', "-Infinity"),
        ('{"a": {"b": [0.5, NaN]}}', "NaN"),
    ],
)
def test_json_loads_refuses_the_constants_json_has_not_at_their_position(
    text: str, name: str
) -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        json_loads(text)
    assert caught.value.msg == f"{name} is not a JSON number (RFC 8259)"
    assert text[caught.value.pos :].startswith(name)
    with pytest.raises(json.JSONDecodeError):
        json_loads(text.encode())
    assert json.loads(text) is not None  # what the standard library's parser takes


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ('{"query": "x", "limit": 1e999}', "1e999"),
        ('{"statement": "1e999", "confidence": -1E+400}', "-1E+400"),
        ('{"metadata": {"w": [0.5, 1.5e308, 2e308]}}', "2e308"),
        ('{"importance": 1' + "0" * 400 + ".0}", "1" + "0" * 400 + ".0"),
    ],
)
def test_json_loads_refuses_a_number_too_large_for_a_float_at_its_position(
    text: str, literal: str
) -> None:
    """1e999 is a JSON number that Python's parser reads as inf: it went on as the Infinity
    refused above (a metadata value, a weight), named differently on every surface."""
    assert "inf" in str(json.loads(text))  # what the standard library's parser reads
    with pytest.raises(json.JSONDecodeError) as caught:
        json_loads(text)
    assert caught.value.msg.endswith("is too large a number (it reads as Infinity)")
    assert text[caught.value.pos :].startswith(literal)
    with pytest.raises(json.JSONDecodeError):
        json_loads(text.encode())


def test_json_loads_reads_json_as_the_standard_library_does() -> None:
    text = '{"s": "NaN Infinity -Infinity \\" NaN", "n": [1e308, -0.0, 12345678901234567890]}'
    assert json_loads(text) == json.loads(text) == json_loads(text.encode())
    with pytest.raises(json.JSONDecodeError):
        json_loads("{'a': 1}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_named_so_not_out_of_bounds(value: float) -> None:
    """A NaN passed to a bounded field (a handle or MCP argument: their JSON parsers take
    NaN) read "less than or equal to 1": NaN compares false with every bound."""
    from pydantic import TypeAdapter, ValidationError

    from halldyll_ray.models import Fact
    from halldyll_ray.schemas import SearchRequest

    with pytest.raises(ValidationError) as caught:
        TypeAdapter(SearchRequest).validate_python({"query": "x", "threshold": value})
    error = first_error(caught.value.errors())
    assert error.field == "threshold"
    assert error.message == "threshold: Input should be a finite number"
    # The same words as a field that refuses NaN itself.
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(Fact).validate_python({"statement": "x", "confidence": value})
    assert (
        first_error(caught.value.errors()).message == "confidence: Input should be a finite number"
    )


@pytest.mark.parametrize(
    ("text", "literal"),
    [
        ('{"importance": ' + "9" * 5000 + "}", "9" * 5000),
        ('{"s": "' + "1" * 5000 + '", "n": [0.5, -' + "2" * 4400 + "]}", "-" + "2" * 4400),
    ],
)
def test_json_loads_refuses_an_integer_longer_than_python_converts(text: str, literal: str) -> None:
    """An integer of more than 4,300 digits was a bare ValueError out of the standard
    library's parser (not a JSONDecodeError): a 500 where the callers expected only that."""
    with pytest.raises(ValueError) as plain:
        json.loads(text)
    assert not isinstance(plain.value, json.JSONDecodeError)
    with pytest.raises(json.JSONDecodeError) as caught:
        json_loads(text)
    digits = len(literal.lstrip("-"))
    assert caught.value.msg == f"an integer of {digits} digits is longer than any value here"
    assert text[caught.value.pos :].startswith(literal)
    assert json_loads('{"n": ' + "7" * 4300 + "}") == {"n": int("7" * 4300)}  # the limit


@pytest.mark.parametrize("depth", [2_000, 50_000])
def test_json_loads_refuses_nesting_deeper_than_it_recurses(depth: int) -> None:
    text = '{"a": [' + '{"b": ' * depth + "1" + "}" * depth + "]}"
    with pytest.raises(RecursionError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as caught:
        json_loads(text.encode())
    assert caught.value.msg == f"nested {depth + 2} levels deep, deeper than JSON is read here"
    assert caught.value.pos == text.rindex("{")  # the deepest object opens there
    shallow = "[" * 500 + "]" * 500
    assert json_loads(shallow) == json.loads(shallow)


@pytest.mark.parametrize(
    ("text", "key", "at"),
    [
        ('{"type": "fact", "statement": "a", "statement": "b"}', "statement", 35),
        ('{"metadata": {"a": 1, "a": 2}}', "a", 22),
        # The same key in two objects is no duplicate; the second object's own twice is.
        ('[{"a": 1}, {"a": {"b": 1, "b": 2}}]', "b", 26),
        ('{"\\u0061": 1, "a": 2}', "a", 14),  # one key, written two ways
    ],
)
def test_json_loads_refuses_a_key_given_twice_in_one_object_where_it_is(
    text: str, key: str, at: int
) -> None:
    # Python's parser kept the last value, others keep the first: a proxy that checked
    # "statement": "a" let "b" be stored. Every surface reads its JSON here (REST, GraphQL,
    # MCP, import lines).
    with pytest.raises(json.JSONDecodeError) as caught:
        json_loads(text)
    assert caught.value.msg.startswith(f"the key '{key}' is given twice in one object")
    assert caught.value.pos == at
    with pytest.raises(json.JSONDecodeError):
        json_loads(text.encode())
    assert json_loads('{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}') == {
        "a": {"a": 1},
        "b": [{"a": 1}, {"a": 2}],
    }
