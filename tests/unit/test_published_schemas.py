"""The published schemas (docs/openapi.json, docs/schema.graphql) are the served ones, and
the GraphQL limits hold."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from halldyll_ray.serve.graphql_api import MAX_ALIASES, MAX_DEPTH, schema

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from publish_schemas import graphql_text, openapi_text  # noqa: E402


@pytest.mark.parametrize(
    ("name", "served"), [("schema.graphql", graphql_text), ("openapi.json", openapi_text)]
)
def test_the_published_schemas_are_current(name: str, served: Callable[[], str]) -> None:
    published = (ROOT / "docs" / name).read_text()
    assert published == served(), f"docs/{name} is stale: run scripts/publish_schemas.py"


def test_every_operation_has_a_description() -> None:
    for root in (schema.query, schema.mutation, schema.subscription):
        for field in root.__strawberry_definition__.fields:  # type: ignore[union-attr]
            assert field.description, field.name


async def test_deep_wide_and_long_documents_are_refused_before_any_resolver_runs() -> None:
    # No context: a resolver that ran would fail on it; these fail validation first.
    deep = "{ memories { items " + "{ covers " * MAX_DEPTH + "{ id }" + " }" * MAX_DEPTH + " } }"
    wide = "{ " + " ".join(f"a{n}: me {{ id }}" for n in range(MAX_ALIASES + 1)) + " }"
    long = "{ me { " + "id " * 3000 + "} }"
    for document, words in (
        (deep, "exceeds maximum operation depth"),
        (wide, "aliases"),
        (long, "token"),
    ):
        result = await schema.execute(document)
        assert result.errors, document[:60]
        assert words in result.errors[0].message.lower(), result.errors[0].message


async def test_a_query_within_the_limits_passes_validation() -> None:
    ok = "{ memories { items " + "{ covers " * (MAX_DEPTH - 3) + "{ id }" + " }" * (MAX_DEPTH - 3)
    ok += " } }"
    result = await schema.execute(ok)
    # It reaches a resolver (which needs a request's context, absent here): not a limit error
    # but the resolver's failure, which the client sees masked.
    assert result.errors and result.errors[0].message == "internal error"
    assert result.errors[0].path == ["memories"]
