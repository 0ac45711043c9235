"""Retrieval over a user's memories (SPEC §4.4): semantic, full-text, hybrid, and ranking."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import TypeAdapter

from halldyll_ray import validation
from halldyll_ray.components.base import cache_for_user
from halldyll_ray.components.embeddings import Embeddings, model_of
from halldyll_ray.components.memories import expired, tags_filter, to_record
from halldyll_ray.components.registry import ModelRegistry
from halldyll_ray.config import Settings
from halldyll_ray.errors import InvalidInput, NotFound
from halldyll_ray.models import (
    MAX_QUERY_CHARS,
    MAX_SEARCH_LIMIT,
    STORED,
    MatchedPart,
    MemoryType,
    SearchGroup,
    SearchMode,
    SearchResult,
    SearchView,
    StoredMemory,
    visible,
)
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q
from halldyll_ray.textproc import search_form

#: BM25's k1, as in ``storage/sql/search.sql``: a chunk holding a query word once, at the
#: average length, scores idf * (k1 + 1) for it.
BM25_K1 = 1.2
#: Hybrid ranking, after :func:`fuse`: a part gains NEIGHBOUR_WEIGHT x the better score of the
#: parts beside it (the message before and after it, a transcription's next segment) and
#: MEMORY_WEIGHT x the best score of any part of its memory (:func:`in_context`).
NEIGHBOUR_WEIGHT = 0.2
MEMORY_WEIGHT = 0.3
_RESULTS: TypeAdapter[list[SearchResult]] = TypeAdapter(list[SearchResult])
#: In the JSON of cached results only where a memory has an expiry (``"expires_at":null``
#: otherwise; a quote inside a JSON string is escaped): the answer may need filtering.
_MAY_EXPIRE = b'"expires_at":"'


def _live(results: list[SearchResult]) -> list[SearchResult]:
    """Cached results without the memories that expired since they were cached."""
    return [r for r in results if not expired(r.memory.expires_at)]


def _answer(cached: bytes) -> bytes:
    """The HTTP answer (``{"results": [...]}``) from cached results' JSON: passed on as it is
    unless a result in it may have expired since (it is then read, filtered and written)."""
    if _MAY_EXPIRE in cached:
        cached = _RESULTS.dump_json(_live(_RESULTS.validate_json(cached, context=STORED)))
    return b'{"results":' + cached + b"}"


@dataclass(frozen=True)
class Filters:
    """The checked filters of a search, by the names its SQL takes (``storage/sql/search.sql``)."""

    types: list[str] | None
    model_id: UUID | None
    include_shared: bool
    session_id: str | None
    tags: list[str] | None
    since: datetime | None
    until: datetime | None

    def values(self) -> tuple[Any, ...]:
        """The filters in field order (``dataclasses.astuple`` without its deep copy)."""
        return (
            self.types,
            self.model_id,
            self.include_shared,
            self.session_id,
            self.tags,
            self.since,
            self.until,
        )

    def params(self) -> dict[str, Any]:
        return {
            "types": self.types,
            "model_id": self.model_id,
            "include_shared": self.include_shared,
            "session_id": self.session_id,
            "tags": self.tags,
            "since": self.since,
            "until": self.until,
        }


@dataclass(frozen=True)
class Hit:
    """One matching chunk: its memory, part and text, and its score in its own list."""

    memory_id: UUID
    part: str
    part_index: int
    text: str
    similarity: float | None
    rank_score: float
    #: Full-text hits: the share of the query's BM25 weight this chunk holds (about 0-1;
    #: 1 for a chunk of average length holding every word of the query once).
    coverage: float = 0.0
    #: The chunk's label (a message's speaker and date, ``"Caroline 8 May 2023"``), if any.
    label: str | None = None

    @property
    def key(self) -> tuple[UUID, str, int]:
        """The part this hit is a chunk of: (memory id, part, part index)."""
        return (self.memory_id, self.part, self.part_index)


def best_per(hits: Sequence[Hit], group: SearchGroup) -> list[Hit]:
    """The best-ranked hit of each part (``part``) or of each memory (``memory``), in rank
    order (hits arrive best first): a long message's chunks count once."""
    seen: set[object] = set()
    best = []
    for hit in hits:
        key = hit.memory_id if group is SearchGroup.MEMORY else hit.key
        if key not in seen:
            seen.add(key)
            best.append(hit)
    return best


def signals(semantic: Sequence[Hit], text: Sequence[Hit]) -> list[tuple[Hit, float, float]]:
    """Each part found by either list once, as (hit, cosine, BM25 coverage), in the order
    first seen (the semantic list, then the full-text one; both lists of distinct parts, best
    first). The hit is the semantic list's when both found the part. A part found by one list
    only has the other signal's value as known (each full-text hit carries its cosine) or 0."""
    cosine: dict[tuple[UUID, str, int], float] = {}
    coverage: dict[tuple[UUID, str, int], float] = {}
    first: dict[tuple[UUID, str, int], Hit] = {}
    for hit in semantic:
        first.setdefault(hit.key, hit)
        cosine.setdefault(hit.key, hit.similarity or 0.0)
    for hit in text:
        first.setdefault(hit.key, hit)
        coverage.setdefault(hit.key, hit.coverage)
        if hit.similarity is not None:
            cosine.setdefault(hit.key, hit.similarity)
    return [(hit, cosine.get(key, 0.0), coverage.get(key, 0.0)) for key, hit in first.items()]


def _ranked(hits: Sequence[Hit], scores: Iterable[float]) -> list[tuple[Hit, float]]:
    """(hit, score) best first; ties in a fixed order (memory id, part, index)."""
    pairs = list(zip(hits, (float(s) for s in scores), strict=True))
    pairs.sort(key=lambda p: (-p[1], str(p[0].memory_id), p[0].part, p[0].part_index))
    return pairs


def fuse(semantic: Sequence[Hit], text: Sequence[Hit], weight: float) -> list[tuple[Hit, float]]:
    """A convex combination of the two signals of each part,
    ``weight * cosine + (1 - weight) * coverage`` (:func:`signals`), best first.

    A convex combination of normalised scores, not reciprocal rank fusion: Bruch, Gai and
    Ingber ("An Analysis of Fusion Functions for Hybrid Retrieval", ACM TOIS 2023) find it
    better and less sensitive to its one parameter; on the LoCoMo development split
    (``benchmarks/locomo.py``, conversations stored per session) recall@10 is 0.68 at weight
    0.4 (flat from 0.3 to 0.45) against 0.62 for RRF with k = 60. The BM25 score is divided by
    the query's own weight (:attr:`Hit.coverage`), so a chunk that holds only the query's
    common words scores low even when nothing better matched. It is one feature of the hybrid
    ranking (:func:`learned_rank`), and with :func:`in_context` was the ranking itself before.
    """
    found = signals(semantic, text)
    return _ranked(
        [hit for hit, _, _ in found],
        [weight * cos + (1.0 - weight) * cov for _, cos, cov in found],
    )


def in_context(
    fused: Sequence[tuple[Hit, float]],
    neighbour_weight: float = NEIGHBOUR_WEIGHT,
    memory_weight: float = MEMORY_WEIGHT,
) -> list[tuple[Hit, float]]:
    """Scores that count a part's surroundings: ``score + neighbour_weight * max(score of the
    part before, score of the part after) + memory_weight * (best score of its memory)``,
    re-sorted. Parts outside ``fused`` count 0.

    An answer often spans two adjacent turns of a conversation, and a turn of a conversation
    that is about the question is likelier to hold the answer than the same words elsewhere.
    A memory of one part (a fact) is scaled by ``1 + memory_weight``: its rank among other
    one-part memories does not move. On the LoCoMo development split (``benchmarks/locomo.py``,
    conversations stored per session) hybrid recall@10 goes from 0.68 to 0.73; the two
    weights were tuned there (0.72-0.74 for neighbour 0.1-0.3, memory 0.3-0.7). The hybrid
    ranking before :func:`learned_rank`; ``benchmarks/locomo_features.py`` compares with it.
    """
    score = {hit.key: value for hit, value in fused}
    best: dict[UUID, float] = {}
    for hit, value in fused:
        best[hit.memory_id] = max(best.get(hit.memory_id, value), value)
    out = []
    for hit, value in fused:
        memory_id, part, index = hit.key
        beside = max(
            score.get((memory_id, part, index - 1), 0.0),
            score.get((memory_id, part, index + 1), 0.0),
        )
        out.append((hit, value + neighbour_weight * beside + memory_weight * best[memory_id]))
    out.sort(key=lambda pair: (-pair[1], str(pair[0].memory_id), pair[0].part, pair[0].part_index))
    return out


#: The features of a candidate part that :func:`learned_rank` weighs, in column order
#: (:func:`rank_features` says what each is).
RANK_FEATURES = (
    "cosine",
    "coverage",
    "neighbour",
    "memory",
    "log_length",
    "speaker_named",
    "other_named",
)
#: First stage of :func:`learned_rank`: a weight per :data:`RANK_FEATURES` column, then the
#: bias. Fitted by ``benchmarks/locomo_features.py fit`` (which prints these constants).
RANK_STAGE1 = (1.8868, 7.2927, 1.7618, 2.9612, 0.5132, 0.4366, -0.4981, -9.7958)
#: Second stage: a weight per :data:`RANK_FEATURES` column, then the weights of the best
#: first-stage score of the part's neighbours and of its memory, then the bias.
RANK_STAGE2 = (1.8984, 6.034, 0.9819, 1.458, 0.4892, 0.4635, -0.5302, 0.0913, 0.2733, -10.0957)
#: The length (characters) :func:`rank_features` gives every part that is not a message: the
#: length prior was learned on conversation turns only, so other parts (facts, prompts,
#: summaries) get about the median candidate turn's (108 characters on LoCoMo) and compete on
#: their other features.
UNMEASURED_LENGTH = 100
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_POSSESSIVE = re.compile(r"['’]s\b", re.IGNORECASE)


def _words(text: str) -> list[str]:
    """Words as full-text search compares them (:func:`~halldyll_ray.textproc.search_form`:
    case, width, accents and Unicode form folded), possessives dropped ("Caroline's" is
    "caroline")."""
    return _WORD.findall(_POSSESSIVE.sub("", search_form(text)))


def speaker_of(label: str | None) -> tuple[str, ...]:
    """The speaker's words of a message label (``"Caroline 8 May 2023"`` -> ``("caroline",)``;
    :func:`~halldyll_ray.components.base.message_label` writes the date last); () if none."""
    if not label:
        return ()
    words = label.split()
    if len(words) >= 3 and words[-1].isdigit() and words[-3].isdigit():
        words = words[:-3]
    return tuple(_words(" ".join(words)))


@dataclass(frozen=True)
class _Layout:
    """Where each candidate sits (:func:`_layout`): the positions, in the candidate list, of
    the part before and after it (-1: not a candidate) and the number of its memory."""

    before: np.ndarray
    after: np.ndarray
    memory: np.ndarray
    memories: int

    def context(self, scores: np.ndarray) -> np.ndarray:
        """Per candidate: the best of ``scores`` (>= 0) of the parts before and after it (0
        if neither is a candidate) and of any part of its memory; ``len(scores) x 2``."""
        padded = np.r_[scores, 0.0]  # position -1 reads the 0 at the end
        best = np.full(self.memories, -np.inf)
        np.maximum.at(best, self.memory, scores)
        return np.column_stack(
            (np.maximum(padded[self.before], padded[self.after]), best[self.memory])
        )


def _layout(hits: Sequence[Hit]) -> _Layout:
    index = {hit.key: i for i, hit in enumerate(hits)}
    numbers: dict[UUID, int] = {}
    before, after, memory = [], [], []
    for hit in hits:
        memory_id, part, position = hit.key
        before.append(index.get((memory_id, part, position - 1), -1))
        after.append(index.get((memory_id, part, position + 1), -1))
        memory.append(numbers.setdefault(memory_id, len(numbers)))
    return _Layout(
        np.array(before, dtype=np.intp),
        np.array(after, dtype=np.intp),
        np.array(memory, dtype=np.intp),
        len(numbers),
    )


def rank_features(
    query: str,
    found: Sequence[tuple[Hit, float, float]],
    weight: float,
    layout: _Layout | None = None,
) -> np.ndarray:
    """The :data:`RANK_FEATURES` of each candidate of :func:`signals` (``len(found) x 7``,
    float64), from what a search has at hand: both lists, the query, the parts' labels.

    * ``cosine``, ``coverage``: the part's two signals (0 where unknown);
    * ``neighbour``, ``memory``: the best fused score (``weight * cosine + (1 - weight) *
      coverage``, :func:`fuse`) of the part before or after it, and of any part of its
      memory, among the candidates (as :func:`in_context`);
    * ``log_length``: ``ln(1 + characters)`` of a message's matched chunk (short turns such
      as "Thanks!" rarely answer anything; evidence turns are twice as long as the median
      candidate), of :data:`UNMEASURED_LENGTH` for any other part;
    * ``speaker_named``: 1 if the query names the part's speaker (every word of the speaker
      in its label is a word of the query);
    * ``other_named``: 1 if the part has a speaker and the query names another candidate's
      speaker but not this one.
    """
    query_words = set(_words(query))
    of_label: dict[str | None, tuple[str, ...]] = {}  # a session's messages share a label
    speakers = []
    for hit, _, _ in found:
        if hit.label not in of_label:
            of_label[hit.label] = speaker_of(hit.label)
        speakers.append(of_label[hit.label])
    named = {s for s in set(speakers) if s and all(w in query_words for w in s)}
    rows = [
        (
            cos,
            cov,
            0.0,
            0.0,
            math.log1p(len(hit.text) if hit.part == "message" else UNMEASURED_LENGTH),
            float(speaker in named),
            float(bool(named) and bool(speaker) and speaker not in named),
        )
        for (hit, cos, cov), speaker in zip(found, speakers, strict=True)
    ]
    x = np.array(rows, dtype=np.float64).reshape(len(found), len(RANK_FEATURES))
    fused = weight * x[:, 0] + (1.0 - weight) * x[:, 1]
    x[:, 2:4] = (layout or _layout([hit for hit, _, _ in found])).context(fused)
    return x


def learned_scores(hits: Sequence[Hit], x: np.ndarray, layout: _Layout | None = None) -> np.ndarray:
    """:func:`learned_rank`'s score of each hit from its :func:`rank_features` row ``x``:
    the probability (0-1) the fitted model gives the part of holding what the query asks.
    ``layout``: :func:`_layout` of ``hits``, if already made."""
    if not len(hits):
        return np.zeros(0)
    stage1 = x @ np.asarray(RANK_STAGE1[:-1]) + RANK_STAGE1[-1]
    context = (layout or _layout(hits)).context(stage1 - stage1.min())
    w2 = np.asarray(RANK_STAGE2)
    n = len(RANK_FEATURES)
    logit = x @ w2[:n] + context @ w2[n : n + 2] + w2[-1]
    return np.asarray(1.0 / (1.0 + np.exp(-logit)))


def learned_rank(
    query: str, semantic: Sequence[Hit], text: Sequence[Hit], weight: float
) -> list[tuple[Hit, float]]:
    """Hybrid ranking: a two-stage logistic model over :func:`rank_features`, best first
    (both lists of distinct parts, best first; scores 0-1).

    Stage one weighs each part's features (:data:`RANK_STAGE1`); stage two weighs them again
    with the best stage-one score (less the lowest among the candidates) of the part's
    neighbours and of its memory (:data:`RANK_STAGE2`): the learned version of
    :func:`in_context`. The coefficients were fitted by logistic regression (L2 0.01, features
    standardized) on the LoCoMo development split (``benchmarks/locomo_features.py fit``:
    every question's candidates among the first 100 rows of each list, a part labelled 1 if
    it is one of the question's evidence turns) with ``weight`` 0.4; another weight changes
    the ``neighbour`` and ``memory`` features only. Leave-one-conversation-out over its 6
    conversations, against :func:`in_context` over :func:`fuse` on the same candidates
    (categories 1-4, 883 questions; ``benchmarks/results/locomo_features.md``): recall@5
    0.648 -> 0.704, recall@10 0.732 -> 0.773 (per category 1 / 2 / 3 / 4 at 10: 0.41 / 0.81
    / 0.37 / 0.86 -> 0.48 / 0.88 / 0.43 / 0.88). ``log_length``, ``speaker_named`` and
    ``other_named`` carry the gain (the four score features alone: 0.738); a listwise
    (ListNet) fit, 15 more features (query-word overlap, month and year in the label, the
    ranks in each list, ...) or 200 rows a list gained at most 0.009 more.
    """
    found = signals(semantic, text)
    hits = [hit for hit, _, _ in found]
    layout = _layout(hits)
    x = rank_features(query, found, weight, layout)
    return _ranked(hits, learned_scores(hits, x, layout))


@dataclass(frozen=True)
class CachedSearch:
    """:meth:`Search.cached_json`'s answer: the HTTP answer's bytes if cached, else None, and
    the result cache key of the search's arguments."""

    answer: bytes | None
    key: str


@dataclass(frozen=True)
class _Plan:
    """A search's checked arguments and its result cache key (:meth:`Search._plan`)."""

    user_id: UUID
    query: str
    limit: int
    mode: SearchMode
    threshold: float
    filters: Filters
    group: SearchGroup
    view: SearchView
    key: str


class Search:
    """Search a user's memories; results are cached per user until their memories change."""

    def __init__(
        self,
        db: Database,
        cache: TieredCache,
        embeddings: Embeddings,
        registry: ModelRegistry,
        settings: Settings,
    ) -> None:
        self.db = db
        self.cache = cache
        self.embeddings = embeddings
        self.registry = registry
        self.settings = settings

    async def search(
        self, user_id: UUID | str, query: str, limit: int | None = None, **options: Any
    ) -> list[SearchResult]:
        """See :meth:`halldyll_ray.engine.MemoryEngine.search` (its keywords are
        ``options``; :meth:`_plan` checks them)."""
        found = await self._found(user_id, query, limit, **options)
        if isinstance(found, bytes):  # a cache hit
            return _live(_RESULTS.validate_json(found, context=STORED))
        return found[0]

    async def search_json(
        self, user_id: UUID | str, query: str, limit: int | None = None, **options: Any
    ) -> bytes:
        """:meth:`search`'s answer as the JSON of ``SearchResponse`` (``{"results": [...]}``).

        The results' JSON is written once: the same bytes go to the result cache and into the
        answer, and a cached answer is passed on as it is stored unless a result in it may
        have expired since (it is then read, filtered and written again).
        """
        found = await self._found(user_id, query, limit, **options)
        if isinstance(found, bytes):  # a cache hit
            return _answer(found)
        results, cached = found
        return b'{"results":' + (_RESULTS.dump_json(results) if cached is None else cached) + b"}"

    async def cached_json(
        self, user_id: UUID | str, query: str, limit: int | None = None, **options: Any
    ) -> CachedSearch:
        """:meth:`search_json`'s answer when the result cache holds it (else ``answer`` None:
        nothing is searched), with the cache key. Same arguments and errors as
        :meth:`search_json`.

        Lets the HTTP ingress answer a repeated search without the hop to Search, and keep
        Search's answer to a miss (:meth:`keep_json`).
        """
        plan = await self._plan(user_id, query, limit, **options)
        if self.settings.search_cache_ttl_seconds <= 0:  # nothing is ever cached
            return CachedSearch(None, plan.key)
        cached = await self.cache.get(plan.key, kind="search")
        return CachedSearch(None if cached is None else _answer(cached), plan.key)

    def keep_json(self, key: str, answer: bytes) -> None:
        """Keep a search's answer (``{"results": [...]}``, as :meth:`search_json` wrote it
        for the arguments whose :meth:`cached_json` gave ``key``) in this process's cache
        only: the replica that searched has cached it for every process already (in Redis),
        and without Redis this is how the ingress's next identical search avoids the hop."""
        ttl = self.settings.search_cache_ttl_seconds
        prefix, suffix = b'{"results":', b"}"
        if ttl > 0 and answer.startswith(prefix) and answer.endswith(suffix):
            self.cache.local.set(key, answer[len(prefix) : -len(suffix)], ttl)

    async def _plan(
        self,
        user_id: UUID | str,
        query: str,
        limit: int | None,
        *,
        mode: SearchMode | str | None = None,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
        group: SearchGroup | str = SearchGroup.PART,
        view: SearchView | str | None = None,
    ) -> _Plan:
        """The search's arguments, checked, and its result cache key (which holds the user's
        memory version, so a write makes every older answer unreachable)."""
        user_id = validation.parse_uuid(user_id, "user_id")
        if not visible(validation.text(query, "query")):
            raise InvalidInput("query must be a non-empty string", field="query")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInput(f"query is longer than {MAX_QUERY_CHARS} characters", field="query")
        limit = validation.limit(
            self.settings.search_top_k if limit is None else limit, MAX_SEARCH_LIMIT
        )
        try:
            mode = SearchMode(self.settings.search_mode if mode is None else mode)
        except ValueError:
            raise InvalidInput("mode must be semantic, hybrid or fulltext", field="mode") from None
        try:
            group = SearchGroup(group)
        except ValueError:
            raise InvalidInput("group must be part or memory", field="group") from None
        try:
            view = SearchView(SearchView.FULL if view is None else view)
        except ValueError:
            raise InvalidInput("view must be full or basic", field="view") from None
        threshold = self.settings.similarity_threshold if threshold is None else threshold
        if (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not -1.0 <= threshold <= 1.0
        ):
            raise InvalidInput("threshold must be between -1 and 1", field="threshold")
        scope = await self.registry.scope(model, include_shared)
        since, until = validation.time_range(since, until)
        filters = Filters(
            types=validation.memory_types(types),
            model_id=scope.model_id,
            include_shared=scope.include_shared,
            session_id=validation.session_id(session_id),
            tags=tags_filter(tags),
            since=since,
            until=until,
        )
        state = await self.db.fetchrow(q("user_state"), user_id)
        if state is None:
            raise NotFound(f"user {user_id} not found")
        params = json.dumps(
            [
                query,
                limit,
                mode.value,
                group.value,
                view.value,
                float(threshold),
                self.settings.hybrid_semantic_weight,
                [str(f) for f in filters.values()],
            ],
            ensure_ascii=False,
        )
        key = TieredCache.user_key(
            "search",
            user_id,
            str(state["memory_version"]),
            self.embeddings.encoder.model_id,
            hashlib.sha256(params.encode()).hexdigest()[:40],
        )
        return _Plan(user_id, query, limit, mode, float(threshold), filters, group, view, key)

    async def _found(
        self, user_id: UUID | str, query: str, limit: int | None, **options: Any
    ) -> bytes | tuple[list[SearchResult], bytes | None]:
        """A cache hit: the results' JSON as cached (expired results may be in it). A miss:
        the results, and their JSON when it was cached (None with SEARCH_CACHE_TTL_SECONDS
        0)."""
        plan = await self._plan(user_id, query, limit, **options)
        cached = await self.cache.get(plan.key, kind="search")
        if cached is not None:
            return cached
        results = await self._search(
            plan.user_id,
            plan.query,
            plan.limit,
            plan.mode,
            plan.threshold,
            plan.filters,
            plan.group,
            plan.view,
        )
        ttl = self.settings.search_cache_ttl_seconds
        if ttl <= 0:
            return results, None
        blob = _RESULTS.dump_json(results)
        await cache_for_user(self.db, self.cache, plan.user_id, plan.key, blob, ttl=ttl)
        return results, blob

    async def _search(
        self,
        user_id: UUID,
        query: str,
        limit: int,
        mode: SearchMode,
        threshold: float,
        filters: Filters,
        group: SearchGroup,
        view: SearchView,
    ) -> list[SearchResult]:
        # 100 candidates per list at least: the hybrid ranking counts their neighbours
        fetch = min(max(limit * 4, 100), 400)
        # The vector first, so no connection is held while the Embedding deployment works;
        # then every read of this search in one transaction (fewer round trips).
        vector = None if mode is SearchMode.FULLTEXT else (await self.embeddings.embed([query]))[0]
        async with self.db.scoped(user_id, readonly=True) as conn:
            fused, source = await self._retrieve(
                conn,
                user_id,
                query,
                vector,
                mode,
                threshold,
                filters,
                fetch,
                group,
                self.settings.hybrid_semantic_weight,
            )
            if not fused:
                return []
            wanted = list(dict.fromkeys(hit.memory_id for hit, _ in fused[: limit * 2]))
            heads = "get_memories_basic" if view is SearchView.BASIC else "get_memories"
            rows = await conn.fetch(q(heads), user_id, wanted)
        by_id = {row["id"]: row for row in rows if not expired(row["expires_at"])}
        # One record per memory, however many of its parts are hits: a long transcription's
        # record (thousands of segments) was built again for each of them.
        records: dict[UUID, StoredMemory] = {}
        results = []
        for hit, score in fused:
            row = by_id.get(hit.memory_id)
            if row is None:
                continue
            if hit.memory_id not in records:
                records[hit.memory_id] = to_record(row)
            results.append(
                SearchResult(
                    memory=records[hit.memory_id],
                    score=round(score, 6),
                    similarity=None if hit.similarity is None else round(hit.similarity, 6),
                    source=source,  # type: ignore[arg-type]
                    matched=MatchedPart(part=hit.part, index=hit.part_index, text=hit.text),
                )
            )
            if len(results) == limit:
                break
        return results

    @staticmethod
    async def _retrieve(
        conn: asyncpg.Connection,
        user_id: UUID,
        query: str,
        vector: np.ndarray | None,
        mode: SearchMode,
        threshold: float,
        filters: Filters,
        fetch: int,
        group: SearchGroup,
        weight: float,
    ) -> tuple[list[tuple[Hit, float]], str]:
        """Ranked hits (semantic, full-text fallback or fused) and where they came from."""
        semantic: list[Hit] = []
        if vector is not None:
            rows = await conn.fetch(
                *bind(
                    "search_semantic",
                    user_id=user_id,
                    vector=np.asarray(vector),
                    embedding_model=model_of(vector),
                    fetch=fetch,
                    **filters.params(),
                )
            )
            semantic = [
                Hit(
                    r["memory_id"],
                    r["part"],
                    r["part_index"],
                    r["content"],
                    1.0 - float(r["distance"]),
                    1.0 - float(r["distance"]),
                    label=r["label"],
                )
                for r in rows
                if 1.0 - float(r["distance"]) >= threshold
            ]
        source = "semantic"
        fused: list[tuple[Hit, float]]
        if mode is SearchMode.SEMANTIC and semantic:
            fused = [(hit, hit.rank_score) for hit in best_per(semantic, SearchGroup.PART)]
        else:
            rows = await conn.fetch(
                *bind(
                    "search_fulltext",
                    user_id=user_id,
                    query=query,
                    vector=None if vector is None else np.asarray(vector),
                    embedding_model=None if vector is None else model_of(vector),
                    fetch=fetch,
                    **filters.params(),
                )
            )
            text_hits = [
                Hit(
                    r["memory_id"],
                    r["part"],
                    r["part_index"],
                    r["content"],
                    None if r["similarity"] is None else float(r["similarity"]),
                    float(r["rank"]),
                    float(r["rank"]) / ((BM25_K1 + 1) * max(float(r["idf_sum"]), 1e-9)),
                    r["label"],
                )
                for r in rows
            ]
            if mode is SearchMode.HYBRID:
                source = "hybrid"
                fused = learned_rank(
                    query,
                    best_per(semantic, SearchGroup.PART),
                    best_per(text_hits, SearchGroup.PART),
                    weight,
                )
            else:
                source = "fulltext"
                fused = [(hit, hit.rank_score) for hit in best_per(text_hits, SearchGroup.PART)]
        if group is SearchGroup.MEMORY:
            kept = {id(hit) for hit in best_per([hit for hit, _ in fused], SearchGroup.MEMORY)}
            fused = [(hit, score) for hit, score in fused if id(hit) in kept]
        return fused, source
