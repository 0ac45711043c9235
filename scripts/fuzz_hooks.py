"""Schemathesis hooks for ``scripts/fuzz_http.py`` (loaded through SCHEMATHESIS_HOOKS).

The import route takes an export file (``application/x-ndjson``), a media type schemathesis
has no serializer for: the generated body (a string, per the schema) goes on the wire as its
UTF-8 bytes, so the import's validation is fuzzed too.

GraphQL (``fuzz_http.py --graphql``):

- the ``JSON`` scalar (a memory, a list of memories or messages, a PATCH) has no strategy in
  schemathesis: it gets memory- and message-shaped objects, lists of them, and any JSON;
- schemathesis tells a client's error from a server's by Apollo's codes (``BAD_USER_INPUT``)
  and otherwise takes every error at a resolver's ``path`` for a server error: a refused id
  or an unknown model would be one. The API's errors carry REST's ``code`` and
  ``status_code`` in ``extensions``; :func:`graphql_refusals_are_client_errors` judges by
  those instead (a 5xx, ``internal_error``, or a resolver's error with no status fails), and
  the script turns schemathesis's own ``not_a_server_error`` off for GraphQL.
"""

from __future__ import annotations

import json
from typing import Any

import graphql
import schemathesis
from hypothesis import strategies as st


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode("utf-8") + b"\n"


# ------------------------------------------------------------------ GraphQL's JSON scalar
def _node(value: Any) -> graphql.ValueNode:
    """A JSON value as a GraphQL literal."""
    if value is None:
        return graphql.NullValueNode()
    if isinstance(value, bool):
        return graphql.BooleanValueNode(value=value)
    if isinstance(value, int):
        return graphql.IntValueNode(value=str(value))
    if isinstance(value, float):
        return graphql.FloatValueNode(value=repr(value))
    if isinstance(value, str):
        return graphql.StringValueNode(value=value)
    if isinstance(value, list):
        return graphql.ListValueNode(values=tuple(_node(v) for v in value))
    return graphql.ObjectValueNode(
        fields=tuple(
            graphql.ObjectFieldNode(name=graphql.NameNode(value=k), value=_node(v))
            for k, v in value.items()
        )
    )


_text = st.text(max_size=40)
_names = st.from_regex(r"[_A-Za-z][_0-9A-Za-z]{0,11}", fullmatch=True)
_any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "robot"]), "content": _text},
    optional={
        "name": _text,
        "created_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    },
)
_memory = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["fact", "conversation", "summary", "image", "transcription", "other"]
        )
    },
    optional={
        "statement": _text,
        "text": _text,
        "title": _text,
        "messages": st.lists(_message, max_size=3),
        "tags": st.lists(_text, max_size=3),
        "importance": st.floats(allow_nan=False),
        "session_id": _text,
        "covers": st.lists(st.uuids().map(str), max_size=3),
        "metadata": _any_json,
    },
)
schemathesis.graphql.scalar(
    "JSON",
    st.one_of(
        _memory, st.lists(_memory, max_size=3), st.lists(_message, max_size=3), _any_json
    ).map(_node),
)


# ------------------------------------------------------------------ GraphQL's errors
@schemathesis.check
def graphql_refusals_are_client_errors(ctx: Any, response: Any, case: Any) -> None:
    """A GraphQL answer is no server error: not a 5xx, and each error a refusal with its
    REST status under 500 (a document's own error, with no ``path``, needs none)."""
    if not str(getattr(response.request, "url", "")).rstrip("/").endswith("/graphql"):
        return
    if response.status_code >= 500:
        raise AssertionError(f"a server error: {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        return  # the response checks judge the body
    errors = body.get("errors") if isinstance(body, dict) else None
    for error in errors or []:
        extensions = error.get("extensions") or {}
        status = extensions.get("status_code")
        if extensions.get("code") == "internal_error" or (
            isinstance(status, int) and status >= 500
        ):
            raise AssertionError(f"a server error: {error}")
        if error.get("path") and not isinstance(status, int):
            raise AssertionError(f"an error with no status: {error}")
