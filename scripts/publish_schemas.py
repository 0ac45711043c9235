"""Write the published API schemas: docs/openapi.json (REST) and docs/schema.graphql (GraphQL).

Run from the repository root after changing a route or a GraphQL type::

    .venv/bin/python scripts/publish_schemas.py

``tests/unit/test_published_schemas.py`` fails while either file differs from what the code
serves.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def openapi_text() -> str:
    from halldyll_ray.serve.ingress import api

    return json.dumps(api.openapi(), indent=2, sort_keys=True) + "\n"


def graphql_text() -> str:
    from halldyll_ray.serve.graphql_api import schema

    return str(schema) + "\n"


def main() -> int:
    (DOCS / "openapi.json").write_text(openapi_text())
    (DOCS / "schema.graphql").write_text(graphql_text())
    print(f"wrote {DOCS / 'openapi.json'} and {DOCS / 'schema.graphql'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
