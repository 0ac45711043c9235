"""Schemathesis hooks for ``scripts/fuzz_http.py`` (loaded through SCHEMATHESIS_HOOKS).

The import route takes an export file (``application/x-ndjson``), a media type schemathesis
has no serializer for: the generated body (a string, per the schema) goes on the wire as its
UTF-8 bytes, so the import's validation is fuzzed too.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode("utf-8") + b"\n"
