"""End-to-end cost of Ray Serve: HTTP API vs in-process ``MemoryEngine``; Embedding throughput.

What it measures (one run, one machine, everything side by side)
    A private PostgreSQL 18 + pgvector (``EmbeddedPostgres`` in ``--data-dir``, database
    re-created each run, the product's migrations at dimension 384), the shared Redis
    (``--redis-url``, a unique key prefix, removed at the end), one user with an API key and
    ``--memories`` facts (varied, template-generated text) stored through ``MemoryEngine``.
    Then Ray (``address="local"``, 8 logical CPUs like the tests) and Serve start with
    ``build_app`` at its defaults (one replica per deployment, Embedding batching up to 32
    requests with no wait, single texts embedded in the calling replica) in the product's
    Serve environment (``halldyll_ray.serve_env``: throughput-optimized mode, HAProxy); the
    in-process engine uses the same database, Redis prefix and settings.

    For each client count (``--clients``), N concurrent clients issue requests back-to-back
    (closed loop; one keep-alive connection per HTTP client: :class:`LeanClient`, or
    ``httpx.AsyncClient`` with ``--client httpx``) for ``--seconds`` (or ``--requests``) after
    ``--warmup`` seconds of the same load, ``--rounds`` times in turn (the ratios are the
    medians of each round's HTTP / in-process pair):

    * ``GET /healthz``: the floor cost of HAProxy + the ingress replica (no database);
    * ``POST /v1/users/me/search``, three ways: ``uncached`` (a unique query text per request,
      so the embedding is computed and the result cache misses), ``emb_cached`` (one repeated
      query whose embedding is cached; the result cache is defeated by a unique
      ``threshold`` per request, 0.2 minus i x 1e-8: ``limit`` only has 100 values and would
      start hitting the cache after 100 requests), ``full_cached`` (the identical request
      repeated: search-result cache hit);
    * ``POST /v1/users/me/memories``: a fact with unique text (after all searches, since a
      store bumps the user's data version and so invalidates the result cache);
    * the same operations in-process (``inproc``): ``authenticate(key)`` then
      ``engine.authorized(principal).search/store_memory`` (the work the ingress does for one
      request, without Serve), so ``HTTP / inproc`` is the cost of Serve + HTTP;
    * the hops of an ``emb_cached`` search, to see where the time goes: in-process without
      authentication, a handle call to the Search deployment (principal already
      authenticated), a handle call to the Ingress ``handle_search`` (authentication in the
      ingress, then Search), and HTTP; for ``uncached``, one Embedding handle call with one
      text vs ``OnnxEncoder.encode([text])`` in a thread;
    * Embedding throughput: ``--embed-concurrency`` concurrent single-text handle calls
      (``serve.batch`` and the replica's ``MergingEncoder`` merge them into model calls), and
      requests of 32 texts, vs ``OnnxEncoder.encode`` in
      batches of 32 in this process, on the same texts (texts/s and the ratio).

    Per scenario: p50 / p99 / mean latency (ms), throughput, errors, and CPU time per request
    by process (from /proc: this driver, the Serve proxy, each replica, the Ray daemons, this
    run's PostgreSQL server, Redis, and the rest of the machine), which shows where the time
    goes on a CPU-bound box. Results are printed as Markdown and written to
    ``benchmarks/results/serve_http.json`` and ``.md`` with the machine, versions, date and
    the exact command.

    With ``--tracing on`` every replica traces every request (``halldyll_ray.tracing``, on
    through ``OTEL_EXPORTER_OTLP_ENDPOINT`` in the replicas' environment, the SDK's default
    sampler: all of them) and exports over OTLP/HTTP to a sink in this process that answers
    200 and counts what it got (its CPU counts in the driver's column); the cost of tracing is
    the difference with a ``--tracing off`` run.

    With ``--profile DIR``, py-spy samples each Serve replica while every served scenario
    at the most clients runs (and the Embedding throughput rounds): the collapsed stacks go to
    DIR, and the shares of the busiest functions and packages to the results (``Profiles``).
    ``--ops`` restricts the run to some operations (a quicker before/after).

Run from the repository root (about 3 minutes with the defaults)::

    python benchmarks/serve_http.py [--clients 1 16] [--seconds 4 | --requests N] [--warmup 1]
        [--rounds 1] [--client lean|httpx] [--ops ...] [--tracing off|on] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import random
import shlex
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
APP = "halldyll"
#: What ``--ops`` can select.
OPS = (
    "embed_throughput",
    "healthz",
    "search_uncached",
    "search_emb_cached",
    "search_full_cached",
    "embed_one",
    "store",
)
GOALS = {
    "search_uncached_p50_ms": 25.0,
    "search_cached_p50_ms": 12.0,
    "searches_per_s_16_clients": 60.0,
    "embedding_vs_raw_ratio": 0.85,
}


# --------------------------------------------------------------------------- texts
def _pool(text: str) -> list[str]:
    return text.split("|") if "|" in text else text.split()


_NAMES = _pool(
    "Anna Ben Carla David Elif Farid Greta Hiro Ines Jonas Kofi Lena Marco Nadia Omar Priya "
    "Quentin Rosa Sven Tariq Uma Viktor Wen Yara Zoe"
)
_RELATIONS = "sister brother colleague neighbour manager cousin friend dentist landlord mentor"
_CITIES = "Oslo|Lisbon|Kyoto|Montreal|Nairobi|Valparaiso|Krakow|Austin|Hanoi|Edinburgh|Porto|Seoul"
_FOODS = "peanuts|shellfish|gluten|lactose|strawberries|sesame|kiwi|eggs|mushrooms|coriander"
_DISHES = "ramen|tapas|dumplings|pho|grilled sardines|falafel|risotto|tacos|bibimbap|curry"
_DRINKS = "green tea|espresso|oat-milk latte|sparkling water|rooibos|hot chocolate|matcha|chai"
_HOBBIES = (
    "bouldering|sourdough baking|watercolour painting|trail running|chess|birdwatching|"
    "salsa dancing|woodworking|pottery|sailing"
)
_PROJECTS = _pool("Atlas Borealis Cobalt Dune Ember Falcon Granite Helix Iris Juniper")
_WEEKDAYS = _pool("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
_MONTHS = _pool(
    "January February March April May June July August September October November December"
)
_ITEMS = "passport|spare keys|laptop charger|insurance papers|winter tyres|camping stove|tax forms"
_PLACES = (
    "the hall cupboard|the top drawer of the desk|the garage shelf|the blue suitcase|"
    "the kitchen cabinet|the safe in the bedroom"
)
_LANGUAGES = _pool("Portuguese Japanese Swahili Italian Korean Polish Turkish Dutch")
_TIMES = "morning|afternoon|evening|weekend"

_FACTS = [
    "{name}, my {relation}, lives in {city} and visits every {month}.",
    "{name} is allergic to {food} and always asks about it at restaurants.",
    "I prefer {drink} in the {time} and {drink2} after lunch.",
    "The {project} project deadline is {weekday}, {month} {day}.",
    "{name}'s birthday is on {month} {day}; they love {hobby}.",
    "I keep my {item} in {place}.",
    "I started learning {language} in {month} and practise every {weekday} {time}.",
    "My {relation} {name} recommended a place in {city} that serves great {dish}.",
    "The weekly sync for {project} moved to {weekday} at {hour}:00.",
    "I'm training for a half marathon in {city} in {month}.",
    "{name} prefers email over phone calls for anything about {project}.",
    "My flight to {city} leaves on {month} {day} at {hour}:{minute:02d}.",
    "I took up {hobby} last {month} together with {name}.",
    "The wifi password for the {city} office is written down in {place}.",
    "I don't eat {food}, so remind me when ordering {dish} for the team.",
    "{name} from the {project} team owes me {amount} euros for the {city} trip.",
    "My {relation}'s dog is called {name2} and is scared of thunderstorms.",
    "I renew my gym membership every {month}; it costs {amount} euros a year.",
]
_QUERIES = [
    "what did {name} say about the {project} deadline",
    "where do I keep my {item}",
    "when is {name}'s birthday and what do they like",
    "which drink do I like in the {time}",
    "is {name} allergic to anything",
    "restaurants in {city} my {relation} recommended",
    "when does my flight to {city} leave",
    "when is the {project} weekly sync now",
    "which language am I learning and when do I practise",
    "who owes me money for the trip to {city}",
    "what hobby did I start with {name}",
    "what should I avoid when ordering {dish}",
]


_SLOTS = {
    "relation": _pool(_RELATIONS),
    "city": _pool(_CITIES),
    "food": _pool(_FOODS),
    "dish": _pool(_DISHES),
    "drink": _pool(_DRINKS),
    "hobby": _pool(_HOBBIES),
    "item": _pool(_ITEMS),
    "place": _pool(_PLACES),
    "time": _pool(_TIMES),
}


def _fill(template: str, rng: random.Random) -> str:
    drinks = rng.sample(_SLOTS["drink"], 2)
    names = rng.sample(_NAMES, 2)
    return template.format(
        name=names[0],
        name2=names[1],
        drink=drinks[0],
        drink2=drinks[1],
        project=rng.choice(_PROJECTS),
        weekday=rng.choice(_WEEKDAYS),
        month=rng.choice(_MONTHS),
        language=rng.choice(_LANGUAGES),
        day=rng.randint(1, 28),
        hour=rng.randint(6, 21),
        minute=rng.choice((0, 5, 15, 20, 30, 40, 45, 55)),
        amount=rng.randint(12, 480),
        **{k: rng.choice(v) for k, v in _SLOTS.items() if k != "drink"},
    )


class Texts:
    """Unique fact statements and query texts (never repeated within one run)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: set[str] = set()
        self.serial = itertools.count(1)

    def fact(self) -> str:
        while True:
            text = _fill(self.rng.choice(_FACTS), self.rng)
            if text not in self.seen:
                self.seen.add(text)
                return text

    def query(self) -> str:
        # The serial keeps every query unique (so its embedding is never cached) and costs
        # about the same tokens as a real follow-up detail would.
        return f"{_fill(self.rng.choice(_QUERIES), self.rng)} (#{next(self.serial)})"


# --------------------------------------------------------------------------- machine / CPU
def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    mem_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    import onnxruntime as ort
    import ray

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024**2, 1),
        "ray": ray.__version__,
        "onnxruntime": ort.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python_loop_1e6_ms": _python_loop_ms(),
    }


_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds per process group of this run, from /proc (Linux only; empty elsewhere)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.enabled = Path("/proc/stat").exists()

    def _postmaster(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """CPU seconds of each process of this run, by pid: (group, seconds); -1 = machine."""
        if not self.enabled:
            return {}
        procs: dict[int, tuple[int, float, str]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            rest = stat.rsplit(")", 1)[1].split()
            procs[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK, cmd)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int | None) -> set[int]:
            out, todo = set(), [] if root is None or root not in procs else [root]
            while todo:
                pid = todo.pop()
                out.add(pid)
                todo.extend(children.get(pid, ()))
            return out

        me = os.getpid()
        ray_tree = tree(me) - {me}
        pg_tree = tree(self._postmaster())
        out: dict[int, tuple[str, float]] = {-1: ("machine", _machine_busy_s())}
        for pid, (_, cpu, cmd) in procs.items():
            if pid == me:
                name = "driver"
            elif pid in pg_tree:
                name = "postgres"
            elif pid in ray_tree:
                if "ServeReplica:" in cmd:
                    name = cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
                    name = name.split(".")[0]
                elif "ProxyActor" in cmd or "haproxy" in cmd:
                    name = "proxy"  # HAProxy (the product's default), or Serve's Python proxy
                elif "ServeController" in cmd:
                    name = "controller"
                elif "raylet" in cmd or "gcs_server" in cmd:
                    name = "raylet_gcs"
                else:
                    name = "ray_other"  # agents, log monitor, idle workers
            elif "redis-server" in cmd:
                name = "redis"  # shared with other work on the machine; counted as this run's
            else:
                continue
            out[pid] = (name, cpu)
        return out


def _cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per group between two snapshots (per process; exited ones are lost)."""
    out: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        out[name] = out.get(name, 0.0) + max(0.0, cpu - before.get(pid, (name, 0.0))[1])
    out["run"] = sum(v for k, v in out.items() if k != "machine")
    out["other"] = max(0.0, out.get("machine", 0.0) - out["run"])
    return out


def _python_loop_ms() -> float:
    """Speed of this CPU for plain Python: median ms of a 10**6-iteration loop."""
    times = []
    for _ in range(5):
        t, total = time.perf_counter(), 0
        for i in range(1_000_000):
            total += i
        times.append((time.perf_counter() - t) * 1000)
    return round(sorted(times)[2], 1)


# --------------------------------------------------------------------------- profiling
#: The processes a profile covers: the Serve replicas that serve the measured requests.
PROFILED = ("Ingress", "Search", "Ingestion", "Embedding")


class Profiler:
    """py-spy on each Serve replica while a scenario is timed (``--profile DIR``).

    One ``py-spy record --gil --format raw`` per replica process (``PROFILED``), started with
    the timed part of a scenario and stopped (SIGINT) at its end. ``--gil`` keeps the samples
    of a thread that holds the GIL: Python code and the native code it runs (pydantic-core,
    gRPC, asyncpg's protocol), not the threads waiting in uvloop, gRPC or ONNX Runtime (which
    runs without the GIL, so the model's own time is not in these profiles). The collapsed
    stacks go to ``DIR/<scenario>.<replica>.txt`` (``flamegraph.pl`` or speedscope read them)
    and :func:`summarise_profile` reduces each to the functions where the samples are. py-spy
    takes CPU of its own, so a profiled run's figures are not comparable with a plain run's.
    """

    def __init__(self, out: Path, cpu: CpuMeter, rate: int) -> None:
        import shutil

        self.out = out
        self.cpu = cpu
        self.rate = rate
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out.mkdir(parents=True, exist_ok=True)

    def start(self, label: str) -> list[tuple[str, Path, Any]]:
        import subprocess

        running = []
        for pid, (group, _) in sorted(self.cpu.snapshot().items()):
            if group not in PROFILED:
                continue
            path = self.out / f"{label}.{group}.txt"
            proc = subprocess.Popen(
                [
                    *(self.exe, "record", "--gil", "-r", str(self.rate), "-f", "raw"),
                    *("-o", str(path), "-p", str(pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            running.append((group, path, proc))
        return running

    @staticmethod
    def stop(running: list[tuple[str, Path, Any]]) -> dict[str, Any]:
        import signal

        for _, _, proc in running:
            proc.send_signal(signal.SIGINT)
        out = {}
        for group, path, proc in running:
            proc.wait(timeout=30)
            if path.exists():
                out[group] = {"file": str(path), **summarise_profile(path.read_text())}
        return out


def _frame(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: functions, not lines."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if name else frame


def _package(frame: str) -> str:
    """The package a frame's file belongs to (``ray/serve``, ``starlette``, ``halldyll_ray``)."""
    where = frame.rpartition(" (")[2].rstrip(")")
    parts = where.split("/")
    if parts[0] == "ray" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else "stdlib"


def summarise_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Where the samples of py-spy's collapsed stacks are: by leaf function (self), by
    function anywhere on the stack (inclusive) and by the leaf frame's package, as shares."""
    self_: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += n
        self_[frames[-1]] = self_.get(frames[-1], 0) + n
        packages[_package(frames[-1])] = packages.get(_package(frames[-1]), 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n

    def share(counts: dict[str, int], k: int) -> list[list[Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
        return [[name, round(n / total, 3)] for name, n in ranked]

    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self": share(self_, top),
        "inclusive": share(inclusive, top * 2),
        "packages": share(packages, top),
    }


# --------------------------------------------------------------------------- the load loop
@dataclass
class Result:
    name: str
    op: str
    path: str
    clients: int
    n: int
    errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    per_s: float
    items_per_s: float
    seconds: float
    loadavg_1m: float
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)
    cpu_cores: dict[str, float] = field(default_factory=dict)
    first_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Op = Callable[[int], Awaitable[Any]]


async def _closed_loop(
    op: Op, clients: int, seconds: float | None, requests: int | None
) -> tuple[list[float], int, float, str | None]:
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    seq = itertools.count()
    start = time.perf_counter()
    deadline = None if seconds is None else start + seconds

    async def worker(w: int) -> None:
        nonlocal errors, first_error
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if requests is not None and next(seq) >= requests:
                return
            t = time.perf_counter()
            try:
                await op(w)
            except Exception as exc:  # counted and reported, not fatal
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            latencies.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(*(worker(w) for w in range(clients)))
    return latencies, errors, time.perf_counter() - start, first_error


class Bench:
    def __init__(self, args: argparse.Namespace, cpu: CpuMeter) -> None:
        self.args = args
        self.cpu = cpu
        self.settings_env: dict[str, str] = {}
        self.results: list[Result] = []
        self.profiler: Profiler | None = None
        self.profiles: dict[str, Any] = {}

    async def run(
        self,
        name: str,
        op_name: str,
        path: str,
        clients: int,
        op: Op,
        *,
        items: int = 1,
        seconds: float | None = None,
        warmup: bool = True,
    ) -> Result:
        args = self.args
        if warmup and args.warmup > 0:
            await _closed_loop(op, clients, args.warmup, None)
        secs = seconds if seconds is not None else (None if args.requests else args.seconds)
        reqs = None if secs is not None else args.requests
        load = os.getloadavg()[0]
        label = f"{op_name}.{path}.c{clients}"
        profiling = (
            self.profiler is not None
            and (clients == max(args.clients) or op_name == "embed_throughput")
            and not path.startswith("inproc")
            and label not in self.profiles
        )
        running = self.profiler.start(label) if profiling and self.profiler else []
        before = self.cpu.snapshot()
        lat, errors, elapsed, first_error = await _closed_loop(op, clients, secs, reqs)
        cpu = _cpu_delta(before, self.cpu.snapshot()) if before else {}
        if running:
            self.profiles[label] = Profiler.stop(running)
        n = len(lat)
        arr = np.asarray(lat) if lat else np.asarray([float("nan")])
        result = Result(
            name=name,
            op=op_name,
            path=path,
            clients=clients,
            n=n,
            errors=errors,
            p50_ms=round(float(np.percentile(arr, 50)), 2),
            p99_ms=round(float(np.percentile(arr, 99)), 2),
            mean_ms=round(float(arr.mean()), 2),
            per_s=round(n / elapsed, 1),
            items_per_s=round(n * items / elapsed, 1),
            seconds=round(elapsed, 2),
            loadavg_1m=round(load, 2),
            cpu_ms_per_req={k: round(v * 1000 / max(n, 1), 2) for k, v in cpu.items()},
            cpu_cores={k: round(v / elapsed, 2) for k, v in cpu.items()},
            first_error=first_error,
        )
        self.results.append(result)
        print(
            f"  {name:34s} c={clients:<3d} n={n:<6d} p50={result.p50_ms:8.2f} ms "
            f"p99={result.p99_ms:8.2f} ms  {result.per_s:8.1f}/s"
            + (f"  items {result.items_per_s:.0f}/s" if items != 1 else "")
            + (f"  ERRORS {errors}: {first_error}" if errors else ""),
            flush=True,
        )
        return result


# --------------------------------------------------------------------------- HTTP clients
@dataclass
class LeanResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:200]}")


class LeanClient:
    """A minimal HTTP/1.1 keep-alive client on one connection (``--client lean``).

    The load generator shares the machine's cores with the service: httpx spent about 1 ms of
    CPU per request here, as much as a whole in-process cached search, all of it charged to
    the HTTP side of every ratio. This one writes each request with one ``write`` and reads
    the status line, the headers and a ``Content-Length`` (or chunked) body; the API's
    answers need no more. Same interface as the part of ``httpx.AsyncClient`` used here.
    """

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.fixed = (
            f"Host: {self.host}:{self.port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _request(self, method: str, path: str, body: bytes | None) -> LeanResponse:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.fixed
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self.writer.write(head + b"\r\n" + (body or b""))
        status_line, _, header_block = (await self.reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size + 2))
            await self.reader.readuntil(b"\r\n")
            content = b"".join(part[:-2] for part in parts)
        else:
            content = await self.reader.readexactly(length or 0)
        if close:
            await self.aclose()
        return LeanResponse(status, content)

    async def get(self, path: str) -> LeanResponse:
        return await self._request("GET", path, None)

    async def post(self, path: str, *, json: Any) -> LeanResponse:
        return await self._request("POST", path, _dumps(json))

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- setup


async def _fresh_database(server: Any, database: str, dimension: int) -> str:
    import asyncpg

    from halldyll_ray.storage.embedded import create_database_if_missing
    from halldyll_ray.storage.migrate import apply_migrations

    url = await server.start_async()
    conn = await asyncpg.connect(server.admin_url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
    await create_database_if_missing(server.admin_url(), database)
    await apply_migrations(url, embedding_dimension=dimension)
    return str(url)


async def _bootstrap(settings: Any, texts: Texts, memories: int) -> dict[str, Any]:
    from halldyll_ray.engine import MemoryEngine
    from halldyll_ray.models import Fact

    async with MemoryEngine(settings) as engine:
        admin = await engine.create_user("bench-admin", None, "admin")
        await engine.create_api_key(admin.id, name="bench")
        user = await engine.create_user("bench-user", None, "user")
        key = (await engine.create_api_key(user.id, name="bench")).key
        started = time.perf_counter()
        stored = merged = 0
        while stored < memories:
            # Template facts that differ in one slot can be near-duplicates, which the engine
            # merges (reinforces) rather than adds: top up until the user has ``memories`` rows.
            statements = [texts.fact() for _ in range(memories - stored)]
            await engine.embed(statements)  # one batched encode; store_memory hits the cache
            for statement in statements:
                i = stored + merged
                memory = await engine.store_memory(
                    user.id,
                    Fact(
                        statement=statement, tags=[f"topic{i % 7}"], importance=0.3 + (i % 5) / 10
                    ),
                )
                if memory.reinforcement_count > 0:
                    merged += 1
                else:
                    stored += 1
        return {
            "user_id": str(user.id),
            "key": key,
            "memories": stored,
            "merged": merged,
            "seconds": round(time.perf_counter() - started, 1),
        }


class TraceSink:
    """An OTLP/HTTP endpoint that accepts every export and counts requests and bytes."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from halldyll_ray.serve_local import free_port

        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(size)
                sink.requests += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _start_serve(
    settings_env: dict[str, str],
    replica_env: dict[str, str] | None = None,
    *,
    app_args: dict[str, Any] | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, Any]:
    import ray
    from ray import serve

    from halldyll_ray.serve import build_app, with_options
    from halldyll_ray.serve_local import free_port

    port = free_port()
    ray.init(
        address="local",
        num_cpus=8,  # logical: six single-replica deployments on a small machine, as the tests
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0", **(replica_env or {})}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({**(app_args or {}), "settings": settings_env})
    names = ("Ingress", "Search", "Ingestion", "Context", "Embedding", "EmbeddedDatabase")
    for name, options in (deployment_options or {}).items():
        app = with_options(app, keep=[n for n in names if n != name], **options)
    handle = serve.run(app, name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", handle


# --------------------------------------------------------------------------- the scenarios
async def scenarios(
    bench: Bench, url: str, ingress: Any, settings: Any, boot: dict[str, Any], texts: Texts
) -> dict[str, Any]:
    import httpx
    from ray import serve

    from halldyll_ray.embedding import OnnxEncoder
    from halldyll_ray.engine import MemoryEngine
    from halldyll_ray.models import Fact
    from halldyll_ray.schemas import SearchRequest

    args = bench.args
    key = boot["key"]
    headers = {"Authorization": f"Bearer {key}"}
    most = max(args.clients)
    http: list[Any] = [
        LeanClient(url, headers)
        if args.client == "lean"
        else httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=60,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        for _ in range(most)
    ]
    from halldyll_ray.serve import deployments

    # Called as the app's own replicas call them (deployments.pickled: the standard library's
    # pickle on the hop; a checkout without it uses Serve's default, cloudpickle).
    as_the_app_calls = getattr(deployments, "pickled", lambda handle: handle)
    search_h = as_the_app_calls(serve.get_deployment_handle("Search", app_name=APP))
    embed_h = as_the_app_calls(serve.get_deployment_handle("Embedding", app_name=APP))
    engine = await MemoryEngine(settings).initialize(migrate=False)
    encoder: OnnxEncoder = engine.encoder  # type: ignore[assignment]
    principal = await engine.authenticate(key)

    # Serve replicas build their engines lazily: make sure all are up before timing.
    for _ in range(120):
        r = await http[0].get("/readyz")
        if r.status_code == 200:
            break
        await asyncio.sleep(1)
    r.raise_for_status()

    jitter = itertools.count()
    q_emb = "where do I keep my passport and the spare keys"
    q_full = "is Anna allergic to anything"

    async def post(w: int, path: str, body: dict[str, Any], status: int = 200) -> None:
        r = await http[w].post(path, json=body)
        if r.status_code != status:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    def threshold() -> float:
        return 0.2 - (next(jitter) % 1_000_000) * 1e-8

    async def inproc_search(query: str, auth: bool = True, **kw: Any) -> None:
        who = await engine.authenticate(key) if auth else principal
        await engine.authorized(who).search(None, query, **kw)

    async def raw_one(_: int) -> None:
        await asyncio.to_thread(encoder.encode, [texts.query()])

    async def healthz(w: int) -> None:
        r = await http[w].get("/healthz")
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")

    search_path = "/v1/users/me/search"
    search_ops: list[tuple[str, str, str, Op]] = [
        ("healthz", "healthz", "http", healthz),
        (
            "search uncached",
            "search_uncached",
            "http",
            lambda w: post(w, search_path, {"query": texts.query()}),
        ),
        (
            "search uncached",
            "search_uncached",
            "inproc",
            lambda w: inproc_search(texts.query()),
        ),
        (
            "search emb_cached",
            "search_emb_cached",
            "http",
            lambda w: post(w, search_path, {"query": q_emb, "threshold": threshold()}),
        ),
        (
            "search emb_cached",
            "search_emb_cached",
            "inproc",
            lambda w: inproc_search(q_emb, threshold=threshold()),
        ),
        (
            "search emb_cached (no auth)",
            "search_emb_cached",
            "inproc_noauth",
            lambda w: inproc_search(q_emb, auth=False, threshold=threshold()),
        ),
        (
            "search emb_cached",
            "search_emb_cached",
            "handle_search",
            lambda w: search_h.search.remote(
                principal,
                SearchRequest(query=q_emb, threshold=threshold()),
                user_id=None,
                request_id=None,
            ),
        ),
        (
            "search emb_cached",
            "search_emb_cached",
            "handle_ingress",
            lambda w: ingress.handle_search.remote(key, None, q_emb, threshold=threshold()),
        ),
        (
            "search full_cached",
            "search_full_cached",
            "http",
            lambda w: post(w, search_path, {"query": q_full}),
        ),
        (
            "search full_cached",
            "search_full_cached",
            "inproc",
            lambda w: inproc_search(q_full),
        ),
        (
            "embed 1 text",
            "embed_one",
            "handle_embedding",
            lambda w: embed_h.embed.remote([texts.query()]),
        ),
        ("embed 1 text", "embed_one", "inproc_raw", raw_one),
    ]

    merges = {"http": [0, 0], "inproc": [0, 0]}  # [stores, merged into an existing fact]

    async def inproc_store(_: int) -> None:
        who = await engine.authenticate(key)
        stored = await engine.authorized(who).store_memory(None, Fact(statement=texts.fact()))
        merges["inproc"][0] += 1
        merges["inproc"][1] += stored.reinforcement_count > 0

    async def http_store(w: int) -> None:
        body = {"type": "fact", "statement": texts.fact()}
        r = await http[w].post("/v1/users/me/memories", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        merges["http"][0] += 1
        merges["http"][1] += r.json().get("reinforcement_count", 0) > 0

    store_ops: list[tuple[str, str, str, Op]] = [
        ("store fact", "store", "http", http_store),
        ("store fact", "store", "inproc", inproc_store),
    ]

    extra: dict[str, Any] = {}
    wanted = set(args.ops)
    try:
        if "embed_throughput" in wanted:
            print("Embedding throughput", flush=True)
            extra["embedding"] = await embedding_throughput(bench, embed_h, encoder, texts)
        for group_name, ops in (("Search", search_ops), ("Store", store_ops)):
            ops = [o for o in ops if o[1] in wanted]
            for clients in args.clients if ops else ():
                for k in range(1, args.rounds + 1):
                    tag = f" (round {k})" if args.rounds > 1 else ""
                    print(f"{group_name}, {clients} client(s){tag}", flush=True)
                    for name, op_name, path, op in ops:
                        await bench.run(name + tag, op_name, path, clients, op)
        if "store" in wanted:
            extra["store_merges"] = {
                path: {"stores": n, "merged_into_existing_fact": m}
                for path, (n, m) in merges.items()
            }
        if args.diagnose_max_ongoing:
            extra["diagnosis"] = await diagnose_max_ongoing(
                bench, url, ingress, search_ops, args.diagnose_max_ongoing
            )
        stats = await embed_h.stats.remote()
        sizes = stats["batch_sizes"]
        extra["embedding_batch_sizes_whole_run"] = {
            "batches": len(sizes),
            "mean": round(float(np.mean(sizes)), 2) if sizes else None,
            "max": max(sizes) if sizes else None,
        }
    finally:
        await engine.close()
        for client in http:
            await client.aclose()
    return extra


async def diagnose_max_ongoing(
    bench: Bench, url: str, ingress: Any, search_ops: list[Any], value: int
) -> dict[str, Any]:
    """Redeploy with a higher max_ongoing_requests and rerun the HTTP searches at most clients.

    A configuration change for diagnosis only (the product's defaults are what the main
    figures measure): it shows whether 16 clients are limited by CPU or by Serve's
    concurrency cap of 5 requests per replica.
    """
    from ray import serve

    from halldyll_ray.serve import build_app, with_options

    most = max(bench.args.clients)
    print(
        f"Diagnosis: max_ongoing_requests={value} on Ingress/Search/Ingestion/Context", flush=True
    )
    started = time.perf_counter()
    app = with_options(
        build_app({"settings": bench.settings_env}),
        keep=("Embedding", "EmbeddedDatabase"),
        max_ongoing_requests=value,
    )
    await asyncio.to_thread(serve.run, app, name=APP, route_prefix="/")
    redeploy_s = round(time.perf_counter() - started, 1)
    out: dict[str, Any] = {"max_ongoing_requests": value, "redeploy_s": redeploy_s, "rows": []}
    for name, op_name, path, op in search_ops:
        if path != "http" or op_name == "healthz":
            continue
        default = _find(bench.results, op_name, "http", most)
        r = await bench.run(name, op_name, f"http_max_ongoing_{value}", most, op)
        out["rows"].append(
            {
                "op": op_name,
                "clients": most,
                "default_per_s": default.per_s if default else None,
                "default_p50_ms": default.p50_ms if default else None,
                "default_run_cores": default.cpu_cores.get("run") if default else None,
                "per_s": r.per_s,
                "p50_ms": r.p50_ms,
                "run_cores": r.cpu_cores.get("run"),
            }
        )
    return out


async def embedding_throughput(
    bench: Bench, embed_h: Any, encoder: Any, texts: Texts
) -> dict[str, Any]:
    """Embedding deployment (concurrent single-text requests, raw and through a replica's
    merging caller; 32-text requests) vs raw ORT."""
    from halldyll_ray.embedding import MergingCaller
    from halldyll_ray.serve.deployments import REMOTE_EMBEDDING_CALLS

    args = bench.args
    corpus = [texts.fact() if i % 2 else texts.query() for i in range(1024)]
    batch = encoder.batch_size
    cursor = itertools.count()

    def next_text() -> str:
        return corpus[next(cursor) % len(corpus)]

    def next_batch(size: int = batch) -> list[str]:
        start = (next(cursor) * size) % len(corpus)
        return corpus[start : start + size]

    async def raw(_: int) -> None:
        await asyncio.to_thread(encoder.encode, next_batch())

    async def one(_: int) -> None:
        await embed_h.embed.remote([next_text()])

    async def many(_: int) -> None:
        await embed_h.embed.remote(next_batch())

    # What a Search, Ingestion or Context replica does with its one-text requests when they go
    # to Embedding (local_embedding_max_texts 0, GPU clusters): concurrent ones leave merged.
    merged = MergingCaller(
        lambda batch_texts: embed_h.embed.remote(batch_texts),
        max_texts=batch,
        max_calls=REMOTE_EMBEDDING_CALLS,
    )

    async def one_merged(_: int) -> None:
        await merged.encode([next_text()])

    secs = args.seconds or 3.0  # time-based even with --requests (a raw call is 32 texts)
    # Alternating rounds, paired: the machine is shared, so drift between a raw figure and a
    # deployment figure measured a minute apart would otherwise read as a ratio.
    raws: list[Result] = []
    ones: list[Result] = []
    callers: list[Result] = []
    sizes: list[int] = []
    for k in range(max(1, args.embed_rounds)):
        raws.append(
            await bench.run(
                f"raw ORT encode, {batch} texts/call (round {k + 1})",
                "embed_throughput",
                "inproc_raw",
                1,
                raw,
                items=batch,
                seconds=secs,
                warmup=k == 0,
            )
        )
        before = len((await embed_h.stats.remote())["batch_sizes"])
        ones.append(
            await bench.run(
                f"Embedding, 1 text/request (round {k + 1})",
                "embed_throughput",
                "handle_embedding",
                args.embed_concurrency,
                one,
                seconds=secs,
                warmup=k == 0,
            )
        )
        sizes += (await embed_h.stats.remote())["batch_sizes"][before:]
        callers.append(
            await bench.run(
                f"Embedding, 1 text/request from a replica's merging caller (round {k + 1})",
                "embed_throughput",
                "handle_embedding_caller",
                args.embed_concurrency,
                one_merged,
                seconds=secs,
                warmup=k == 0,
            )
        )
    raw_rate = float(np.median([r.items_per_s for r in raws]))
    caller_paired = [c.items_per_s / r.items_per_s for r, c in zip(raws, callers, strict=True)]
    one_rate = float(np.median([r.items_per_s for r in ones]))
    paired = [o.items_per_s / r.items_per_s for r, o in zip(raws, ones, strict=True)]
    mean_batch = float(np.mean(sizes)) if sizes else 1.0
    batch_stats = {
        "batches": len(sizes),
        "mean": round(mean_batch, 2),
        "p50": float(np.percentile(sizes, 50)) if sizes else None,
        "max": max(sizes) if sizes else None,
    }

    def cpu_per_text(results: list[Result], group: str, per: int = 1) -> float:
        return round(float(np.median([r.cpu_ms_per_req.get(group, 0) for r in results])) / per, 2)

    r_many = await bench.run(
        f"Embedding, {batch} texts/request",
        "embed_throughput",
        "handle_embedding_batched",
        2,
        many,
        items=batch,
        seconds=secs,
    )
    # Raw ORT at the mean size of the merged model calls: separates "smaller batches" from
    # "per-request overhead" in the deployment's shortfall.
    small = max(1, round(mean_batch))

    async def raw_small(_: int) -> None:
        await asyncio.to_thread(encoder.encode, next_batch(small))

    r_small = await bench.run(
        f"raw ORT encode, {small} texts/call",
        "embed_throughput",
        "inproc_raw_small",
        1,
        raw_small,
        items=small,
        seconds=secs,
    )
    return {
        "raw_texts_per_s": round(raw_rate, 1),
        "raw_at_call_size_texts_per_s": r_small.items_per_s,
        "raw_at_call_size": small,
        "deployment_1_text_texts_per_s": round(one_rate, 1),
        "deployment_batched_texts_per_s": r_many.items_per_s,
        "ratio_1_text": round(float(np.median(paired)), 3),
        "ratio_1_text_rounds": [round(x, 3) for x in paired],
        "caller_1_text_texts_per_s": round(float(np.median([c.items_per_s for c in callers])), 1),
        "ratio_1_text_caller": round(float(np.median(caller_paired)), 3),
        "ratio_1_text_caller_rounds": [round(x, 3) for x in caller_paired],
        "ratio_batched": round(r_many.items_per_s / raw_rate, 3),
        "requests_per_model_call": batch_stats,
        "concurrency": args.embed_concurrency,
        "rounds": len(raws),
        "cpu_ms_per_text": {
            "raw_batch": cpu_per_text(raws, "run", batch),
            "raw_small_batch": round(r_small.cpu_ms_per_req.get("run", 0) / small, 2),
            "deployment_1_text": cpu_per_text(ones, "run"),
            "caller_1_text": cpu_per_text(callers, "run"),
            "deployment_1_text_embedding_replica": cpu_per_text(ones, "Embedding"),
            "deployment_1_text_driver": cpu_per_text(ones, "driver"),
            "deployment_batched": round(r_many.cpu_ms_per_req.get("run", 0) / batch, 2),
        },
        "spin": ort_spin_check(encoder, texts),
    }


def ort_spin_check(encoder: Any, texts: Texts, n: int = 40, gap_s: float = 0.02) -> dict[str, Any]:
    """CPU per single-text encode at sparse arrivals: the product's session vs no spin-wait.

    onnxruntime's intra-op threads spin-wait after each run by default; between sparse
    requests that burns CPU that the other processes on the machine need. The no-spin
    session (``session.intra_op.allow_spinning = 0``) is built here for comparison only.
    """
    import copy

    import onnxruntime as ort

    from halldyll_ray.embedding import default_model_files

    def measure(enc: Any) -> dict[str, float]:
        for _ in range(5):
            enc.encode([texts.query()])
        items = [texts.query() for _ in range(n)]
        cpu, busy = time.process_time(), 0.0
        for text in items:
            t = time.perf_counter()
            enc.encode([text])
            busy += time.perf_counter() - t
            time.sleep(gap_s)
        return {
            "cpu_ms_per_text": round((time.process_time() - cpu) * 1000 / n, 1),
            "latency_ms_per_text": round(busy * 1000 / n, 1),
        }

    out: dict[str, Any] = {"arrivals": f"{n} single texts, {gap_s * 1000:.0f} ms apart"}
    out["default"] = measure(encoder)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        nospin = copy.copy(encoder)
        model = default_model_files()[0]
        nospin._session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        out["no_spin"] = measure(nospin)
    except Exception as exc:  # diagnostic only
        out["no_spin"] = {"error": str(exc)[:200]}
    print(f"  ORT spin check: {out}", flush=True)
    return out


# --------------------------------------------------------------------------- report
def _all(results: list[Result], op: str, path: str, clients: int) -> list[Result]:
    return [r for r in results if r.op == op and r.path == path and r.clients == clients]


def _find(results: list[Result], op: str, path: str, clients: int) -> Result | None:
    """The scenario's result; with ``--rounds``, the round of median throughput."""
    found = sorted(_all(results, op, path, clients), key=lambda r: r.per_s)
    return found[(len(found) - 1) // 2] if found else None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def analyse(results: list[Result], extra: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    ratios = []
    for c in clients:
        for op in ("search_uncached", "search_emb_cached", "search_full_cached", "store"):
            # Paired by round (HTTP and in-process back to back), medians over the rounds.
            pairs = list(
                zip(_all(results, op, "http", c), _all(results, op, "inproc", c), strict=False)
            )
            if pairs:
                per_round = [_ratio(h.per_s, p.per_s) or 0.0 for h, p in pairs]

                def med(values: list[float]) -> float:
                    return round(float(np.median(values)), 2)

                http_p50 = med([h.p50_ms for h, _ in pairs])
                inproc_p50 = med([p.p50_ms for _, p in pairs])
                ratios.append(
                    {
                        "op": op,
                        "clients": c,
                        "rounds": len(pairs),
                        "http_p50_ms": http_p50,
                        "inproc_p50_ms": inproc_p50,
                        "p50_ratio": _ratio(http_p50, inproc_p50),
                        "http_per_s": med([h.per_s for h, _ in pairs]),
                        "inproc_per_s": med([p.per_s for _, p in pairs]),
                        "throughput_ratio": med(per_round),
                        "throughput_ratio_rounds": per_round,
                    }
                )
    hops = []
    for c in clients:
        ladder = [
            ("in-process, principal given (no auth)", "search_emb_cached", "inproc_noauth"),
            ("in-process, authenticate + search", "search_emb_cached", "inproc"),
            ("Search deployment handle (no auth)", "search_emb_cached", "handle_search"),
            ("Ingress handle_search (auth + Search hop)", "search_emb_cached", "handle_ingress"),
            ("HTTP (HAProxy + FastAPI + auth + Search hop)", "search_emb_cached", "http"),
            ("HTTP GET /healthz (HAProxy + ingress floor)", "healthz", "http"),
            ("raw ORT encode([text]) in a thread", "embed_one", "inproc_raw"),
            ("Embedding handle, one text (serve.batch)", "embed_one", "handle_embedding"),
            ("HTTP search uncached", "search_uncached", "http"),
            ("in-process search uncached", "search_uncached", "inproc"),
        ]
        for label, op, path in ladder:
            r = _find(results, op, path, c)
            if r:
                hops.append({"clients": c, "step": label, "p50_ms": r.p50_ms, "per_s": r.per_s})
    goals: list[dict[str, Any]] = []
    one, most = min(clients), max(clients)
    r = _find(results, "search_uncached", "http", one)
    if r:
        goals.append(
            _goal(
                f"search p50, uncached embedding, HTTP, {one} client",
                r.p50_ms,
                "<=",
                GOALS["search_uncached_p50_ms"],
                "ms",
            )
        )
    for op, label in (
        ("search_emb_cached", "embedding cached, result cache off"),
        ("search_full_cached", "fully cached"),
    ):
        r = _find(results, op, "http", one)
        if r:
            goals.append(
                _goal(
                    f"search p50, {label}, HTTP, {one} client",
                    r.p50_ms,
                    "<=",
                    GOALS["search_cached_p50_ms"],
                    "ms",
                )
            )
    if most >= 16:
        for op in ("search_uncached", "search_emb_cached", "search_full_cached"):
            r = _find(results, op, "http", most)
            if r:
                goals.append(
                    _goal(
                        f"{op} throughput, HTTP, {most} clients",
                        r.per_s,
                        ">=",
                        GOALS["searches_per_s_16_clients"],
                        "req/s",
                    )
                )
    emb = extra.get("embedding")
    if emb:
        goals.append(
            _goal(
                "Embedding deployment / raw ORT (1 text/request, serve.batch)",
                emb["ratio_1_text"],
                ">=",
                GOALS["embedding_vs_raw_ratio"],
                "x",
            )
        )
        goals.append(
            _goal(
                "Embedding deployment / raw ORT (32 texts/request)",
                emb["ratio_batched"],
                ">=",
                GOALS["embedding_vs_raw_ratio"],
                "x",
            )
        )
    return {"ratios": ratios, "hops": hops, "goals": goals}


def _goal(name: str, value: float, cmp: str, target: float, unit: str) -> dict[str, Any]:
    met = value <= target if cmp == "<=" else value >= target
    return {"goal": name, "value": value, "target": f"{cmp} {target:g} {unit}", "met": met}


_CPU_COLS = [
    "driver",
    "proxy",
    "Ingress",
    "Search",
    "Ingestion",
    "Embedding",
    "postgres",
    "redis",
    "controller",
    "raylet_gcs",
    "ray_other",
    "run",
    "other",
]


def findings(
    results: list[Result], extra: dict[str, Any], clients: list[int], cores: int
) -> list[str]:
    """Where the time goes, in sentences computed from the results."""
    notes: list[str] = []
    one, most = min(clients), max(clients)

    def get(op: str, path: str, c: int) -> Result | None:
        return _find(results, op, path, c)

    for c in (one,):  # at 16 clients latencies are mostly queueing; see the CPU notes
        a, b = get("search_emb_cached", "inproc_noauth", c), get("search_emb_cached", "inproc", c)
        hs, hi = (
            get("search_emb_cached", "handle_search", c),
            get("search_emb_cached", "handle_ingress", c),
        )
        h, hz = get("search_emb_cached", "http", c), get("healthz", "http", c)
        if a and b and hs and hi and h and hz:
            notes.append(
                f"emb_cached search, {c} client(s), p50: in-process {a.p50_ms} ms without "
                f"authentication, {b.p50_ms} with it; a handle call to Search {hs.p50_ms} "
                f"(+{hs.p50_ms - a.p50_ms:.1f} for the Serve hop to one replica); Ingress "
                f"handle_search {hi.p50_ms} (+{hi.p50_ms - hs.p50_ms:.1f}: authentication in "
                f"the ingress and a second hop); HTTP {h.p50_ms} (+{h.p50_ms - hi.p50_ms:.1f}: "
                f"HAProxy, FastAPI, JSON). GET /healthz alone: {hz.p50_ms} ms."
            )
    hu, he = get("search_uncached", "http", one), get("search_emb_cached", "http", one)
    eh, er = get("embed_one", "handle_embedding", one), get("embed_one", "inproc_raw", one)
    pu, pe = get("search_uncached", "inproc", one), get("search_emb_cached", "inproc", one)
    if hu and he and eh and er and pu and pe:
        notes.append(
            f"Uncached embedding, {one} client: HTTP search {hu.p50_ms} ms vs {he.p50_ms} with "
            f"the embedding cached (+{hu.p50_ms - he.p50_ms:.1f}); in-process "
            f"+{pu.p50_ms - pe.p50_ms:.1f} (the Search replica encodes a lone query itself: "
            f"local_embedding_max_texts=1). One Embedding handle call with one text: "
            f"{eh.p50_ms} ms p50 vs {er.p50_ms} ms for encode([text]) in this process: the "
            f"hop that local embedding avoids."
        )
    for op in ("search_emb_cached", "search_uncached", "store"):
        h, p = get(op, "http", most), get(op, "inproc", most)
        if not (h and p and h.cpu_ms_per_req and p.cpu_ms_per_req):
            continue
        cpu = h.cpu_ms_per_req
        server = cpu["run"] - cpu.get("driver", 0)
        parts = ", ".join(
            f"{k} {cpu[k]}"
            for k in _CPU_COLS
            if k not in ("driver", "run", "other") and cpu.get(k, 0) >= 0.5
        )
        notes.append(
            f"{op}, {most} client(s): CPU per request on the server side of HTTP "
            f"{server:.1f} ms ({parts}; plus the HTTP client {cpu.get('driver', 0)} ms) vs "
            f"{p.cpu_ms_per_req['run']} ms for the whole in-process request; {cores} cores "
            f"at that cost cap HTTP at about {cores * 1000 / max(server, 1e-9):.0f} req/s "
            f"(measured {h.per_s}; in-process {p.per_s})."
        )
    emb = extra.get("embedding")
    if emb:
        cpt = emb["cpu_ms_per_text"]
        notes.append(
            f"Embedding deployment: {emb['concurrency']} concurrent 1-text requests merged "
            f"into model calls of {emb['requests_per_model_call']['mean']} requests on "
            f"average (max {emb['requests_per_model_call']['max']}); raw ORT at batch "
            f"{emb['raw_at_call_size']} gives {emb['raw_at_call_size_texts_per_s']}"
            f" texts/s vs {emb['raw_texts_per_s']} at 32, the deployment "
            f"{emb['deployment_1_text_texts_per_s']}. CPU per text: deployment "
            f"{cpt['deployment_1_text']} ms (Embedding replica "
            f"{cpt['deployment_1_text_embedding_replica']}, "
            f"calling driver {cpt['deployment_1_text_driver']}) vs raw {cpt['raw_batch']} at "
            f"batch 32; 32-text requests: {cpt['deployment_batched']} ms per text, ratio "
            f"{emb['ratio_batched']}."
        )
        spin = emb.get("spin", {})
        if "cpu_ms_per_text" in spin.get("no_spin", {}):
            notes.append(
                f"onnxruntime spin-wait ({spin['arrivals']}): the product's session costs "
                f"{spin['default']['cpu_ms_per_text']} ms CPU per text for "
                f"{spin['default']['latency_ms_per_text']} ms latency; with "
                f"session.intra_op.allow_spinning=0, {spin['no_spin']['cpu_ms_per_text']} ms "
                f"CPU for {spin['no_spin']['latency_ms_per_text']} ms. On a shared box the "
                "spinning threads take CPU from the proxy, the replicas and PostgreSQL."
            )
    diag = extra.get("diagnosis")
    if diag:
        rows = "; ".join(
            f"{r['op']} {r['default_per_s']} -> {r['per_s']} req/s (p50 {r['default_p50_ms']} "
            f"-> {r['p50_ms']} ms; this run's CPU use {r['default_run_cores']} -> "
            f"{r['run_cores']} cores)"
            for r in diag["rows"]
        )
        notes.append(
            f"Diagnosis at {most} clients, HTTP, with max_ongoing_requests="
            f"{diag['max_ongoing_requests']} on Ingress, Search, Ingestion and Context "
            f"(redeployed for this measurement only): {rows}."
        )
    merges = extra.get("store_merges")
    if merges:
        notes.append(
            "Stores that merged into an existing near-duplicate fact instead of adding one "
            "(warm-up included): "
            + ", ".join(
                f"{path} {m['merged_into_existing_fact']} of {m['stores']}"
                for path, m in merges.items()
            )
            + "."
        )
    others = [r.cpu_cores.get("other", 0.0) for r in results if r.cpu_cores]
    if others:
        notes.append(
            f"Other work on the machine used {np.mean(others):.2f} cores on average during the "
            f"timed runs (max {max(others):.2f} of {cores}); HTTP and in-process runs of one "
            "operation ran back to back, so compare them with each other rather than with "
            "another day's figures."
        )
    return notes


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Ray Serve end to end (`benchmarks/serve_http.py`)",
        "",
        f"Date {doc['date']}; {m['cpu']} x{m['cpu_count']}, {m['ram_gib']} GiB RAM, "
        f"{m['platform']}; Python {m['python']}, Ray {m['ray']}, onnxruntime {m['onnxruntime']}; "
        f"load average at start {m['loadavg_start']}, end {m.get('loadavg_end')} (shared "
        f"machine); a 10**6-iteration Python loop takes {m['python_loop_1e6_ms']} ms here. "
        f"Total run {doc.get('total_seconds')} s.",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Tracing: {doc['args'].get('tracing', 'off')}"
        + (
            f" (every request; {doc['tracing']['exports']} OTLP exports, "
            f"{doc['tracing']['bytes']} bytes, to a sink in this process)"
            if "tracing" in doc
            else ""
        )
        + ".",
        "",
        "Ray environment: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(doc.get("ray_environment", {}).items()))
        + (
            f"; build_app arguments {doc['args']['app_args']}"
            if doc["args"].get("app_args", "{}") != "{}"
            else ""
        )
        + (
            f"; deployment options {doc['args']['deployment_options']}"
            if doc["args"].get("deployment_options", "{}") != "{}"
            else ""
        )
        + ".",
        "",
        f"Data: {doc['bootstrap']['memories']} facts for one user "
        f"(plus {doc['bootstrap']['merged']} generated ones merged as near-duplicates), "
        "embedded PostgreSQL, "
        "Redis cache; `build_app` defaults (one replica per deployment, max_ongoing_requests "
        "32, Embedding 64, DB_POOL_SIZE 5, Embedding batch 32 / no wait, single texts "
        "embedded in the calling replica; Ray Serve's throughput-optimized mode with HAProxy). "
        "Closed loop: each "
        "client sends its next request when the last one returns; HTTP client: "
        + ("httpx" if doc["args"].get("client") == "httpx" else "the lean keep-alive client")
        + (f"; {doc['args']['rounds']} rounds" if doc["args"].get("rounds", 1) > 1 else "")
        + ". `inproc` = "
        "`authenticate(key)` + `engine.authorized(principal).<op>` in this process, same "
        "database and Redis.",
        "",
        "## All scenarios",
        "",
        "| scenario | path | clients | n | p50 ms | p99 ms | mean ms | req/s | items/s | "
        "errors | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['name']} | {r['path']} | {r['clients']} | {r['n']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['mean_ms']} | {r['per_s']} | {r['items_per_s']} | "
            f"{r['errors']} | {r['cpu_cores'].get('other', '')} |"
        )
    lines += [
        "",
        "## HTTP vs in-process",
        "",
        "| op | clients | HTTP p50 | in-proc p50 | p50 ratio | HTTP req/s | in-proc req/s | "
        "throughput ratio | per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["analysis"]["ratios"]:
        rounds = r.get("throughput_ratio_rounds", [])
        lines.append(
            f"| {r['op']} | {r['clients']} | {r['http_p50_ms']} | {r['inproc_p50_ms']} | "
            f"{r['p50_ratio']} | {r['http_per_s']} | {r['inproc_per_s']} | "
            f"{r['throughput_ratio']} | {', '.join(map(str, rounds)) if len(rounds) > 1 else ''} |"
        )
    emb = doc["extra"].get("embedding")
    if emb:
        lines += [
            "",
            "## Embedding deployment vs raw ONNX Runtime",
            "",
            f"Medians of {emb['rounds']} alternating rounds. Raw `OnnxEncoder.encode` (batches "
            f"of 32, this process): {emb['raw_texts_per_s']} texts/s. Embedding deployment, "
            f"{emb['concurrency']} concurrent 1-text handle calls: "
            f"{emb['deployment_1_text_texts_per_s']} texts/s (paired ratio "
            f"{emb['ratio_1_text']}, rounds {emb['ratio_1_text_rounds']}; requests per model call "
            f"{emb['requests_per_model_call']}). 32-text "
            f"requests, 2 concurrent: {emb['deployment_batched_texts_per_s']} texts/s (ratio "
            f"{emb['ratio_batched']}). Raw at batch {emb['raw_at_call_size']} (the "
            f"mean requests per model call): {emb['raw_at_call_size_texts_per_s']} texts/s. "
            f"The same {emb['concurrency']} 1-text requests through a replica's merging caller "
            f"(`MergingCaller`, how Search, Ingestion and Context send them): "
            f"{emb.get('caller_1_text_texts_per_s')} texts/s (paired ratio "
            f"{emb.get('ratio_1_text_caller')}, rounds {emb.get('ratio_1_text_caller_rounds')}). "
            f"CPU per text, all processes (medians): raw {emb['cpu_ms_per_text']['raw_batch']} "
            f"ms, one request each {emb['cpu_ms_per_text']['deployment_1_text']} ms, through "
            f"the merging caller {emb['cpu_ms_per_text'].get('caller_1_text')} ms.",
        ]
    lines += [
        "",
        "## Hops (p50 ms)",
        "",
        "| clients | step | p50 ms | req/s |",
        "|---:|---|---:|---:|",
    ]
    for h in doc["analysis"]["hops"]:
        lines.append(f"| {h['clients']} | {h['step']} | {h['p50_ms']} | {h['per_s']} |")
    lines += [
        "",
        "## CPU time per request by process (ms; `run` = all of this run's processes, "
        "`other` = the rest of the machine; `driver` = this process: the HTTP clients, "
        "or the in-process engine)",
        "",
        "| scenario | path | clients | " + " | ".join(_CPU_COLS) + " |",
        "|---|---|---:|" + "---:|" * len(_CPU_COLS),
    ]
    for r in doc["results"]:
        cpu = r["cpu_ms_per_req"]
        if cpu:
            lines.append(
                f"| {r['name']} | {r['path']} | {r['clients']} | "
                + " | ".join(str(cpu.get(c, 0)) for c in _CPU_COLS)
                + " |"
            )
    diag = doc["extra"].get("diagnosis")
    if diag:
        lines += [
            "",
            f"## Diagnosis: max_ongoing_requests={diag['max_ongoing_requests']} (config only, "
            f"redeployed in {diag['redeploy_s']} s)",
            "",
            "| op | clients | default req/s | diag req/s | default p50 | diag p50 | "
            "default CPU cores | diag CPU cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in diag["rows"]:
            lines.append(
                f"| {r['op']} | {r['clients']} | {r['default_per_s']} | {r['per_s']} | "
                f"{r['default_p50_ms']} | {r['p50_ms']} | {r['default_run_cores']} | "
                f"{r['run_cores']} |"
            )
    if doc.get("profiles"):
        lines += [
            "",
            "## Profiles (py-spy, share of each replica's samples)",
            "",
            f"`--profile`: py-spy at {doc['args'].get('profile_rate')} samples/s on each "
            "replica while the scenario ran, samples holding the GIL (its CPU is in this run's "
            "figures). Self: the innermost Python frame; inclusive: anywhere on the stack; "
            "packages: of the innermost frame.",
        ]
        for label, by_group in doc["profiles"].items():
            for group, prof in by_group.items():
                if not prof.get("samples"):
                    continue
                lines += [
                    "",
                    f"### {label} - {group} ({prof['samples']} samples)",
                    "",
                    "packages: "
                    + ", ".join(f"{name} {share:.0%}" for name, share in prof["packages"]),
                    "",
                    "| function (self) | share | function (inclusive) | share |",
                    "|---|---:|---|---:|",
                ]
                selfs, incl = prof["self"], prof["inclusive"]
                for i in range(max(len(selfs), len(incl))):
                    a = f"`{selfs[i][0]}` | {selfs[i][1]:.1%}" if i < len(selfs) else " | "
                    b = f"`{incl[i][0]}` | {incl[i][1]:.1%}" if i < len(incl) else " | "
                    lines.append(f"| {a} | {b} |")
    lines += ["", "## Goals", "", "| goal | value | target | met |", "|---|---:|---|---|"]
    for g in doc["analysis"]["goals"]:
        lines.append(
            f"| {g['goal']} | {g['value']} | {g['target']} | {'yes' if g['met'] else 'NO'} |"
        )
    if doc.get("notes"):
        lines += ["", "## Findings", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--seconds", type=float, default=3.0, help="timed seconds per scenario")
    load.add_argument("--requests", type=int, help="timed requests per scenario instead")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per scenario")
    parser.add_argument("--memories", type=int, default=500, help="facts stored before timing")
    parser.add_argument("--embed-concurrency", type=int, default=64)
    parser.add_argument(
        "--embed-rounds", type=int, default=3, help="alternating raw/deployment rounds (median)"
    )
    parser.add_argument(
        "--diagnose-max-ongoing",
        type=int,
        default=0,
        help="afterwards, redeploy with this max_ongoing_requests and rerun the HTTP searches "
        "at the most clients (0: skip)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="the HTTP load generator: a minimal keep-alive client (default), or httpx "
        "(about 1 ms of CPU per request on the machine it measures)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each client count's scenarios this many times in turn; HTTP / in-process "
        "ratios are the medians of the rounds' paired ratios",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=OPS,
        default=list(OPS),
        help="the operations to measure (default: all); HTTP and in-process run for each",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run py-spy on each Serve replica during every served scenario at the most "
        "clients (and the Embedding throughput rounds); collapsed stacks go to DIR and a "
        "summary to the results. py-spy's own CPU perturbs the figures of such a run",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument(
        "--app-args",
        default="{}",
        help="JSON: build_app arguments over its defaults (a Serve option to measure)",
    )
    parser.add_argument(
        "--deployment-options",
        default="{}",
        help='JSON: Serve deployment options by deployment name, e.g. \'{"Embedding": '
        '{"logging_config": {"enable_access_log": false}}}\' (a Serve option to measure)',
    )
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="the niceness of Ray's workers (Ray's own default is 15): 0 puts the replicas at "
        "this process's priority, so outside load on a shared machine weighs on the HTTP and "
        "the in-process figures alike",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/hr-bench-http"))
    parser.add_argument("--database", default="bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_http.json")
    parser.add_argument(
        "--tracing",
        choices=("off", "on"),
        default="off",
        help="on: every replica traces every request and exports it over OTLP/HTTP to a sink "
        "in this process",
    )
    args = parser.parse_args()
    if args.requests:
        args.seconds = None
    warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR warning and the like
    logging.basicConfig(level=logging.WARNING)
    from halldyll_ray import serve_env

    # The product's Serve environment (HAProxy, direct ingress, gRPC between deployments),
    # before anything imports Ray; a quick shutdown instead of the 30 s ingress drain.
    serve_env.apply()
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    # Ray starts its workers (the replicas, and HAProxy under them) at nice 15, below this
    # process (the HTTP clients and the in-process engine) and PostgreSQL: on a machine shared
    # with other work, that work takes the CPU from the replicas only, which reads as HTTP's
    # cost. Ray's own variable name is lower case.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112
    ray_environment = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("RAY_SERVE_") or k == "RAY_worker_niceness"
    }

    from halldyll_ray.config import Settings
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    started = time.perf_counter()
    doc: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ray_environment": ray_environment,
    }
    prefix = f"bench-http-{uuid.uuid4().hex[:8]}"
    server = EmbeddedPostgres(args.data_dir, database=args.database)
    texts = Texts(args.seed)
    bench = Bench(args, CpuMeter(args.data_dir / "pgdata"))
    if args.profile:
        bench.profiler = Profiler(args.profile, bench.cpu, args.profile_rate)
    serve_started = False
    try:
        print("Starting PostgreSQL, bootstrapping data", flush=True)
        db_url = asyncio.run(_fresh_database(server, args.database, 384))
        env = {"DATABASE_URL": db_url, "REDIS_URL": args.redis_url, "REDIS_KEY_PREFIX": prefix}
        settings = Settings.from_env(**{k.lower(): v for k, v in env.items()})
        boot = asyncio.run(_bootstrap(settings, texts, args.memories))
        print(f"  {boot['memories']} facts stored in {boot['seconds']} s", flush=True)
        doc["bootstrap"] = {k: v for k, v in boot.items() if k != "key"}
        print("Starting Ray Serve", flush=True)
        t = time.perf_counter()
        serve_started = True
        bench.settings_env = env
        sink = TraceSink() if args.tracing == "on" else None
        replica_env = {}
        if sink is not None:
            replica_env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
                "OTEL_SERVICE_NAME": "halldyll-bench",
            }
        url, ingress = _start_serve(
            env,
            replica_env,
            app_args=json.loads(args.app_args),
            deployment_options=json.loads(args.deployment_options),
        )
        doc["serve_start_s"] = round(time.perf_counter() - t, 1)
        extra = asyncio.run(scenarios(bench, url, ingress, settings, boot, texts))
        doc["extra"] = extra
        if sink is not None:
            doc["tracing"] = {"exports": sink.requests, "bytes": sink.bytes}
    finally:
        if serve_started:
            import ray
            from ray import serve

            # With the router on the caller's loop (RAY_SERVE_THROUGHPUT_OPTIMIZED), the
            # driver's handles belong to the asyncio.run loop that has already closed.
            with contextlib.suppress(RuntimeError):
                serve.shutdown()
            ray.shutdown()
        server.stop()
        try:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
            client.close()
        except Exception as exc:  # cleanup only
            print(f"redis cleanup failed: {exc}", file=sys.stderr)
    doc["results"] = [asdict(r) for r in bench.results]
    if bench.profiles:
        doc["profiles"] = bench.profiles
    doc["analysis"] = analyse(bench.results, doc.get("extra", {}), args.clients)
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    doc["notes"] = findings(bench.results, doc.get("extra", {}), args.clients, os.cpu_count() or 1)
    md = markdown(doc)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {doc['total_seconds']} s")


if __name__ == "__main__":
    main()
