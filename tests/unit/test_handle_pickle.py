"""What crosses the app's own handle calls pickles with the standard library's pickle
(``serve.deployments.pickled``): every model a deployment method takes or returns, by name."""

from __future__ import annotations

import inspect
import pickle
import typing
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from halldyll_ray import errors
from halldyll_ray.engine import MemoryEngine  # noqa: F401 - imports the components
from halldyll_ray.serve.deployments import ContextBuilder, Embedder, Ingestor, Searcher


def _models(hint: Any) -> set[type[BaseModel]]:
    """The pydantic model classes in a type hint (unions, Annotated, containers)."""
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return {hint}
    found: set[type[BaseModel]] = set()
    for arg in typing.get_args(hint):
        found |= _models(arg)
    return found


def _handle_methods() -> list[tuple[str, Any]]:
    methods = []
    for cls in (Searcher, Ingestor, ContextBuilder, Embedder):
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            if hasattr(member, "__wrapped__") and not name.startswith("_"):
                methods.append((f"{cls.__name__}.{name}", inspect.unwrap(member)))
    return methods


def _crossing() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for where, func in _handle_methods():
        # Separate locals: pydantic registers a generic class made by code that runs at a
        # module's top level (locals are its globals), as evaluating the hints would be, and
        # the test would then pass whatever the app does. The engine makes its pages in
        # methods.
        hints = typing.get_type_hints(func, localns={}, include_extras=True)
        for name, hint in hints.items():
            for model in _models(hint):
                found[f"{where} {name}: {model.__qualname__}"] = model
    return found


def test_the_handle_methods_are_found() -> None:
    names = {where for where, _ in _handle_methods()}
    assert {"Searcher.search_json", "Searcher.list_memories", "Embedder.embed"} <= names
    assert {"Ingestor.append_messages", "ContextBuilder.prepare_context"} <= names


@pytest.mark.parametrize(("where", "model"), sorted(_crossing().items()))
def test_every_model_crossing_a_hop_pickles_by_name(where: str, model: type[BaseModel]) -> None:
    value = model.model_construct()  # the class is what pickle must find, not the fields
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    assert type(pickle.loads(data)) is model
    assert len(data) < 2000, "the class itself was pickled, not a reference to it"


def test_the_errors_and_vectors_pickle() -> None:
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.HalldyllError):
            copy = pickle.loads(pickle.dumps(cls("message", field="f")))
            assert type(copy) is cls and copy.fields == {"field": "f"}
    vectors = np.ones((2, 384), dtype=np.float32)[1:]
    assert np.array_equal(pickle.loads(pickle.dumps(vectors)), vectors)
