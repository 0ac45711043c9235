"""The pure ranking steps of search: part grouping, hybrid fusion, context of a part."""

from __future__ import annotations

import uuid
from dataclasses import astuple
from datetime import UTC, datetime

import pytest

from halldyll_ray.components.search import Filters, Hit, best_per, fuse, in_context
from halldyll_ray.models import SearchGroup

TALK = uuid.UUID(int=1)
FACT = uuid.UUID(int=2)


def hit(memory: uuid.UUID, index: int, *, cosine: float = 0.0, coverage: float = 0.0) -> Hit:
    return Hit(memory, "message", index, f"turn {index}", cosine, cosine, coverage)


def test_best_per_part_keeps_each_turn_once_and_per_memory_one() -> None:
    hits = [hit(TALK, 3), hit(TALK, 3), hit(TALK, 5), hit(FACT, 0), hit(TALK, 1)]
    assert [(h.memory_id, h.part_index) for h in best_per(hits, SearchGroup.PART)] == [
        (TALK, 3),
        (TALK, 5),
        (FACT, 0),
        (TALK, 1),
    ]
    assert [h.part_index for h in best_per(hits, SearchGroup.MEMORY)] == [3, 0]


def test_fuse_is_a_convex_combination_of_cosine_and_coverage() -> None:
    semantic = [hit(TALK, 0, cosine=0.8), hit(TALK, 1, cosine=0.5)]
    text = [hit(TALK, 1, cosine=0.5, coverage=0.9), hit(FACT, 0, cosine=0.1, coverage=1.0)]
    fused = dict(((h.memory_id, h.part_index), s) for h, s in fuse(semantic, text, 0.4))
    assert fused[(TALK, 0)] == pytest.approx(0.4 * 0.8)  # found by the vector list only
    assert fused[(TALK, 1)] == pytest.approx(0.4 * 0.5 + 0.6 * 0.9)
    assert fused[(FACT, 0)] == pytest.approx(0.4 * 0.1 + 0.6 * 1.0)  # its cosine came along
    order = [(h.memory_id, h.part_index) for h, _ in fuse(semantic, text, 0.4)]
    assert order == [(TALK, 1), (FACT, 0), (TALK, 0)]
    assert next(h.part_index for h, _ in fuse(semantic, text, 1.0)) == 0  # cosine only


def test_in_context_counts_neighbours_and_the_memory_best_part() -> None:
    fused = [(hit(FACT, 0), 0.50), (hit(TALK, 4), 0.45), (hit(TALK, 5), 0.30), (hit(TALK, 9), 0.2)]
    scored = {(h.memory_id, h.part_index): s for h, s in in_context(fused, 0.2, 0.3)}
    assert scored[(FACT, 0)] == pytest.approx(0.50 * 1.3)  # alone: scaled, no neighbours
    assert scored[(TALK, 4)] == pytest.approx(0.45 + 0.2 * 0.30 + 0.3 * 0.45)
    assert scored[(TALK, 5)] == pytest.approx(0.30 + 0.2 * 0.45 + 0.3 * 0.45)
    assert scored[(TALK, 9)] == pytest.approx(0.2 + 0.3 * 0.45)  # no neighbour among the hits
    ranked = [(h.memory_id, h.part_index) for h, _ in in_context(fused, 0.2, 0.3)]
    assert ranked == [(FACT, 0), (TALK, 4), (TALK, 5), (TALK, 9)]
    assert [s for _, s in in_context(fused, 0.0, 0.0)] == [0.50, 0.45, 0.30, 0.2]


def test_search_filters_values_are_their_astuple() -> None:
    # The search cache key is built from Filters.values(); it replaced dataclasses.astuple.
    filters = Filters(
        types=["fact", "conversation"],
        model_id=uuid.uuid4(),
        include_shared=False,
        session_id="s-1",
        tags=["a", "b"],
        since=datetime(2026, 1, 2, tzinfo=UTC),
        until=None,
    )
    assert filters.values() == astuple(filters)
