"""The KubeRay RayService's application on a multi-node Ray cluster on one machine.

What ``tests/cluster`` and ``benchmarks/autoscaling.py`` run: Ray's ``cluster_utils.Cluster``
with one Ray node per pod of ``kuberay/rayservice.yaml`` (the head, the GPU group's pod with
its custom resource ``embedding_gpu``, some CPU group pods), each offering what the pod's
``rayStartParams`` offer, times a CPU scale; and the RayService's own ``serveConfigV2``,
deployed the way KubeRay deploys it (the Serve controller builds the application from
``import_path`` and applies each deployment's options), with only what one machine needs
changed: every ``num_cpus`` times the same scale, the database and Redis URLs, the CPU
embedding provider, and one HTTP proxy on the head.

On a 2-core machine the scale is 1/3: a CPU pod's 3 logical CPUs become 1, and a CPU replica's
1 CPU becomes 1/3, so pods hold as many replicas as in Kubernetes while the whole cluster asks
for a few logical CPUs. The GPU pod keeps its logical GPU (``num_gpus: 1`` still places the
replica) but Embedding runs on the CPU (``EMBEDDING_PROVIDER=cpu``).

Ray's import is deferred to the functions that start or query Ray.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from halldyll_ray.errors import ConfigurationError

#: The generated RayService, in a source checkout (scripts/render_kuberay.py writes it).
RAYSERVICE = Path(__file__).resolve().parents[2] / "kuberay" / "rayservice.yaml"
#: The custom resource only the GPU group's pods offer (and Embedding asks for).
GPU_RESOURCE = "embedding_gpu"


@dataclass(frozen=True)
class NodeShape:
    """What one Ray node offers: logical CPUs and GPUs, and custom resources."""

    group: str
    num_cpus: float
    num_gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)


def load_rayservice(path: Path = RAYSERVICE) -> dict[str, Any]:
    """The RayService manifest (one YAML document).

    Raises:
        ConfigurationError: The file is missing (not a source checkout) or is not a RayService.
    """
    if not path.exists():
        raise ConfigurationError(f"no RayService manifest at {path}", path=str(path))
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "RayService":
        raise ConfigurationError(f"{path} is not a RayService", path=str(path))
    return doc


def _scaled(value: float, scale: float) -> float:
    # Ray keeps resources to 1e-4; three replicas of a third must fit one CPU.
    return float(int(value * scale * 10_000) / 10_000)


def node_shapes(rayservice: dict[str, Any], *, cpu_scale: float) -> dict[str, NodeShape]:
    """One :class:`NodeShape` per group (``head`` and each worker group), scaled.

    A pod offers Ray its ``rayStartParams`` ``num-cpus`` (else its container's CPU limit),
    its ``nvidia.com/gpu`` limit as GPUs, and the ``resources`` JSON, as KubeRay starts Ray.
    """
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    shapes = {}
    for name, group in groups.items():
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = float(params.get("num-cpus", _cpu_quantity(limits["cpu"])))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        resources = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        shapes[name] = NodeShape(
            group=name,
            num_cpus=_scaled(cpus, cpu_scale),
            num_gpus=gpus,
            resources={k: float(v) for k, v in resources.items()},
        )
    return shapes


def _cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def cluster_serve_config(
    rayservice: dict[str, Any],
    *,
    settings: dict[str, str],
    port: int,
    cpu_scale: float,
    embedding_provider: str = "cpu",
    deployment_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The RayService's ``serveConfigV2`` for a cluster on this machine.

    Changed: ``proxy_location`` HeadOnly on ``127.0.0.1:port`` (one address for the clients),
    ``settings`` merged into the application's ``args.settings`` (DATABASE_URL, REDIS_URL...),
    every deployment's ``num_cpus`` times ``cpu_scale``, Embedding's ``EMBEDDING_PROVIDER``,
    and ``deployment_overrides`` (by deployment name, merged key by key one level deep, e.g.
    ``{"Search": {"autoscaling_config": {"upscale_delay_s": 5}}}``). The result validates as
    Ray's ``ServeDeploySchema``.

    Raises:
        ConfigurationError: An override names a deployment the config does not have.
    """
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app.setdefault("args", {})
    app["args"]["settings"] = {**app["args"].get("settings", {}), **settings}
    deployments = {d["name"]: d for d in app["deployments"]}
    unknown = set(deployment_overrides or {}) - set(deployments)
    if unknown:
        raise ConfigurationError(f"no deployment named {sorted(unknown)}")
    for name, deployment in deployments.items():
        options = deployment.setdefault("ray_actor_options", {})
        options["num_cpus"] = _scaled(float(options.get("num_cpus", 1)), cpu_scale)
        env = options.get("runtime_env", {}).get("env_vars", {})
        if "EMBEDDING_PROVIDER" in env:
            env["EMBEDDING_PROVIDER"] = embedding_provider
        for key, value in (deployment_overrides or {}).get(name, {}).items():
            if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                deployment[key] = {**deployment[key], **value}
            else:
                deployment[key] = value
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    return config


def deploy(config: dict[str, Any], *, timeout_s: float = 240) -> None:
    """Start Serve with the config's proxy and HTTP options and deploy its applications.

    As ``serve deploy`` and KubeRay do (the dashboard's ``PUT /api/serve/applications/``): the
    controller builds each application from its ``import_path`` in a task of its own. Returns
    when every application is RUNNING.

    Raises:
        TimeoutError: Not every application is RUNNING after ``timeout_s`` (the message has
            Serve's status).
        RuntimeError: An application failed to deploy (DEPLOY_FAILED, with Serve's message).
    """
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        global_logging_config=schema.logging_config,
    )
    client.deploy_apps(schema)
    names = {app.name for app in schema.applications}
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status()
        apps = {name: status.applications.get(name) for name in names}
        states = {name: (app.status if app else None) for name, app in apps.items()}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = {n: a.message for n, a in apps.items() if a and a.status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not RUNNING after {timeout_s} s: {states}")
        time.sleep(0.5)


def replica_nodes(app: str) -> dict[str, list[str]]:
    """Deployment name -> the node ids (hex) of its live replicas, one entry per replica.

    From Ray's state API (``list_actors``: needs the dashboard on the head); a replica actor is
    named ``SERVE_REPLICA::<app>#<deployment>#<replica id>``.
    """
    from ray.util.state import list_actors

    out: dict[str, list[str]] = defaultdict(list)
    prefix = f"SERVE_REPLICA::{app}#"
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        name = actor.name or ""
        if name.startswith(prefix):
            deployment = name[len(prefix) :].split("#", 1)[0]
            out[deployment].append(str(actor.node_id))
    return dict(out)


def replica_counts(app: str) -> dict[str, dict[str, int]]:
    """Deployment name -> {replica state: count}, from ``serve.status()``."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {
        name: {str(state): int(n) for state, n in deployment.replica_states.items()}
        for name, deployment in status.deployments.items()
    }


__all__ = [
    "GPU_RESOURCE",
    "RAYSERVICE",
    "NodeShape",
    "cluster_serve_config",
    "deploy",
    "load_rayservice",
    "node_shapes",
    "replica_counts",
    "replica_nodes",
]
