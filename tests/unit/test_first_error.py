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


def test_the_rejected_value_is_never_repeated() -> None:
    error = {"type": "int_parsing", "loc": ("limit",), "msg": "bad", "input": "hr_secret_value"}
    found = first_error([error])
    assert "hr_secret" not in found.message and found.field == "limit"


def test_no_error_at_all_still_reads() -> None:
    found = first_error([])
    assert found.message == "invalid request" and found.field is None
