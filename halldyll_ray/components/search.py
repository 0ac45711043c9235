"""Retrieval over a user's memories (SPEC §4.4): semantic, full-text, hybrid, and ranking."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import TypeAdapter

from halldyll_ray import validation
from halldyll_ray.components.embeddings import Embeddings
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
    SearchMode,
    SearchResult,
)
from halldyll_ray.storage.cache import TieredCache
from halldyll_ray.storage.database import Database
from halldyll_ray.storage.sql import bind, q

#: Reciprocal-rank-fusion constant (Cormack, Clarke and Büttcher, SIGIR 2009); 60 is the
#: value the paper recommends.
RRF_K = 60
_RESULTS: TypeAdapter[list[SearchResult]] = TypeAdapter(list[SearchResult])


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


def best_per_memory(hits: Sequence[Hit]) -> list[Hit]:
    """The best-ranked part of each memory, in rank order (hits arrive best first)."""
    seen: set[UUID] = set()
    best = []
    for hit in hits:
        if hit.memory_id not in seen:
            seen.add(hit.memory_id)
            best.append(hit)
    return best


def rrf(*lists: Sequence[Hit]) -> list[tuple[Hit, float]]:
    """Reciprocal rank fusion of ranked lists: score = sum of 1 / (RRF_K + rank)."""
    scores: dict[UUID, float] = {}
    first: dict[UUID, Hit] = {}
    for hits in lists:
        for rank_, hit in enumerate(hits, start=1):
            scores[hit.memory_id] = scores.get(hit.memory_id, 0.0) + 1.0 / (RRF_K + rank_)
            current = first.get(hit.memory_id)
            # Prefer the part that carries a similarity (semantic list) for reporting.
            if current is None or (current.similarity is None and hit.similarity is not None):
                first[hit.memory_id] = hit
    order = sorted(scores, key=lambda mid: (-scores[mid], str(mid)))
    return [(first[mid], scores[mid]) for mid in order]


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
        self,
        user_id: UUID | str,
        query: str,
        limit: int | None = None,
        *,
        mode: SearchMode | str = SearchMode.SEMANTIC,
        types: Iterable[MemoryType | str] | None = None,
        model: UUID | str | None = None,
        include_shared: bool = True,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        threshold: float | None = None,
    ) -> list[SearchResult]:
        """See :meth:`halldyll_ray.engine.MemoryEngine.search`."""
        user_id = validation.parse_uuid(user_id, "user_id")
        if not validation.text(query, "query").strip():
            raise InvalidInput("query must be a non-empty string", field="query")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInput(f"query is longer than {MAX_QUERY_CHARS} characters", field="query")
        limit = validation.limit(
            self.settings.search_top_k if limit is None else limit, MAX_SEARCH_LIMIT
        )
        try:
            mode = SearchMode(mode)
        except ValueError:
            raise InvalidInput("mode must be semantic, hybrid or fulltext", field="mode") from None
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
            [query, limit, mode.value, float(threshold), [str(f) for f in astuple(filters)]],
            ensure_ascii=False,
        )
        cache_key = TieredCache.user_key(
            "search",
            user_id,
            str(state["memory_version"]),
            self.embeddings.encoder.model_id,
            hashlib.sha256(params.encode()).hexdigest()[:40],
        )
        cached = await self.cache.get(cache_key, kind="search")
        if cached is not None:
            results = _RESULTS.validate_json(cached, context=STORED)
            return [r for r in results if not expired(r.memory.expires_at)]
        results = await self._search(user_id, query, limit, mode, float(threshold), filters)
        ttl = self.settings.search_cache_ttl_seconds
        if ttl > 0:
            await self.cache.set(cache_key, _RESULTS.dump_json(results), ttl=ttl)
        return results

    async def _search(
        self,
        user_id: UUID,
        query: str,
        limit: int,
        mode: SearchMode,
        threshold: float,
        filters: Filters,
    ) -> list[SearchResult]:
        fetch = min(limit * 4, 400)
        # The vector first, so no connection is held while the Embedding deployment works;
        # then every read of this search in one transaction (fewer round trips).
        vector = None if mode is SearchMode.FULLTEXT else (await self.embeddings.embed([query]))[0]
        async with self.db.scoped(user_id, readonly=True) as conn:
            fused, source = await self._retrieve(
                conn, user_id, query, vector, mode, threshold, filters, fetch
            )
            if not fused:
                return []
            wanted = [hit.memory_id for hit, _ in fused[: limit * 2]]
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
    ) -> tuple[list[tuple[Hit, float]], str]:
        """Ranked hits (semantic, full-text fallback or fused) and where they came from."""
        semantic: list[Hit] = []
        if vector is not None:
            rows = await conn.fetch(
                *bind(
                    "search_semantic",
                    user_id=user_id,
                    vector=vector,
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
            fused = [(hit, hit.rank_score) for hit in best_per_memory(semantic)]
        else:
            rows = await conn.fetch(
                *bind(
                    "search_fulltext",
                    user_id=user_id,
                    query=query,
                    vector=vector,
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
                )
                for r in rows
            ]
            if mode is SearchMode.HYBRID:
                source = "hybrid"
                fused = rrf(best_per_memory(semantic), best_per_memory(text_hits))
            else:
                source = "fulltext"
                fused = [(hit, hit.rank_score) for hit in best_per_memory(text_hits)]
        return fused, source
