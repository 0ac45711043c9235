"""Named SQL queries, one ``.sql`` file per component, loaded once.

Each file holds blocks headed ``-- name: x``. A query takes its parameters either by
position (``$1``, ``$2``, ... for queries of at most three) or by name (``:user_id``), never
both; the loader rewrites names to ``$n`` once, so asyncpg still prepares plain SQL and
nothing is ever formatted into the text. ``::type`` casts are not parameters.

Use :func:`q` for positional queries and :func:`bind` (or :meth:`Query.args` for
``executemany``) for named ones; a missing or unknown name is a ``TypeError`` at the call,
so two swapped arguments of one type cannot pass silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_POSITIONAL = re.compile(r"\$\d+")


@dataclass(frozen=True)
class Query:
    """One named query: its SQL with ``$n`` placeholders and the parameter names in order."""

    name: str
    sql: str
    params: tuple[str, ...] = ()

    def args(self, /, **values: Any) -> tuple[Any, ...]:
        """The arguments in placeholder order; TypeError on a missing or unknown name."""
        if values.keys() != set(self.params):
            missing = sorted(set(self.params) - values.keys())
            unknown = sorted(values.keys() - set(self.params))
            raise TypeError(f"query {self.name}: missing {missing}, unknown {unknown}")
        return tuple(values[name] for name in self.params)


def _compile(name: str, body: str) -> Query:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    sql = _NAMED.sub(number, body)
    if names and _POSITIONAL.search(body):
        raise ValueError(f"query {name} mixes $n and :name parameters")
    return Query(name, sql, tuple(names))


def parse_queries(text: str) -> dict[str, Query]:
    """Split a file of ``-- name: x`` blocks into {name: Query}; refuse duplicates."""
    parts = _HEADER.split(text)
    queries: dict[str, Query] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name} is defined twice")
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = _compile(name, "\n".join(lines).strip().rstrip(";"))
    return queries


@cache
def queries() -> dict[str, Query]:
    """Every query of every ``.sql`` file in this package; a name used twice is an error."""
    found: dict[str, Query] = {}
    files = sorted(
        (f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    for file in files:
        for name, query in parse_queries(file.read_text(encoding="utf-8")).items():
            if name in found:
                raise ValueError(f"query {name} is defined twice ({file.name})")
            found[name] = query
    return found


def query(name: str) -> Query:
    return queries()[name]


def q(name: str) -> str:
    """The SQL of a query that takes its parameters by position."""
    found = queries()[name]
    if found.params:
        raise TypeError(f"query {name} takes named parameters: use bind()")
    return found.sql


def bind(name: str, /, **values: Any) -> tuple[Any, ...]:
    """``(sql, *args)`` of a query with named parameters, for ``conn.fetch(*bind(...))``."""
    found = queries()[name]
    return (found.sql, *found.args(**values))
