"""A multi-node Ray cluster on this machine, with the RayService's application deployed on it.

One cluster for the session (its own pytest run: scripts/test.sh runs this tier after the main
one, which starts a single-node Ray of its own). The nodes are the pods of
``kuberay/rayservice.yaml`` (``halldyll_ray.serve.local_cluster``): a head that offers no CPU,
the GPU group's pod (a logical GPU and ``embedding_gpu``, no CPU), and three CPU group pods;
CPUs times 1/3 on both sides, so a pod holds as many replicas as in Kubernetes. The
application is the RayService's ``serveConfigV2``, deployed through the Serve controller as
KubeRay does, with this session's database and Redis, the CPU embedding provider, one
HTTP proxy on the head, and Search's autoscaling delays shortened (``SEARCH_SCALING``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from support import free_port, scratch_database

from halldyll_ray import MemoryEngine, Settings
from halldyll_ray.serve import local_cluster

APP = "halldyll"
CPU_SCALE = 1 / 3
CPU_PODS = 3  # the group's minimum is 2: one more, so a lost pod's replicas fit elsewhere
# Search reacts in seconds instead of Serve's 30 s up / 600 s down, so the autoscaling test
# fits a short load step (bounds and target stay the RayService's).
SEARCH_SCALING = {"upscale_delay_s": 2, "downscale_delay_s": 6, "look_back_period_s": 5}


@dataclass
class ClusterApp:
    url: str
    cluster: Any  # ray.cluster_utils.Cluster
    gpu_node: Any  # ray._private.node.Node
    cpu_nodes: list[Any]
    head_node_id: str
    settings: dict[str, str]
    config: dict[str, Any]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster_db(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    async with scratch_database(pg_admin_url, template=template_db, prefix="cluster") as url:
        yield url


@pytest.fixture(scope="session")
def ray_cluster(cluster_db: str, redis_url: str) -> Iterator[ClusterApp]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    for name in (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    ):
        os.environ.setdefault(name, str(free_port()))
    rayservice = local_cluster.load_rayservice()
    shapes = local_cluster.node_shapes(rayservice, cpu_scale=CPU_SCALE)

    def node_args(shape: local_cluster.NodeShape) -> dict[str, Any]:
        return {
            "num_cpus": shape.num_cpus,
            "num_gpus": shape.num_gpus,
            "resources": shape.resources,
            "object_store_memory": 100 * 1024 * 1024,
        }

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args(shapes["head"]),
            "gcs_server_port": free_port(),
            # The dashboard: Ray's state API (list_actors, where each replica runs) needs it.
            "include_dashboard": True,
            "dashboard_port": free_port(),
            # A killed node is found dead after ~3 s of failed health checks (default ~15 s).
            "_system_config": {
                "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    try:
        gpu_node = cluster.add_node(**node_args(shapes["gpu"]))
        cpu_nodes = [cluster.add_node(**node_args(shapes["cpu"])) for _ in range(CPU_PODS)]
        ray.init(address=cluster.address, log_to_driver=False)
        settings = {
            "DATABASE_URL": cluster_db,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": f"cluster-{uuid.uuid4().hex[:8]}",
            "DB_POOL_SIZE": "3",
        }
        port = free_port()
        config = local_cluster.cluster_serve_config(
            rayservice,
            settings=settings,
            port=port,
            cpu_scale=CPU_SCALE,
            deployment_overrides={"Search": {"autoscaling_config": SEARCH_SCALING}},
        )
        local_cluster.deploy(config)
        yield ClusterApp(
            url=f"http://127.0.0.1:{port}",
            cluster=cluster,
            gpu_node=gpu_node,
            cpu_nodes=cpu_nodes,
            head_node_id=cluster.head_node.node_id,
            settings=settings,
            config=config,
        )
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def admin_key(ray_cluster: ClusterApp, encoder: Any) -> str:
    """The first Admin, bootstrapped directly in the database (as `halldyll create-user`)."""
    env = {k.lower(): v for k, v in ray_cluster.settings.items()}
    async with MemoryEngine(Settings.from_env(**env), encoder=encoder) as engine:
        admin = await engine.create_user(f"root{uuid.uuid4().hex[:6]}", None, "admin")
        return (await engine.create_api_key(admin.id)).key


@pytest_asyncio.fixture(loop_scope="session")
async def http(ray_cluster: ClusterApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=ray_cluster.url, timeout=60) as client:
        yield client
