"""Every MCP tool argument with a REST counterpart advertises the bounds REST enforces, from
the same source (halldyll_ray.mcp_server.REST_ARGUMENTS): a value at a bound is taken by the
tool and by REST, one past it refused by both. The tools advertised only lower bounds for an
image's width, height and steps, which REST capped."""

from __future__ import annotations

import functools
from typing import Annotated, Any
from uuid import uuid4

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from halldyll_ray.mcp_server import REST_ARGUMENTS, build_mcp_server

BOUNDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
)
COUNTS = ("minItems", "maxItems")


def _flat(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's schema less its ``null`` alternative."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(options) == 1, schema
    return options[0]


def _bounds(schema: dict[str, Any], keys: tuple[str, ...] = BOUNDS) -> dict[str, Any]:
    return {key: schema[key] for key in keys if key in schema}


def _cases() -> list[tuple[str, str, type[BaseModel], str]]:
    return [
        (tool, argument, model, field)
        for tool, arguments in REST_ARGUMENTS.items()
        for argument, (model, field) in arguments.items()
    ]


@functools.cache
def _tools() -> dict[str, Any]:
    server = build_mcp_server(None)  # type: ignore[arg-type]  # no call is made
    return {tool.name: tool for tool in server._tool_manager.list_tools()}


def test_the_image_tool_advertises_restss_upper_bounds() -> None:
    properties = _tools()["store_image"].parameters["properties"]
    for name, maximum in (("width", 32_768), ("height", 32_768), ("steps", 10_000)):
        assert _flat(properties[name])["maximum"] == maximum


@pytest.mark.parametrize(("tool", "argument", "model", "field"), _cases())
def test_an_argument_advertises_the_bounds_rest_enforces(
    tool: str, argument: str, model: type[BaseModel], field: str
) -> None:
    advertised = _flat(_tools()[tool].parameters["properties"][argument])
    rest_schema = model.model_json_schema(mode="validation")
    enforced = _flat(rest_schema["properties"][field])
    is_objects = advertised.get("type") == "array" and "$ref" in str(enforced.get("items", {}))
    keys = COUNTS if is_objects else BOUNDS
    assert _bounds(advertised, keys) == _bounds(enforced, keys), (tool, argument)


def _value(schema: dict[str, Any], key: str, past: bool) -> Any:
    bound = schema[key]
    step = (1 if past else 0) * (1 if key.startswith("max") else -1)
    if key in ("minimum", "maximum"):
        if schema["type"] == "integer":
            return bound + step
        return bound + step * 0.5
    size = bound + step
    if key in ("minLength", "maxLength"):
        return "a" * size
    return None  # counts: built by the caller


def _items(schema: dict[str, Any], size: int) -> list[Any]:
    if schema["items"].get("format") == "uuid":
        return [str(uuid4()) for _ in range(size)]
    return [f"tag{i}" for i in range(size)]


@pytest.mark.parametrize(("tool", "argument", "model", "field"), _cases())
def test_a_bound_is_taken_and_one_past_it_refused_by_both(
    tool: str, argument: str, model: type[BaseModel], field: str
) -> None:
    arguments = _tools()[tool].fn_metadata.arg_model
    schema = _flat(arguments.model_json_schema()["properties"][argument])
    info = model.model_fields[field]
    rest: TypeAdapter[Any] = TypeAdapter(
        Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    )
    required = {
        name: "a"
        for name, spec in arguments.model_json_schema()["properties"].items()
        if name in arguments.model_json_schema().get("required", []) and name != argument
    }
    if "session_id" in required:
        required["session_id"] = "s-1"
    if "messages" in required:
        required["messages"] = [{"role": "user", "content": "hi"}]
    checked = 0
    for key in ("minimum", "maximum", "minLength", "maxLength", "maxItems"):
        if key not in schema:
            continue
        if key == "maxItems":
            if schema.get("items", {}).get("type") != "string":
                continue  # a list of objects: its counts are compared above
            at, past = _items(schema, schema[key]), _items(schema, schema[key] + 1)
        else:
            at, past = _value(schema, key, False), _value(schema, key, True)
        arguments.model_validate({**required, argument: at})
        rest.validate_python(at)
        with pytest.raises(ValidationError):
            arguments.model_validate({**required, argument: past})
        with pytest.raises(ValidationError):
            rest.validate_python(past)
        checked += 1
    if any(key in schema for key in ("minimum", "maximum", "minLength", "maxLength")):
        assert checked, (tool, argument)


#: Arguments that are a REST route's query parameter, not a body's field.
QUERY_ARGUMENTS = {
    ("list_memories", "limit"): ("/v1/users/{user_id}/memories", "limit"),
    ("list_jobs", "limit"): ("/v1/users/{user_id}/jobs", "limit"),
}


@pytest.mark.parametrize(("tool", "argument"), sorted(QUERY_ARGUMENTS))
def test_a_query_argument_advertises_the_routes_bounds(tool: str, argument: str) -> None:
    from halldyll_ray.serve.ingress import api

    path, name = QUERY_ARGUMENTS[tool, argument]
    (parameter,) = [
        p for p in api.openapi()["paths"][path]["get"]["parameters"] if p["name"] == name
    ]
    advertised = _flat(_tools()[tool].parameters["properties"][argument])
    assert _bounds(advertised) == _bounds(parameter["schema"]), (tool, argument)


def test_every_bounded_argument_has_its_rest_counterpart() -> None:
    """An argument with a bound of its own comes from REST_ARGUMENTS or is a query
    parameter checked above: none states a bound by hand that REST does not."""
    for name, tool in _tools().items():
        for argument, spec in tool.parameters["properties"].items():
            if _bounds(_flat(spec)):
                assert (
                    argument in REST_ARGUMENTS.get(name, {}) or (name, argument) in QUERY_ARGUMENTS
                ), (name, argument)


def test_every_number_or_flag_argument_is_strict_as_rest_bodies_are() -> None:
    """list_memories and list_jobs took ``limit: true`` as 1, ``"10"`` and ``10.0`` as 10 and
    ``include_shared: "yes"`` as true (pydantic's lax mode), where REST, Python and GraphQL
    refuse them: every tool's integer, number and boolean argument takes only its JSON type."""
    lax = []
    for name, tool in _tools().items():
        model = tool.fn_metadata.arg_model
        for argument, schema in tool.parameters["properties"].items():
            kind = _flat(schema).get("type")
            wrong: tuple[Any, ...] = {
                "integer": ("1", True, 1.0),
                "number": ("1", True),
                "boolean": ("true", 1),
            }.get(kind, ())
            for value in wrong:
                try:
                    model.model_validate({argument: value})
                except ValidationError as exc:
                    if any(tuple(e["loc"]) == (argument,) for e in exc.errors()):
                        continue
                lax.append((name, argument, value))
    assert lax == []
