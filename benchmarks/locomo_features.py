"""Learned hybrid ranking on LoCoMo: dump every question's candidates with their features, then
fit linear rankers with leave-one-conversation-out cross-validation (issue 16).

``dump``
    Stores the development split (``../shared/bench/locomo/locomo-dev.json``) as
    ``benchmarks/locomo.py --layouts session`` does (one Conversation per session, ``name`` =
    the speaker, ``created_at`` = the session's date), through the public engine API. For every
    question of categories 1-4 it embeds the query with the engine's encoder and runs the
    shipped ``search_semantic`` and ``search_fulltext`` queries (``storage/sql/search.sql``) with
    ``--fetch`` rows each (the product fetches 100 for a search of limit 10), keeps the best
    chunk of each part as Search does (``best_per``), and writes, per candidate part: its row
    in each list, its best chunk there, its cosine, its BM25 score and coverage, and the query's
    vector and full-text terms. Per conversation it writes each part's label (speaker and
    date), chunks and turn (dia_id), and each chunk's vector, lexemes and tsvector length (for
    ``explore``); the English stop-word lexemes once. Written to ``--dump`` (gzipped JSON,
    about 20 MB, not committed). The answers are never read; the evidence dia_ids are the
    labels.

``fit``
    Reads the dump and rebuilds, for a pool of ``P`` rows a list (P = 100 is the product's
    for 10 results), the two lists Search would have, then per candidate the product's own
    features (``rank_features`` in ``halldyll_ray/components/search.py``: what a search has at
    hand) and 15 more tried here (:data:`EXTRA`). Rankers: the one before (``in_context(fuse(
    ...))`` at weight 0.4, neighbour 0.2, memory 0.3), a pointwise logistic regression and a
    listwise softmax (ListNet) linear model over three feature sets, each also with a second
    stage that adds the first stage's best score among the part's neighbours and in its
    memory (the learned version of ``in_context``). Evaluation: leave one conversation out
    (fit on 5 of the 6, rank the 6th), evidence recall@5/@10 per category as
    ``benchmarks/locomo.py`` computes it. Then the shipped model (logistic, product features,
    two stages, pool 100) is fitted on all 6 conversations and its coefficients printed as
    ``RANK_STAGE1`` / ``RANK_STAGE2`` for ``search.py``. Writes
    ``benchmarks/results/locomo_features.{json,md}``; about 12 minutes on 2 cores.

``explore``
    Over the shipped model's leave-one-conversation-out scores (pool 100): greedy
    diversification of the first 10 (:func:`diversified`: maximal marginal relevance over the
    chunk vectors, a penalty per part already picked from the same session or next to it;
    the penalty chosen per fold on the training conversations), and a third logistic stage
    with :data:`EXPLORE_FEATURES` (pseudo-relevance feedback: Rocchio and centroid cosines,
    RM3-expanded BM25 coverage computed here as ``search.sql`` does; the session's mean
    vector and the neighbour-smoothed vector against the query). Writes
    ``benchmarks/results/locomo_explore.{json,md}``; about 5 minutes on 2 cores.

Run from the repository root (the dump stores the split once: about 2 minutes on 2 cores)::

    flock /tmp/halldyll-ray.lock .venv/bin/python benchmarks/locomo_features.py dump
    .venv/bin/python benchmarks/locomo_features.py fit [--pools 100 200]
    .venv/bin/python benchmarks/locomo_features.py explore
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import math
import re
import statistics
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import DATA, RESULTS, _memories, write_results

from halldyll_ray.components import search as ranking
from halldyll_ray.components.base import MONTHS
from halldyll_ray.components.search import BM25_K1

DUMP = Path(tempfile.gettempdir()) / "locomo-features.json.gz"


# --------------------------------------------------------------------------------------- dump


async def _dump(args: argparse.Namespace) -> None:
    from halldyll_ray import MemoryEngine, Settings
    from halldyll_ray.components.embeddings import model_of
    from halldyll_ray.components.search import Filters
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations
    from halldyll_ray.storage.sql import bind

    samples = json.loads(DATA.read_text())
    filters = Filters(None, None, True, None, None, None, None)
    out: dict[str, Any] = {"fetch": args.fetch, "conversations": []}
    stop_words: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="hr-locomo-features-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="locomo")
        try:
            url = await server.start_async()
            await apply_migrations(url, embedding_dimension=384)
            settings = Settings.from_env(
                database_url=url, redis_url=None, search_cache_ttl_seconds=0
            )
            async with MemoryEngine(settings) as engine:
                for sample in samples:
                    user = await engine.create_user(f"feat{uuid.uuid4().hex[:8]}", None, "user")
                    where: dict[tuple[str, int], str] = {}
                    for memory, seqs in _memories(sample, "session"):
                        stored = await engine.store_memory(user.id, memory)
                        for seq, dia_id in seqs:
                            where[(str(stored.id), seq)] = dia_id
                    async with engine.db.scoped(user.id, readonly=True) as conn:
                        rows = await conn.fetch(
                            "SELECT memory_id, part, part_index, label, content, "
                            "embedding::real[] AS vector, tsvector_to_array(tsv) AS lexemes, "
                            "length(tsv) AS tsv_length FROM "
                            "memory_chunks WHERE user_id = $1 "
                            "ORDER BY memory_id, part, part_index, chunk_index",
                            user.id,
                        )
                        every = sorted({w for r in rows for w in r["lexemes"]})
                        stop_rows = await conn.fetch(
                            "SELECT l FROM unnest($1::text[]) AS l "
                            "WHERE to_tsvector('english'::regconfig, l) = ''::tsvector",
                            every,
                        )
                        stop_words.update(r["l"] for r in stop_rows)
                    parts: dict[str, dict[str, Any]] = {}
                    for r in rows:
                        key = f"{r['memory_id']}|{r['part']}|{r['part_index']}"
                        part = parts.setdefault(
                            key,
                            {
                                "label": r["label"],
                                "chunks": [],
                                "dia_id": where.get((str(r["memory_id"]), r["part_index"]), "")
                                if r["part"] == "message"
                                else "",
                            },
                        )
                        part["chunks"].append(r["content"])
                        part.setdefault("vectors", []).append(_b64(r["vector"]))
                        part.setdefault("lexemes", []).append(list(r["lexemes"]))
                        part.setdefault("tsv_length", []).append(int(r["tsv_length"]))
                    questions = []
                    for qa in sample["qa"]:
                        if qa["category"] == 5 or not qa.get("evidence"):
                            continue
                        query = qa["question"]
                        vector = (await engine.embed([query]))[0]
                        async with engine.db.scoped(user.id, readonly=True) as conn:
                            sem_rows = await conn.fetch(
                                *bind(
                                    "search_semantic",
                                    user_id=user.id,
                                    vector=np.asarray(vector),
                                    embedding_model=model_of(vector),
                                    fetch=args.fetch,
                                    **filters.params(),
                                )
                            )
                            terms = await conn.fetch(
                                "SELECT lexeme FROM unnest(tsvector_to_array("
                                "halldyll_tsvector($1))) AS lexeme WHERE to_tsvector("
                                "'english'::regconfig, lexeme) <> ''::tsvector",
                                query,
                            )
                            text_rows = await conn.fetch(
                                *bind(
                                    "search_fulltext",
                                    user_id=user.id,
                                    query=query,
                                    vector=np.asarray(vector),
                                    embedding_model=model_of(vector),
                                    fetch=args.fetch,
                                    **filters.params(),
                                )
                            )
                        # per part, its best chunk's row in each list (rows come best first)
                        candidates: dict[str, dict[str, Any]] = {}
                        for i, r in enumerate(sem_rows):
                            _first_row(candidates, r, "sem_row", i).update(
                                cosine=1.0 - float(r["distance"])
                            )
                        for i, r in enumerate(text_rows):
                            _first_row(candidates, r, "text_row", i).update(
                                text_cosine=None
                                if r["similarity"] is None
                                else float(r["similarity"]),
                                bm25=float(r["rank"]),
                                coverage=float(r["rank"])
                                / ((BM25_K1 + 1) * max(float(r["idf_sum"]), 1e-9)),
                            )
                        questions.append(
                            {
                                "question": query,
                                "category": qa["category"],
                                "evidence": qa["evidence"],
                                "candidates": candidates,
                                "vector": _b64(vector),
                                "terms": [r["lexeme"] for r in terms],
                            }
                        )
                    out["conversations"].append(
                        {
                            "sample_id": sample.get("sample_id"),
                            "parts": parts,
                            "questions": questions,
                        }
                    )
                    print(f"{sample.get('sample_id')}: {len(questions)} questions", flush=True)
        finally:
            server.stop()
    out["stop_lexemes"] = sorted(stop_words)
    with gzip.open(args.dump, "wt") as f:
        json.dump(out, f)
    print(f"wrote {args.dump}")


def _b64(vector: Any) -> str:
    """A vector as base64 of its float32 bytes (:func:`_vector` reads it)."""
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()


def _vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).astype(np.float64)


def _first_row(
    candidates: dict[str, dict[str, Any]], row: Any, key: str, index: int
) -> dict[str, Any]:
    """The candidate of ``row``'s part, with ``key`` (``sem_row``/``text_row``) = ``index``
    and its chunk, to update with the row's signals; a throwaway dict if the part already has
    a row in that list (rows come best first: a part's best chunk counts)."""
    c = candidates.setdefault(f"{row['memory_id']}|{row['part']}|{row['part_index']}", {})
    if key in c:
        return {}
    c[key] = index
    c[key.replace("_row", "_chunk")] = row["chunk_index"]
    return c


# ------------------------------------------------------------------------------------ features

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
_MONTHS = [month.lower() for month in MONTHS]
#: English function words left out of the query-word overlap (the full-text query leaves out
#: the same kind of word: PostgreSQL's English stop words).
_STOP = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
    ]
)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _stem(word: str) -> str:
    """A crude suffix strip, enough to match "painted"/"painting"/"paints" with "paint"."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


#: The product's features (:data:`~halldyll_ray.components.search.RANK_FEATURES`), then
#: others tried here that a search could compute as cheaply.
EXTRA = [
    "in_sem",
    "in_text",
    "rrf_sem",
    "rrf_text",
    "nb_cosine",
    "nb_coverage",
    "mem_cosine",
    "mem_coverage",
    "mem_share",
    "overlap",
    "month_match",
    "year_match",
    "is_title",
    "cosine_gap",
    "coverage_gap",
]
FEATURES = [*ranking.RANK_FEATURES, *EXTRA]


def _lists(question: dict[str, Any], parts: dict[str, dict[str, Any]], pool: int) -> tuple:
    """The two lists of distinct parts as Search has them (``best_per``) when each list holds
    ``pool`` rows: (semantic hits, full-text hits)."""
    from halldyll_ray.components.search import Hit

    sem, text = [], []
    for key, c in question["candidates"].items():
        memory, part, index = key.split("|")
        p = parts.get(key, {"label": None, "chunks": [""]})
        if c.get("sem_row", pool) < pool:
            hit = Hit(
                uuid.UUID(memory),
                part,
                int(index),
                p["chunks"][c["sem_chunk"]],
                c["cosine"],
                c["cosine"],
                label=p["label"],
            )
            sem.append((c["sem_row"], hit))
        if c.get("text_row", pool) < pool:
            hit = Hit(
                uuid.UUID(memory),
                part,
                int(index),
                p["chunks"][c["text_chunk"]],
                c["text_cosine"],
                c["bm25"],
                c["coverage"],
                p["label"],
            )
            text.append((c["text_row"], hit))
    sem.sort(key=lambda pair: pair[0])
    text.sort(key=lambda pair: pair[0])
    return [h for _, h in sem], [h for _, h in text]


def features(
    question: dict[str, Any], parts: dict[str, dict[str, Any]], pool: int
) -> tuple[list[str], np.ndarray]:
    """The candidates of one question (parts among the first ``pool`` rows of either list, in
    :func:`~halldyll_ray.components.search.signals` order) and their features: the product's
    :func:`~halldyll_ray.components.search.rank_features` (weight 0.4), then :data:`EXTRA`."""
    sem, text = _lists(question, parts, pool)
    found = ranking.signals(sem, text)
    keys = [f"{h.memory_id}|{h.part}|{h.part_index}" for h, _, _ in found]
    product = ranking.rank_features(question["question"], found, 0.4)
    if not keys:
        return keys, np.zeros((0, len(FEATURES)))
    cosine, coverage = product[:, 0], product[:, 1]
    sem_rank = {h.key: i for i, h in enumerate(sem)}
    text_rank = {h.key: i for i, h in enumerate(text)}
    index = {h.key: i for i, (h, _, _) in enumerate(found)}
    members: dict[Any, list[int]] = defaultdict(list)
    for i, (h, _, _) in enumerate(found):
        members[h.memory_id].append(i)
    query_words = _words(question["question"])
    content = {_stem(w) for w in query_words if w not in _STOP}
    months = {m for m in _MONTHS if m in query_words and m != "may"}
    years = {w for w in query_words if re.fullmatch(r"(19|20)\d\d", w)}
    extra = np.zeros((len(keys), len(EXTRA)))
    for i, (h, _, _) in enumerate(found):
        label_words = _words(h.label or "")
        text_words = {_stem(w) for w in _words(h.text)} | {_stem(w) for w in label_words}
        beside = [
            index[k]
            for k in (
                (h.memory_id, h.part, h.part_index - 1),
                (h.memory_id, h.part, h.part_index + 1),
            )
            if k in index
        ]
        rows = members[h.memory_id]
        extra[i] = [
            float(h.key in sem_rank),
            float(h.key in text_rank),
            60.0 / (60 + sem_rank[h.key]) if h.key in sem_rank else 0.0,
            60.0 / (60 + text_rank[h.key]) if h.key in text_rank else 0.0,
            max((cosine[j] for j in beside), default=0.0),
            max((coverage[j] for j in beside), default=0.0),
            cosine[rows].max(),
            coverage[rows].max(),
            len(rows) / len(keys),
            len(content & text_words) / max(len(content), 1),
            float(bool(months) and any(m in label_words for m in months)),
            float(bool(years) and any(y in label_words for y in years)),
            float(h.part == "title"),
            cosine[i] - cosine.max(),
            coverage[i] - coverage.max(),
        ]
    return keys, np.hstack([product, extra])


# ------------------------------------------------------------------------------------- rankers


def today(x: np.ndarray) -> np.ndarray:
    """The ranking before the learned one (``in_context(fuse(...))``, weight 0.4, neighbour
    0.2, memory 0.3) from the feature matrix."""
    col = {n: i for i, n in enumerate(FEATURES)}
    fused = 0.4 * x[:, col["cosine"]] + 0.6 * x[:, col["coverage"]]
    return fused + 0.2 * x[:, col["neighbour"]] + 0.3 * x[:, col["memory"]]


class Data:
    """All questions' candidates at one pool: features, labels, grouping."""

    def __init__(self, dump: dict[str, Any], pool: int) -> None:
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.dia: list[list[str]] = []
        self.evidence: list[set[str]] = []
        self.category: list[int] = []
        self.conversation: list[int] = []
        self.keys: list[list[str]] = []
        for ci, conv in enumerate(dump["conversations"]):
            for q in conv["questions"]:
                keys, x = features(q, conv["parts"], pool)
                self.keys.append(keys)
                dia = [conv["parts"].get(k, {}).get("dia_id", "") for k in keys]
                evidence = set(q["evidence"])
                self.x.append(x)
                self.y.append(np.array([float(d in evidence) for d in dia]))
                self.dia.append(dia)
                self.evidence.append(evidence)
                self.category.append(q["category"])
                self.conversation.append(ci)


def recall(data: Data, scores: Sequence[np.ndarray], questions: Sequence[int]) -> dict[str, Any]:
    """Evidence recall@5/@10 overall and @10 per category, as ``benchmarks/locomo.py``."""
    per: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for qi, s in zip(questions, scores, strict=True):
        order = np.lexsort((np.arange(len(s)), -s))
        dia = [data.dia[qi][j] for j in order[:10]]
        ev = data.evidence[qi]
        per[data.category[qi]].append(
            (len(ev & set(dia[:5])) / len(ev), len(ev & set(dia)) / len(ev))
        )
    rows = [r for rs in per.values() for r in rs]
    return {
        "recall@5": statistics.fmean(r[0] for r in rows),
        "recall@10": statistics.fmean(r[1] for r in rows),
        "cat@10": {c: statistics.fmean(r[1] for r in per[c]) for c in sorted(per)},
        "n": len(rows),
    }


def recall_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of rankers' :func:`recall` results, header first."""
    rows = [
        "| ranker | recall@5 | recall@10 | cat 1 / 2 / 3 / 4 @10 |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, r in runs.items():
        cats = " / ".join(f"{v:.3f}" for v in r["cat@10"].values())
        rows.append(f"| {name} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | {cats} |")
    return rows


def _standardize(xs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    allx = np.concatenate(xs)
    mu = allx.mean(axis=0)
    sd = allx.std(axis=0)
    sd[sd < 1e-9] = 1.0
    return mu, sd


def fit_logistic(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], l2: float = 1e-2, steps: int = 300
) -> np.ndarray:
    """Pointwise logistic regression (Newton steps), standardized features; returns weights
    over the raw features plus a bias (last)."""
    mu, sd = _standardize(xs)
    x = (np.concatenate(xs) - mu) / sd
    y = np.concatenate(ys)
    x = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(min(steps, 30)):
        p = 1 / (1 + np.exp(-(x @ w)))
        g = x.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0]
        h = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.diag(
            np.r_[np.ones(len(w) - 1), 0]
        )
        w -= np.linalg.solve(h, g)
    raw = w[:-1] / sd
    return np.r_[raw, w[-1] - (mu * raw).sum()]


def fit_listnet(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    l2: float = 1e-3,
    steps: int = 400,
    lr: float = 0.5,
) -> np.ndarray:
    """Listwise softmax (ListNet top-1): per question, cross-entropy between the softmax of
    the scores and the evidence spread evenly; full-batch gradient descent with momentum on
    standardized features. Questions with no evidence among the candidates are skipped."""
    mu, sd = _standardize(xs)
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y.sum() > 0]
    x = (np.concatenate([x for x, _ in kept]) - mu) / sd
    t = np.concatenate([y / y.sum() for _, y in kept])
    sizes = np.array([len(y) for _, y in kept])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    segment = np.repeat(np.arange(len(kept)), sizes)
    w = np.zeros(len(mu))
    v = np.zeros_like(w)
    for _ in range(steps):
        s = x @ w
        e = np.exp(s - np.maximum.reduceat(s, starts)[segment])
        p = e / np.add.reduceat(e, starts)[segment]
        g = l2 * w + x.T @ (p - t) / len(kept)
        v = 0.9 * v - lr * g
        w = w + v
    raw = w / sd
    return np.r_[raw, -(mu * raw).sum()]


def score(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ w[:-1] + w[-1]


def _context(data_keys: list[list[str]], scores: list[np.ndarray]) -> list[np.ndarray]:
    """Per question: (neighbour max, memory max) of a first-stage score, as in_context."""
    out = []
    for keys, s in zip(data_keys, scores, strict=True):
        s = s - s.min() if len(s) else s  # scores >= 0: a missing neighbour counts 0
        index = {k: i for i, k in enumerate(keys)}
        nb = np.zeros(len(keys))
        mem: dict[str, float] = {}
        for i, k in enumerate(keys):
            memory, part, idx = k.split("|")
            mem[memory] = max(mem.get(memory, 0.0), s[i])
            for j in (f"{memory}|{part}|{int(idx) - 1}", f"{memory}|{part}|{int(idx) + 1}"):
                if j in index:
                    nb[i] = max(nb[i], s[index[j]])
        out.append(np.c_[nb, [mem[k.split("|")[0]] for k in keys]])
    return out


def cross_validate(
    data: Data,
    keys: list[list[str]],
    columns: list[int],
    fit: Callable[..., np.ndarray],
    *,
    two_stage: bool,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Leave-one-conversation-out scores for every question, and each fold's weights."""
    scores: list[np.ndarray] = [np.zeros(0)] * len(data.x)
    weights = []
    for held in sorted(set(data.conversation)):
        train = [i for i, c in enumerate(data.conversation) if c != held]
        test = [i for i, c in enumerate(data.conversation) if c == held]
        xs = [data.x[i][:, columns] for i in train]
        ys = [data.y[i] for i in train]
        w1 = fit(xs, ys)
        if two_stage:
            ctx_train = _context([keys[i] for i in train], [score(w1, x) for x in xs])
            xs2 = [np.c_[x, c] for x, c in zip(xs, ctx_train, strict=True)]
            w2 = fit(xs2, ys)
            weights.append(np.r_[w1, w2])
            for i in test:
                s1 = score(w1, data.x[i][:, columns])
                ctx = _context([keys[i]], [s1])[0]
                scores[i] = score(w2, np.c_[data.x[i][:, columns], ctx])
        else:
            weights.append(w1)
            for i in test:
                scores[i] = score(w1, data.x[i][:, columns])
    return scores, weights


def _fit(args: argparse.Namespace) -> None:
    with gzip.open(args.dump, "rt") as f:
        dump = json.load(f)
    results: dict[str, Any] = {"fetch": dump["fetch"], "features": FEATURES, "runs": {}}
    table = [
        "| pool | ranker | recall@5 | recall@10 | cat 1 / 2 / 3 / 4 @10 |",
        "| ---: | --- | ---: | ---: | --- |",
    ]
    n = len(ranking.RANK_FEATURES)
    sets = {"base4": [0, 1, 2, 3], "product": list(range(n)), "all": list(range(len(FEATURES)))}
    final = None
    for pool in args.pools:
        data = Data(dump, pool)
        every = list(range(len(data.x)))
        ceiling = statistics.fmean(
            len(data.evidence[i] & set(data.dia[i])) / len(data.evidence[i]) for i in every
        )
        runs: dict[str, Any] = {"today": recall(data, [today(x) for x in data.x], every)}
        for set_name, columns in sets.items():
            for fit_name, fit in (("logistic", fit_logistic), ("listnet", fit_listnet)):
                for two in (False, True):
                    name = f"{fit_name}/{set_name}" + ("/2-stage" if two else "")
                    scores, _ = cross_validate(data, data.keys, columns, fit, two_stage=two)
                    runs[name] = recall(data, scores, every)
                    print(pool, name, {k: runs[name][k] for k in ("recall@5", "recall@10")})
        for name, r in runs.items():
            cats = " / ".join(f"{v:.3f}" for v in r["cat@10"].values())
            table.append(
                f"| {pool} | {name} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | {cats} |"
            )
        table.append(f"| {pool} | (all evidence in the pool) | | {ceiling:.3f} | |")
        results["runs"][str(pool)] = {"ceiling": ceiling, **runs}
        if pool == 100:  # the product's pool (a search of limit 10 fetches 100 rows a list)
            final = _final(data, sets["product"])
    if final is not None:
        results["final"] = final
        table += [
            "",
            "Fitted on all 6 conversations (pool 100, logistic, product features, 2 stages), "
            "for `halldyll_ray/components/search.py`:",
            "",
            "```python",
            f"RANK_STAGE1 = {tuple(final['stage1'])}",
            f"RANK_STAGE2 = {tuple(final['stage2'])}",
            "```",
            "",
            "In-sample through the product's `learned_scores`: recall@5 "
            f"{final['in_sample']['recall@5']:.3f}, "
            f"recall@10 {final['in_sample']['recall@10']:.3f}.",
        ]
    write_results(
        args.out,
        "locomo_features.py",
        results,
        "LoCoMo development split: learned ranking, leave-one-conversation-out",
        table,
    )


def _final(data: Data, columns: list[int]) -> dict[str, Any]:
    """The shipped model: both stages fitted on every question, rounded to 4 decimals, and
    its in-sample recall through the product's own scoring."""
    xs = [x[:, columns] for x in data.x]
    w1 = fit_logistic(xs, data.y)
    ctx = _context(data.keys, [score(w1, x) for x in xs])
    w2 = fit_logistic([np.c_[x, c] for x, c in zip(xs, ctx, strict=True)], data.y)
    stage1 = [round(float(v), 4) for v in w1]
    stage2 = [round(float(v), 4) for v in w2]
    saved = ranking.RANK_STAGE1, ranking.RANK_STAGE2
    ranking.RANK_STAGE1, ranking.RANK_STAGE2 = tuple(stage1), tuple(stage2)
    try:
        scores = []
        for keys, x in zip(data.keys, xs, strict=True):
            hits = [
                ranking.Hit(
                    uuid.UUID(k.split("|")[0]), k.split("|")[1], int(k.split("|")[2]), "", None, 0.0
                )
                for k in keys
            ]
            scores.append(ranking.learned_scores(hits, x) if keys else np.zeros(0))
    finally:
        ranking.RANK_STAGE1, ranking.RANK_STAGE2 = saved
    return {
        "stage1": stage1,
        "stage2": stage2,
        "in_sample": recall(data, scores, list(range(len(data.x)))),
    }


# ------------------------------------------------------------------------------------- explore
#: Diversification penalties tried by ``explore`` (logit units; chosen per fold on the 5
#: training conversations).
DIVERSITY_GRID = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Pseudo-relevance feedback: the first pass's best ``PRF_DOCS`` parts (weighted by their
#: probability) give the centroid and the expansion terms; Rocchio ``PRF_BETA``; RM3 keeps
#: ``PRF_TERMS`` terms and gives the original query ``PRF_ALPHA`` of the weight.
PRF_DOCS, PRF_BETA, PRF_TERMS, PRF_ALPHA = 5, 0.5, 10, 0.5
#: The features ``explore`` adds to the shipped model (a third logistic stage).
EXPLORE_FEATURES = (
    "prf_cosine",
    "centroid_cosine",
    "rm3_coverage",
    "session_cosine",
    "smoothed_cosine",
)


class _Corpus:
    """One conversation's chunks as the dump has them: vectors, lexemes, BM25 lengths."""

    def __init__(self, conv: dict[str, Any]) -> None:
        self.keys: list[str] = []
        lexemes: list[list[str]] = []
        lengths: list[int] = []
        vectors: list[np.ndarray] = []
        part_vector: dict[str, np.ndarray] = {}
        for key, p in conv["parts"].items():
            vs = [_vector(t) for t in p["vectors"]]
            v = np.mean(vs, axis=0)
            part_vector[key] = v / np.linalg.norm(v)
            for c in range(len(p["chunks"])):
                self.keys.append(key)
                lexemes.append(p["lexemes"][c])
                lengths.append(p["tsv_length"][c])
                vectors.append(vs[c])
        self.part_vector = part_vector
        self.length = np.array(lengths, dtype=np.float64)
        self.postings: dict[str, list[int]] = defaultdict(list)
        for i, words in enumerate(lexemes):
            for w in words:
                self.postings[w].append(i)
        self.label_words = {k: set(_words(p["label"] or "")) for k, p in conv["parts"].items()}
        self.part_lexemes = {
            k: {w for words in p["lexemes"] for w in words} for k, p in conv["parts"].items()
        }
        by_memory: dict[str, list[np.ndarray]] = defaultdict(list)
        for key, v in part_vector.items():
            by_memory[key.split("|")[0]].append(v)
        self.session = {m: np.mean(vs, axis=0) for m, vs in by_memory.items()}
        self.session = {m: v / np.linalg.norm(v) for m, v in self.session.items()}
        self.smoothed = {}
        for key, v in part_vector.items():
            memory, part, index = key.split("|")
            beside = [
                part_vector[k]
                for k in (f"{memory}|{part}|{int(index) - 1}", f"{memory}|{part}|{int(index) + 1}")
                if k in part_vector
            ]
            u = v + 0.5 * sum(beside) if beside else v
            self.smoothed[key] = u / np.linalg.norm(u)

    def bm25(self, weights: dict[str, float]) -> dict[str, float]:
        """Per part, the best chunk's coverage (``storage/sql/search.sql``'s BM25 divided by
        the query's weight) for a weighted query."""
        n = len(self.keys)

        def idf(w: str) -> float:
            df = len(self.postings.get(w, ()))
            return math.log(1 + (n - df + 0.5) / (df + 0.5))

        terms = [t for t in weights if t in self.postings]
        matches = sorted({i for t in terms for i in self.postings[t]})
        if not matches:
            return {}
        avg = self.length[matches].mean()
        total = sum(w * idf(t) for t, w in weights.items())
        score = np.zeros(n)
        for t in terms:
            ids = np.array(self.postings[t])
            score[ids] += (
                weights[t]
                * idf(t)
                * (BM25_K1 + 1)
                / (1 + BM25_K1 * (0.25 + 0.75 * self.length[ids] / avg))
            )
        out: dict[str, float] = {}
        for i in matches:
            value = score[i] / ((BM25_K1 + 1) * max(total, 1e-9))
            out[self.keys[i]] = max(out.get(self.keys[i], -1.0), value)
        return out


def explore_features(
    corpus: _Corpus, question: dict[str, Any], keys: list[str], first: np.ndarray, stop: set[str]
) -> np.ndarray:
    """:data:`EXPLORE_FEATURES` of a question's candidates (``len(keys) x 5``), ``first`` the
    first pass's logit of each: the cosine to the Rocchio query (query + PRF_BETA x the
    probability-weighted centroid of the best PRF_DOCS parts), to that centroid alone, the
    RM3 coverage (the query's terms plus the PRF_TERMS likeliest terms of those parts, not
    stop words, label words or numbers), the cosine of the part's session (mean vector) and
    of the part smoothed with its neighbours (``v + 0.5 (v_before + v_after)``)."""
    if not keys:
        return np.zeros((0, len(EXPLORE_FEATURES)))
    vectors = np.array([corpus.part_vector[k] for k in keys])
    top = np.argsort(-first)[:PRF_DOCS]
    w = 1 / (1 + np.exp(-first[top]))
    w = w / w.sum()
    query = _vector(question["vector"])
    query = query / np.linalg.norm(query)
    centroid = (w[:, None] * vectors[top]).sum(axis=0)
    centroid = centroid / np.linalg.norm(centroid)
    rocchio = query + PRF_BETA * centroid
    rocchio = rocchio / np.linalg.norm(rocchio)
    likely: dict[str, float] = defaultdict(float)
    for weight, j in zip(w, top, strict=True):
        words = [
            t
            for t in corpus.part_lexemes[keys[j]]
            if t not in stop and t not in corpus.label_words[keys[j]] and not t.isdigit()
        ]
        for t in words:
            likely[t] += weight / len(words)
    original = set(question["terms"])
    expansion = sorted(((v, t) for t, v in likely.items() if t not in original), reverse=True)
    expansion = expansion[:PRF_TERMS]
    weights = {t: PRF_ALPHA / len(original) for t in original}
    total = sum(v for v, _ in expansion) or 1.0
    for v, t in expansion:
        weights[t] = weights.get(t, 0.0) + (1 - PRF_ALPHA) * v / total
    coverage = corpus.bm25(weights)
    return np.column_stack(
        (
            vectors @ rocchio,
            vectors @ centroid,
            [coverage.get(k, 0.0) for k in keys],
            [corpus.session[k.split("|")[0]] @ query for k in keys],
            [corpus.smoothed[k] @ query for k in keys],
        )
    )


def diversified(
    scores: np.ndarray, keys: list[str], vectors: np.ndarray, kind: str, penalty: float, k: int = 10
) -> np.ndarray:
    """The candidates' order after greedy diversification of the first ``k``: each pick is
    the best ``score - discount``, where a candidate's discount grows with what is already
    picked: ``mmr`` penalty x its highest cosine (>= 0) to a picked part (maximal marginal
    relevance, Carbonell and Goldstein 1998), ``session`` penalty per picked part of its
    memory, ``neighbour`` penalty per picked part next to it. The rest follow by score."""
    n = len(scores)
    if penalty == 0 or n == 0:
        return np.lexsort((np.arange(n), -scores))
    discount = np.zeros(n)
    memory = np.array([key.split("|")[0] for key in keys])
    index = {key: i for i, key in enumerate(keys)}
    similarity = np.clip(vectors @ vectors.T, 0, None) if kind == "mmr" else None
    picked: list[int] = []
    left = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        value = np.where(left, scores - discount, -np.inf)
        j = int(np.argmax(value))  # the first of equals: the lower index
        picked.append(j)
        left[j] = False
        if kind == "mmr":
            assert similarity is not None
            np.maximum(discount, penalty * similarity[j], out=discount)
        elif kind == "session":
            discount[memory == memory[j]] += penalty
        else:
            m, part, i = keys[j].split("|")
            for near in (f"{m}|{part}|{int(i) - 1}", f"{m}|{part}|{int(i) + 1}"):
                if near in index:
                    discount[index[near]] += penalty
    rest = [int(i) for i in np.lexsort((np.arange(n), -scores)) if left[i]]
    return np.array(picked + rest)


def recall_of_orders(
    data: Data, orders: Sequence[np.ndarray], questions: Sequence[int]
) -> dict[str, Any]:
    """:func:`recall` of given orders (a rank's score is minus its position)."""
    scores = []
    for order in orders:
        s = np.zeros(len(order))
        s[order] = -np.arange(len(order), dtype=np.float64)
        scores.append(s)
    return recall(data, scores, questions)


def _explore(args: argparse.Namespace) -> None:
    """Diversification and pseudo-relevance feedback over the shipped model, pool 100."""
    with gzip.open(args.dump, "rt") as f:
        dump = json.load(f)
    if "stop_lexemes" not in dump:
        raise SystemExit(f"{args.dump} has no vectors or lexemes: run dump again")
    data = Data(dump, 100)
    every = list(range(len(data.x)))
    corpora = [_Corpus(conv) for conv in dump["conversations"]]
    questions = [q for conv in dump["conversations"] for q in conv["questions"]]
    stop = set(dump["stop_lexemes"])
    vectors = [
        np.array([corpora[data.conversation[i]].part_vector[k] for k in data.keys[i]]).reshape(
            len(data.keys[i]), -1
        )
        for i in every
    ]
    n = len(ranking.RANK_FEATURES)
    shipped: list[np.ndarray] = [np.zeros(0)] * len(every)
    variants = {
        "+ " + ", ".join(EXPLORE_FEATURES[c] for c in cols): cols
        for cols in ([0], [1], [2], [3], [4], [4, 0], [0, 1, 2, 3, 4])
    }
    added: dict[str, list[np.ndarray]] = {name: [np.zeros(0)] * len(every) for name in variants}
    diverse = {
        kind: {p: [np.zeros(0, dtype=int)] * len(every) for p in DIVERSITY_GRID}
        for kind in ("mmr", "session", "neighbour")
    }
    chosen: dict[str, list[float]] = {kind: [] for kind in diverse}
    cv_orders = {kind: [np.zeros(0, dtype=int)] * len(every) for kind in diverse}
    for held in sorted(set(data.conversation)):
        train = [i for i in every if data.conversation[i] != held]
        test = [i for i in every if data.conversation[i] == held]
        ys = [data.y[i] for i in train]
        w1 = fit_logistic([data.x[i][:, :n] for i in train], ys)
        x2 = {
            i: np.c_[data.x[i][:, :n], _context([data.keys[i]], [score(w1, data.x[i][:, :n])])[0]]
            for i in every
        }
        w2 = fit_logistic([x2[i] for i in train], ys)
        first = {i: score(w2, x2[i]) for i in every}
        for i in test:
            shipped[i] = first[i]
        extra = {
            i: explore_features(
                corpora[data.conversation[i]], questions[i], data.keys[i], first[i], stop
            )
            for i in every
        }
        for name, cols in variants.items():
            xs3 = {i: np.c_[x2[i], extra[i][:, cols]] for i in every}
            w3 = fit_logistic([xs3[i] for i in train], ys)
            for i in test:
                added[name][i] = score(w3, xs3[i])
        for kind, by_penalty in diverse.items():
            for p in DIVERSITY_GRID:
                for i in every:
                    by_penalty[p][i] = diversified(first[i], data.keys[i], vectors[i], kind, p)
            best = max(
                DIVERSITY_GRID,
                key=lambda p: (
                    recall_of_orders(data, [by_penalty[p][i] for i in train], train)["recall@10"],
                    -p,
                ),
            )
            chosen[kind].append(best)
            for i in test:
                cv_orders[kind][i] = by_penalty[best][i]
        print(f"fold {held} done", flush=True)
    runs: dict[str, Any] = {"shipped (logistic/product/2-stage)": recall(data, shipped, every)}
    for kind, by_penalty in diverse.items():
        runs[f"{kind} diversification, penalty chosen per fold {chosen[kind]}"] = recall_of_orders(
            data, cv_orders[kind], every
        )
        for p in DIVERSITY_GRID[1:]:
            runs[f"{kind} diversification, penalty {p} (every fold)"] = recall_of_orders(
                data, by_penalty[p], every
            )
    for name in variants:
        runs[f"shipped {name} (3rd stage)"] = recall(data, added[name], every)
    table = [
        "Leave one conversation out, pool 100 (883 questions, categories 1-4). Diversification "
        "reorders the shipped model's CV logits; the feature variants add a third logistic "
        "stage over the shipped model's 9 inputs plus the features named.",
        "",
        *recall_table(runs),
    ]
    write_results(
        args.out,
        "locomo_features.py",
        {"prf": [PRF_DOCS, PRF_BETA, PRF_TERMS, PRF_ALPHA], "runs": runs},
        "LoCoMo development split: diversification and pseudo-relevance feedback",
        table,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dump = sub.add_parser("dump", help="store the split and dump every question's candidates")
    dump.add_argument("--fetch", type=int, default=400, help="rows per list (product: 100)")
    dump.add_argument("--dump", type=Path, default=DUMP)
    fit = sub.add_parser("fit", help="fit and cross-validate rankers on the dump")
    fit.add_argument("--dump", type=Path, default=DUMP)
    fit.add_argument("--pools", type=int, nargs="+", default=[100, 200])
    fit.add_argument("--out", type=Path, default=RESULTS / "locomo_features.json")
    explore = sub.add_parser(
        "explore", help="diversification and pseudo-relevance feedback over the shipped model"
    )
    explore.add_argument("--dump", type=Path, default=DUMP)
    explore.add_argument("--out", type=Path, default=RESULTS / "locomo_explore.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"{DATA} is missing (the shared development split)", file=sys.stderr)
        return 2
    if args.command == "dump":
        asyncio.run(_dump(args))
    elif args.command == "explore":
        _explore(args)
    else:
        _fit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
