"""The pure ranking steps of search: part grouping, hybrid fusion, context of a part."""

from __future__ import annotations

import math
import uuid
from dataclasses import astuple
from datetime import UTC, datetime

import pytest

from halldyll_ray.components.search import (
    RANK_FEATURES,
    UNMEASURED_LENGTH,
    Filters,
    Hit,
    best_per,
    fuse,
    in_context,
    learned_rank,
    rank_features,
    signals,
    speaker_of,
)
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


def said(index: int, speaker: str, text: str, *, cosine: float, coverage: float) -> Hit:
    return Hit(TALK, "message", index, text, cosine, cosine, coverage, f"{speaker} 8 May 2023")


def test_speaker_of_reads_the_name_before_the_date() -> None:
    assert speaker_of("Caroline 8 May 2023") == ("caroline",)
    assert speaker_of("Dr Jo Smith 12 December 2024") == ("dr", "jo", "smith")
    assert speaker_of("8 May 2023") == ()
    assert speaker_of(None) == ()


def test_rank_features_from_the_lists_query_and_labels() -> None:
    semantic = [said(4, "Caroline", "I went to the support group.", cosine=0.6, coverage=0.0)]
    text = [
        said(4, "Caroline", "I went to the support group.", cosine=0.6, coverage=0.5),
        said(5, "Melanie", "Nice!", cosine=0.2, coverage=0.1),
        Hit(FACT, "statement", 0, "x" * 99, 0.1, 0.3, 0.25),
    ]
    found = signals(semantic, text)
    x = rank_features("When did Caroline's support group meet?", found, 0.4)
    assert x.shape == (3, len(RANK_FEATURES))
    assert [f"{h.part}{h.part_index}" for h, _, _ in found] == [
        "message4",
        "message5",
        "statement0",
    ]
    cosine, coverage, neighbour, memory, log_length, named, other = x.T
    assert list(cosine) == [0.6, 0.2, 0.1] and list(coverage) == [0.5, 0.1, 0.25]
    fused = 0.4 * cosine + 0.6 * coverage
    assert list(neighbour) == pytest.approx([fused[1], fused[0], 0.0])
    assert list(memory) == pytest.approx([fused[0], fused[0], fused[2]])
    # a fact's length is not held against it: the prior was learned on messages
    assert list(log_length) == pytest.approx(
        [math.log(29), math.log(6), math.log1p(UNMEASURED_LENGTH)]
    )
    assert list(named) == [1.0, 0.0, 0.0]  # "Caroline's" names Caroline
    assert list(other) == [0.0, 1.0, 0.0]  # the fact has no speaker
    # a query naming nobody: neither flag
    assert not rank_features("what happened?", found, 0.4)[:, 5:].any()


@pytest.mark.parametrize(
    ("speaker", "query"),
    [
        ("Zo\u00eb", "What did Zoe\u0308 say?"),  # NFC name, NFD query
        ("Zoe\u0308", "What did Zo\u00eb say?"),  # and the other way round
        ("Zo\u00eb", "What did ZOE say?"),  # case and accent, as full-text search reads them
        ("\u0130smail", "What did Ismail say?"),  # Turkish dotted capital I
        ("\u039d\u03af\u03ba\u03bf\u03c2", "What did \u039d\u038a\u039a\u039f\u03a3 say?"),
        ("Stra\u00dfe", "What did STRASSE say?"),  # German sharp s
        ("Zoe", "What did \uff3a\uff4f\uff45 say?"),  # full-width Latin
        ("Maria", "What did Ma\u200bria say?"),  # a zero-width space in the query
        ("\u0141ukasz", "What did Lukasz say?"),  # a letter unaccent spells without its stroke
    ],
)
def test_the_query_names_a_speaker_in_any_form_full_text_search_matches(
    speaker: str, query: str
) -> None:
    """The hybrid ranking's speaker features read words as the full-text index does: with
    str.lower, a speaker full-text search found by the query ("Zoe" for "Zoë", an NFD query
    for an NFC name) was not named by it, and the ranking depended on the Unicode form."""
    found = signals([], [said(1, speaker, "I went hiking.", cosine=0.3, coverage=0.3)])
    assert rank_features(query, found, 0.4)[0, 5] == 1.0  # speaker_named


def test_learned_rank_prefers_the_named_speaker_the_longer_turn_and_the_context() -> None:
    words = "I went to the LGBTQ support group yesterday and it was powerful."
    text = [
        said(10, "Melanie", words, cosine=0.5, coverage=0.5),
        said(20, "Caroline", words, cosine=0.5, coverage=0.5),
    ]
    ranked = learned_rank("When did Caroline go to the support group?", [], text, 0.4)
    assert [h.part_index for h, _ in ranked] == [20, 10]
    assert all(0.0 < score < 1.0 for _, score in ranked)
    # the same signals, a two-word turn against a sentence
    short = [said(1, "Melanie", "Sounds good", cosine=0.5, coverage=0.5), text[0]]
    assert [h.part_index for h, _ in learned_rank("support group?", [], short, 0.4)] == [10, 1]
    # equal parts: the one beside a strong part ranks higher
    strong = said(31, "Melanie", words, cosine=0.9, coverage=0.9)
    pair = [said(30, "Melanie", words, cosine=0.3, coverage=0.3), strong]
    lone = Hit(FACT, "message", 7, words, 0.3, 0.3, 0.3, "Melanie 8 May 2023")
    scores = {h.key: s for h, s in learned_rank("support group?", [], [*pair, lone], 0.4)}
    assert scores[(TALK, "message", 30)] > scores[(FACT, "message", 7)]
    assert learned_rank("support group?", [], [], 0.4) == []
