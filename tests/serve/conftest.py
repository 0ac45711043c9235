"""One Ray instance and one Serve application for the whole serve test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from support import free_port, scratch_database

from halldyll_ray import MemoryEngine, Settings


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def serve_db(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    async with scratch_database(pg_admin_url, template=template_db, prefix="serve") as url:
        yield url


@pytest.fixture(scope="session")
def ray_serve(serve_db: str, redis_url: str) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from halldyll_ray.serve import build_app

    port, metrics_port = free_port(), free_port()
    # HAProxy's stats and metrics ports and the fallback proxy's are fixed by default (8404, 9101,
    # 8500): free ones, so this session does not collide with another app on this machine.
    for name in (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    ):
        os.environ.setdefault(name, str(free_port()))
    # Logical CPUs: six deployments of one replica each on a 2-core machine. A Ray of its own
    # (address="local"): without it, ray.init() joins the newest cluster `ray start` or
    # another run's tests/cluster started on this machine, and refuses num_cpus there.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,  # the node's Prometheus endpoint, scraped by a test
        runtime_env={"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "DATABASE_URL": serve_db,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"serve-{uuid.uuid4().hex[:8]}",
        "DB_POOL_SIZE": "3",
        "EVENTS_KEEPALIVE_SECONDS": "1",  # tests/serve/test_events_http.py waits for one,
        "EVENTS_RECHECK_SECONDS": "1",  # and for a revoked key to end a stream
        "EVENTS_MAX_STREAMS": "4",  # and for the 503 past the limit
    }
    app = build_app(
        {
            "settings": settings,
            "max_body_bytes": 200_000,
            "body_timeout_s": 2,
            "embedding_batch_wait_timeout_s": 0.02,
        }
    )
    handle = serve.run(app, name="halldyll", route_prefix="/")
    yield {
        "url": f"http://127.0.0.1:{port}",
        "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
        "handle": handle,
        "settings": settings,
    }
    serve.shutdown()
    ray.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def admin_key(ray_serve: dict[str, Any], encoder) -> str:
    """The first Admin, bootstrapped directly in the database (as `halldyll create-user`)."""
    env = {k.lower(): v for k, v in ray_serve["settings"].items()}
    async with MemoryEngine(Settings.from_env(**env), encoder=encoder) as engine:
        admin = await engine.create_user(f"root{uuid.uuid4().hex[:6]}", None, "admin")
        return (await engine.create_api_key(admin.id)).key


@pytest_asyncio.fixture(loop_scope="session")
async def http(ray_serve: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ray_serve["url"], timeout=60) as client:
        yield client


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
