"""Retrieval over a user's memories (SPEC §4.4): semantic, full-text, hybrid, and ranking."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import TypeAdapter

from halldyll_ray import validation
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
)
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

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


def fuse(semantic: Sequence[Hit], text: Sequence[Hit], weight: float) -> list[tuple[Hit, float]]:
    """Hybrid ranking: a convex combination of the two signals of each part,
    ``weight * cosine + (1 - weight) * coverage`` (both lists of distinct parts, best first).

    A convex combination of normalised scores, not reciprocal rank fusion: Bruch, Gai and
    Ingber ("An Analysis of Fusion Functions for Hybrid Retrieval", ACM TOIS 2023) find it
    better and less sensitive to its one parameter; on the LoCoMo development split
    (``benchmarks/locomo.py``, conversations stored per session) recall@10 is 0.68 at weight
    0.4 (flat from 0.3 to 0.45) against 0.62 for RRF with k = 60. The BM25 score is divided by
    the query's own weight (:attr:`Hit.coverage`), so a chunk that holds only the query's
    common words scores low even when nothing better matched. A part found by one list only
    has the other signal's value as known (each full-text hit carries its cosine) or 0.
    """
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
    scores = {
        key: weight * cosine.get(key, 0.0) + (1.0 - weight) * coverage.get(key, 0.0)
        for key in first
    }
    order = sorted(scores, key=lambda k: (-scores[k], str(k[0]), k[1], k[2]))
    return [(first[k], scores[k]) for k in order]


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
    weights were tuned there (0.72-0.74 for neighbour 0.1-0.3, memory 0.3-0.7).
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
    ) -> _Plan:
        """The search's arguments, checked, and its result cache key (which holds the user's
        memory version, so a write makes every older answer unreachable)."""
        user_id = validation.parse_uuid(user_id, "user_id")
        if not validation.text(query, "query").strip():
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
        threshold = self.settings.similarity_threshold if threshold is None else threshold
        if not isinstance(threshold, int | float) or not -1.0 <= threshold <= 1.0:
            raise InvalidInput("threshold must be between -1 and 1", field="threshold")
        scope = await self.registry.scope(model, include_shared)
        filters = Filters(
            types=validation.memory_types(types),
            model_id=scope.model_id,
            include_shared=scope.include_shared,
            session_id=validation.session_id(session_id),
            tags=tags_filter(tags),
            since=validation.timestamp(since, "since"),
            until=validation.timestamp(until, "until"),
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
        return _Plan(user_id, query, limit, mode, float(threshold), filters, group, key)

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
        )
        ttl = self.settings.search_cache_ttl_seconds
        if ttl <= 0:
            return results, None
        blob = _RESULTS.dump_json(results)
        await self.cache.set(plan.key, blob, ttl=ttl)
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
            rows = await conn.fetch(q("get_memories"), user_id, wanted)
        by_id = {row["id"]: row for row in rows if not expired(row["expires_at"])}
        results = []
        for hit, score in fused:
            row = by_id.get(hit.memory_id)
            if row is None:
                continue
            results.append(
                SearchResult(
                    memory=to_record(row),
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
                )
                for r in rows
            ]
            if mode is SearchMode.HYBRID:
                source = "hybrid"
                fused = in_context(
                    fuse(
                        best_per(semantic, SearchGroup.PART),
                        best_per(text_hits, SearchGroup.PART),
                        weight,
                    )
                )
            else:
                source = "fulltext"
                fused = [(hit, hit.rank_score) for hit in best_per(text_hits, SearchGroup.PART)]
        if group is SearchGroup.MEMORY:
            kept = {id(hit) for hit in best_per([hit for hit, _ in fused], SearchGroup.MEMORY)}
            fused = [(hit, score) for hit, score in fused if id(hit) in kept]
        return fused, source
