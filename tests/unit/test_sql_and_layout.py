"""The named-query loader and the package's layout rules (no import cycle, one room each)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from halldyll_ray.storage.sql import bind, parse_queries, queries, query

PACKAGE = Path(__file__).resolve().parents[2] / "halldyll_ray"


def test_named_parameters_become_numbered_in_order_of_first_use() -> None:
    found = parse_queries("-- name: pick\nSELECT :b::text, :a, :b, x::int FROM t WHERE y = :a;\n")[
        "pick"
    ]
    assert found.sql == "SELECT $1::text, $2, $1, x::int FROM t WHERE y = $2"
    assert found.params == ("b", "a")
    assert found.args(a=1, b=2) == (2, 1)


def test_a_missing_or_unknown_name_is_refused_at_the_call() -> None:
    found = parse_queries("-- name: pick\nSELECT :a, :b;")["pick"]
    with pytest.raises(TypeError, match=r"missing \['b'\]"):
        found.args(a=1)
    with pytest.raises(TypeError, match=r"unknown \['c'\]"):
        found.args(a=1, b=2, c=3)


def test_a_query_cannot_mix_positional_and_named_parameters() -> None:
    with pytest.raises(ValueError, match="mixes"):
        parse_queries("-- name: bad\nSELECT $1, :a;")


def test_every_wide_query_takes_named_parameters() -> None:
    # STYLE 17: more than three parameters -> named, so arguments cannot be swapped silently.
    for name, found in queries().items():
        assert "$4" not in found.sql or found.params, f"{name} takes $4.. by position"


def test_bind_returns_sql_then_arguments() -> None:
    sql, *args = bind(
        "list_audit", user_id=None, operation="x", outcome=None, before_id=None, limit=5
    )
    assert sql == query("list_audit").sql and args == [None, "x", None, None, 5]


def test_the_reinforcement_formula_is_written_once() -> None:
    # The noisy-OR lives in migration 0004's SQL function; the queries only call it.
    for found in queries().values():
        assert "* 0.5" not in found.sql, found.name
    migrations = Path(__file__).resolve().parents[2] / "migrations"
    assert (
        "halldyll_reinforced_confidence"
        in (migrations / "0004_reinforced_confidence.sql").read_text()
    )


def _runtime_imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports when it runs (TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("halldyll_ray")
        ):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("halldyll_ray"))
    return found


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {
        name: {m for m in _runtime_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ re-exporting its submodules is not a cycle of logic.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_another_modules_private_name() -> None:
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("halldyll_ray"):
                offenders += [
                    f"{name} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert offenders == []


def test_the_core_never_imports_ray() -> None:
    for name, path in _modules().items():
        if name.startswith("halldyll_ray.serve") or name == "halldyll_ray.serve_env":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        } | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "ray" or m.startswith("ray.") for m in imported), name
