"""Deployment artifacts, checked offline: docker/, kuberay/, runpods/.

No Docker engine or Kubernetes cluster is needed. What runs here:
- the Dockerfile's structure (base image = the Ray pin, non-root, dependencies before source);
- the Compose file's structure (services, health checks, start order, volumes, .env);
- every KubeRay manifest: parsed, the RayService validated against the KubeRay CRD schema
  (strictly: unknown fields fail, as the API server's strict field validation would), its
  serveConfigV2 against Ray's ServeDeploySchema and against serve_config.yaml, and the rules of
  the deployment (GPU group, secrets, autoscaling, resources, readiness, versions);
- runpods/start.sh: `bash -n` and dry runs of both roles.

``test_image_install_steps`` replays the Dockerfile's COPY and RUN steps in a fresh virtualenv
(downloads from PyPI, about 1-2 minutes): opt in with HALLDYLL_TEST_IMAGE_INSTALL=1.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
KUBERAY = ROOT / "kuberay"
RUNPODS_START = ROOT / "runpods" / "start.sh"
# The RayService CRD's OpenAPI v3 schema (ray-project/kuberay, ray.io_rayservices.yaml, v1),
# kept beside this test so it runs offline; KUBERAY_RAYSERVICE_SCHEMA points at another copy.
CRD_SCHEMA = Path(
    os.environ.get("KUBERAY_RAYSERVICE_SCHEMA")
    or Path(__file__).parent / "data" / "rayservice_v1_openapiv3.json"
)
SECRET_ENV = ("DATABASE_URL", "REDIS_URL", "API_KEY_SECRET", "RAY_AUTH_TOKEN")
RAY_CONTAINER_ENV = {"DATABASE_URL", "REDIS_URL", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
CPU_DEPLOYMENTS = ("Ingress", "Search", "Ingestion", "Context")
RENDER_INPUTS = {"serve_overrides.yaml", "rayservice.template.yaml"}


# --------------------------------------------------------------------------------- helpers
def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_kuberay = _load_module(ROOT / "scripts" / "render_kuberay.py", "render_kuberay")
docker_requirements = _load_module(ROOT / "docker" / "requirements.py", "docker_requirements")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


RAY_PIN, APP_VERSION = render_kuberay.project_pins()


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, rest = line.partition(" ")
        steps.append((instruction.upper(), rest.strip()))
    return steps


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def _from_images(variant_args: dict[str, str] | None = None) -> dict[str, str]:
    """Stage name -> resolved FROM image, with the Dockerfile's ARG defaults."""
    args = dict(variant_args or {})
    images = {}
    for instruction, rest in _dockerfile():
        if instruction == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
        if instruction == "FROM":
            parts = rest.split()
            stage = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]
            images[stage] = _expand(parts[0], args)
    return images


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, list[dict[str, Any]]]:
    """The Kubernetes manifests of kuberay/ (not the render inputs)."""
    return {p.name: _docs(p) for p in sorted(KUBERAY.glob("*.yaml")) if p.name not in RENDER_INPUTS}


def _rayservice() -> dict[str, Any]:
    (doc,) = _docs(KUBERAY / "rayservice.yaml")
    return doc


def _serve_v2() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    return config


def _deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def _groups() -> dict[str, dict[str, Any]]:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def _worker_group(kind: str) -> dict[str, Any]:
    """The worker group whose pods do (gpu) or do not (cpu) request nvidia.com/gpu."""
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    found = [
        g
        for g in cluster["workerGroupSpecs"]
        if ("nvidia.com/gpu" in _ray_container(g)["resources"]["limits"]) == (kind == "gpu")
    ]
    assert len(found) == 1, f"expected one {kind} worker group, found {len(found)}"
    return found[0]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]
    return container


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec in the manifests: the RayService's groups and the Job."""
    specs = [(f"rayservice/{name}", g["template"]["spec"]) for name, g in _groups().items()]
    for name, docs in _manifests().items():
        for doc in docs:
            where = f"{name}/{doc.get('metadata', {}).get('name')}"
            if doc["kind"] == "Job":
                specs.append((where, doc["spec"]["template"]["spec"]))
            elif doc["kind"] == "CronJob":
                specs.append((where, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def _all_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, spec in _pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{where}/{c['name']}", c))
    return out


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _quantity(value: str | int | float) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _pod_offer(group: dict[str, Any]) -> dict[str, float]:
    """The logical resources a pod of ``group`` offers Ray (rayStartParams and GPU limits).

    num-cpus defaults to the container's CPU limit and the GPU count to its nvidia.com/gpu
    limit, as KubeRay sets them.
    """
    params = group["rayStartParams"]
    limits = _ray_container(group)["resources"]["limits"]
    offer = {
        "CPU": float(params.get("num-cpus", _quantity(limits["cpu"]))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    if "resources" in params:
        offer.update(json.loads(json.loads(params["resources"])))
    return offer


def _replica_demand(options: dict[str, Any]) -> dict[str, float]:
    """What one replica with these ``ray_actor_options`` asks for (Serve's default: 1 CPU)."""
    return {
        "CPU": float(options.get("num_cpus", 1)),
        "GPU": float(options.get("num_gpus", 0)),
        **{k: float(v) for k, v in options.get("resources", {}).items()},
    }


def _fits(demand: dict[str, float], offer: dict[str, float]) -> int:
    """How many such replicas an empty pod with ``offer`` holds (0: none)."""
    if any(amount > offer.get(name, 0) for name, amount in demand.items()):
        return 0
    counts = [int(offer[name] // amount) for name, amount in demand.items() if amount > 0]
    return min(counts) if counts else 1_000_000


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as strict field validation does in Kubernetes."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# ------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_bases_are_the_ray_pin() -> None:
    images = _from_images()
    assert images["base-cpu"] == f"rayproject/ray:{RAY_PIN}-py311"
    assert images["base-gpu"] == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    # The image's Python satisfies requires-python.
    minimum = re.fullmatch(r">=\s*3\.(\d+)", _pyproject()["requires-python"])
    assert minimum and int(minimum[1]) <= 11
    for variant in ("cpu", "gpu"):
        steps = _dockerfile()
        final = [rest for i, rest in steps if i == "FROM"][-1]
        assert _expand(final.split()[0], {"VARIANT": variant}) == f"base-{variant}"


def test_dockerfile_is_non_root_and_installs_dependencies_before_the_source() -> None:
    steps = _dockerfile()
    users = [rest for instruction, rest in steps if instruction == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root user"

    def index(predicate: Any) -> int:
        return next(i for i, step in enumerate(steps) if predicate(step))

    deps = index(lambda s: s[0] == "RUN" and "install.sh deps" in s[1])
    source = index(lambda s: s[0] == "COPY" and "halldyll_ray" in s[1].split())
    app = index(lambda s: s[0] == "RUN" and "install.sh app" in s[1])
    check = index(lambda s: s[0] == "RUN" and "install.sh check" in s[1])
    assert deps < source < app <= check
    copied_before_deps = [s[1] for s in steps[:deps] if s[0] == "COPY"]
    assert all("halldyll_ray" not in c and "migrations" not in c for c in copied_before_deps)
    cmd = next(rest for instruction, rest in steps if instruction == "CMD")
    assert json.loads(cmd) == ["serve", "run", "serve_config.yaml"]


def test_dockerfile_copies_exist_and_pass_the_dockerignore() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for instruction, rest in _dockerfile():
        if instruction != "COPY":
            continue
        sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source} is excluded by docker/Dockerfile.dockerignore"
            )


def test_requirements_come_from_pyproject() -> None:
    pyproject = ROOT / "pyproject.toml"
    project = _pyproject()
    assert docker_requirements.requirements(pyproject, "cpu") == project["dependencies"]
    gpu = docker_requirements.requirements(pyproject, "gpu")
    names = [docker_requirements._name(r) for r in gpu]
    assert "onnxruntime" not in names, "the gpu image must not also install the CPU onnxruntime"
    assert names.count("onnxruntime-gpu") == 1
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]") for r in gpu)
    others = [r for r in project["dependencies"] if not r.startswith("onnxruntime")]
    assert all(r in gpu for r in others)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HALLDYLL_TEST_IMAGE_INSTALL") != "1",
    reason="downloads the dependencies from PyPI (1-2 min): set HALLDYLL_TEST_IMAGE_INSTALL=1",
)
def test_image_install_steps(tmp_path: Path) -> None:
    """Replay the Dockerfile's COPY and RUN steps (cpu variant) in a fresh virtualenv.

    Absolute paths in the image are mapped under tmp_path; USER is ignored (the steps run as
    the current user), so the root-only `ldconfig` step runs too: a no-op without CUDA wheels.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    image = tmp_path / "image"
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    args = {"VARIANT": "cpu"}
    workdir = image
    absolute: set[str] = set()

    def rooted(path: str) -> Path:
        return image / path.lstrip("/") if path.startswith("/") else workdir / path

    def map_paths(command: str) -> str:
        for prefix in sorted(absolute, key=len, reverse=True):
            command = command.replace(prefix, str(rooted(prefix)))
        return command

    after_final_from = False
    for instruction, rest in _dockerfile():
        if instruction == "FROM":
            after_final_from = rest.split()[0].startswith("base-")
            continue
        if instruction == "ARG":
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
        if not after_final_from:
            continue
        if instruction == "WORKDIR":
            absolute.add(rest)
            workdir = rooted(rest)
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                if value.startswith("/"):
                    absolute.add(value)
                env[key] = map_paths(value)
        elif instruction == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            *sources, dest = words
            if dest.startswith("/"):
                absolute.add(dest.rstrip("/"))
            target = rooted(dest)
            for source in sources:
                out = target / Path(source).name if dest.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source, out, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(ROOT / source, out)
        elif instruction == "RUN":
            command = map_paths(_expand(rest, {**args, **env}))
            subprocess.run(["sh", "-c", command], cwd=workdir, env=env, check=True)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == RAY_PIN
    assert (workdir / "serve_config.yaml").exists()
    assert (venv / "bin" / "halldyll").exists() and (venv / "bin" / "serve").exists()


# ------------------------------------------------------------------------------ Compose
def test_compose_services_health_checks_and_start_order() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "app"}

    postgres, redis, migrate, app = (services[n] for n in ("postgres", "redis", "migrate", "app"))
    assert postgres["image"].startswith("pgvector/pgvector:pg")
    assert redis["image"].startswith("redis:")
    for name in ("postgres", "redis", "app"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    assert any("/readyz" in part and ":8000" in part for part in app["healthcheck"]["test"])

    assert migrate["command"] == ["halldyll", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["command"] == ["serve", "run", "serve_config.yaml"]
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["image"] == migrate["image"] == f"halldyll-ray:{APP_VERSION}"

    # Both run the image built from docker/Dockerfile with the repository as context.
    for service in (migrate, app):
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert service["environment"]["DATABASE_URL"].endswith("@postgres:5432/halldyll")
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:6379/")
        (env_file,) = service["env_file"]
        assert (COMPOSE.parent / env_file["path"]).resolve() == ROOT / ".env"
        assert env_file["required"] is False

    # Named volumes are declared; data lives in them.
    named = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in named, f"volume {source} is not declared"
    assert any(v.endswith(":/var/lib/postgresql") for v in postgres["volumes"])
    # Only the app is published, and only on the loopback interface.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert name == "app" and port.startswith("127.0.0.1:"), port


@pytest.mark.skipif(
    subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    if shutil.which("docker")
    else True,
    reason="docker compose is not installed",
)
def test_docker_compose_config() -> None:
    """`docker compose config` parses and validates the file without an engine."""
    subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], check=True, timeout=60
    )


# ------------------------------------------------------------------------------ KubeRay
def test_rendered_files_are_up_to_date() -> None:
    for path, text in render_kuberay.render().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is out of date: run python scripts/render_kuberay.py"
        )


def test_every_manifest_parses() -> None:
    manifests = _manifests()
    assert {
        "namespace.yaml",
        "configmap.yaml",
        "migrate-job.yaml",
        "maintenance.yaml",
        "rayservice.yaml",
        "secret.example.yaml",
        "kustomization.yaml",
    } <= set(manifests)
    for name, docs in manifests.items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], name


def test_rayservice_validates_against_the_crd_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD_SCHEMA.exists():
        pytest.skip(f"no RayService CRD schema at {CRD_SCHEMA} (KUBERAY_RAYSERVICE_SCHEMA)")
    schema = json.loads(CRD_SCHEMA.read_text())
    rayservice = _rayservice()
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(_strict(schema)).iter_errors(rayservice)
    ]
    assert not errors, "\n".join(errors)
    # The strict copy does refuse a misspelt field.
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    assert not jsonschema.Draft7Validator(_strict(schema)).is_valid(broken)


def test_serve_config_v2_is_serve_config_yaml_for_a_cluster() -> None:
    from ray.serve.schema import ServeDeploySchema

    v2 = _serve_v2()
    ServeDeploySchema.model_validate(v2)
    runpods = yaml.safe_load((ROOT / "runpods" / "serve_config.yaml").read_text())
    assert runpods == v2, "RunPods and KubeRay must deploy the same application"

    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(base)
    (base_app,) = base["applications"]
    (app,) = v2["applications"]
    for key in ("name", "route_prefix", "import_path", "logging_config"):
        assert app[key] == base_app[key], f"serveConfigV2 differs from serve_config.yaml: {key}"
    # The one argument a GPU cluster changes: queries go to the GPU Embedding replicas too.
    assert base_app["args"]["local_embedding_max_texts"] == 1
    assert app["args"] == {**base_app["args"], "local_embedding_max_texts": 0}
    for key in ("proxy_location", "http_options"):
        assert v2[key] == base[key]
    base_deployments = _deployments(base)
    deployments = _deployments(v2)
    assert list(deployments) == list(base_deployments)
    for name, deployment in deployments.items():
        for key, value in base_deployments[name].items():
            if key in ("autoscaling_config", "ray_actor_options"):
                continue
            assert deployment[key] == value, f"{name}.{key} differs from serve_config.yaml"
        assert (
            deployment["autoscaling_config"]["target_ongoing_requests"]
            == base_deployments[name]["autoscaling_config"]["target_ongoing_requests"]
        )


def test_gpu_worker_group_is_where_embedding_replicas_go() -> None:
    deployments = _deployments(_serve_v2())
    embedding = deployments["Embedding"]["ray_actor_options"]
    assert embedding["num_gpus"] == 1
    assert embedding["resources"] == {"embedding_gpu": 1}
    assert embedding["runtime_env"]["env_vars"]["EMBEDDING_PROVIDER"] == "cuda"
    for name in CPU_DEPLOYMENTS:
        options = deployments[name]["ray_actor_options"]
        assert not options.get("num_gpus") and "embedding_gpu" not in options.get("resources", {})

    gpu, cpu = _worker_group("gpu"), _worker_group("cpu")
    container = _ray_container(gpu)
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod >= 1
    assert container["image"].startswith("halldyll-ray-gpu:")
    offered = json.loads(json.loads(gpu["rayStartParams"]["resources"]))
    assert offered == {"embedding_gpu": gpus_per_pod}
    assert "resources" not in cpu["rayStartParams"], "only GPU pods offer embedding_gpu"
    assert _ray_container(cpu)["image"].startswith("halldyll-ray:")
    # What an empty pod of each group offers Ray, against what each replica asks for: every
    # deployment fits a pod of some group, Embedding only GPU pods (gpus_per_pod replicas), and
    # no CPU replica fits a GPU pod, even one without its Embedding replica (a pod the
    # autoscaler has just added, or one whose replica was scaled down): there, a CPU replica
    # would take the CPU the next Embedding replica needs and keep the GPU pod busy.
    offers = {"gpu": _pod_offer(gpu), "cpu": _pod_offer(cpu)}
    assert _fits(_replica_demand(embedding), offers["gpu"]) == gpus_per_pod
    assert _fits(_replica_demand(embedding), offers["cpu"]) == 0
    for name in CPU_DEPLOYMENTS:
        demand = _replica_demand(deployments[name]["ray_actor_options"])
        assert _fits(demand, offers["cpu"]) >= 1, f"{name} fits no CPU pod"
        assert _fits(demand, offers["gpu"]) == 0, f"{name} replicas could land on a GPU pod"
    # Enough pods for every deployment at max_replicas.
    assert (
        gpu["maxReplicas"] * gpus_per_pod
        >= deployments["Embedding"]["autoscaling_config"]["max_replicas"]
    )
    cores = _quantity(_ray_container(cpu)["resources"]["limits"]["cpu"])
    cpus_per_pod = float(cpu["rayStartParams"].get("num-cpus", cores))
    assert cpus_per_pod < cores, "leave a core to the proxy and Ray's own processes"
    needed = sum(
        deployments[n]["autoscaling_config"]["max_replicas"]
        * deployments[n]["ray_actor_options"]["num_cpus"]
        for n in CPU_DEPLOYMENTS
    )
    assert cpu["maxReplicas"] * cpus_per_pod >= needed
    # The head runs no replicas.
    assert _groups()["head"]["rayStartParams"]["num-cpus"] == "0"


def test_autoscaling_is_on_everywhere() -> None:
    spec = _rayservice()["spec"]
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for name, deployment in _deployments(_serve_v2()).items():
        scaling = deployment["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        assert "num_replicas" not in deployment, f"{name}: fixed replicas defeat autoscaling"
    for group in spec["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], group["groupName"]


def test_every_container_has_requests_and_limits() -> None:
    for where, container in _all_containers():
        for kind in ("requests", "limits"):
            resources = container.get("resources", {}).get(kind, {})
            assert {"cpu", "memory"} <= set(resources), f"{where}: no {kind}"
    autoscaler = _rayservice()["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= set(autoscaler["requests"]) & set(autoscaler["limits"])


def test_secrets_are_referenced_never_inlined() -> None:
    example: dict[str, dict[str, str]] = {
        doc["metadata"]["name"]: doc["stringData"] for doc in _docs(KUBERAY / "secret.example.yaml")
    }
    for values in example.values():
        assert all("CHANGE-ME" in v for v in values.values()), "example secrets are placeholders"

    def refs(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, dict):
            found = [node["secretKeyRef"]] if "secretKeyRef" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    # Every reference names a Secret and key of the example, so the example is complete.
    for name, docs in _manifests().items():
        if name == "secret.example.yaml":
            continue
        for ref in refs(docs):
            assert ref["key"] in example.get(ref["name"], {}), f"{name}: {ref} not in the example"
        kinds = {doc["kind"] for doc in docs}
        assert "Secret" not in kinds, f"{name}: Secrets belong in secret.example.yaml only"
        text = (KUBERAY / name).read_text()
        assert not re.search(r"\w+://[^\s/@]+:[^\s/@]+@", text), f"{name}: credentials in a URL"

    for where, container in _all_containers():
        for name, var in _env(container).items():
            if name in SECRET_ENV:
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], (
                    f"{where}: {name} must come from a Secret"
                )
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for group_name, group in _groups().items():
        env = _env(_ray_container(group))
        assert set(env) >= RAY_CONTAINER_ENV, (
            f"{group_name}: missing {RAY_CONTAINER_ENV - set(env)}"
        )
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": cluster["authOptions"]["secretName"], "key": "auth_token"}
    autoscaler_env = {e["name"]: e for e in cluster["autoscalerOptions"]["env"]}
    assert "secretKeyRef" in autoscaler_env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert cluster["authOptions"]["mode"] == "token"
    gcs = cluster["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] and "secretKeyRef" in gcs["redisPassword"]["valueFrom"]


def test_versions_are_pinned_together() -> None:
    """STYLE 14: Docker base image, rayVersion and the ray[serve] pin are one version."""
    dockerfile_ray = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert dockerfile_ray and dockerfile_ray[1] == RAY_PIN
    assert all(RAY_PIN in image for image in _from_images().values() if ":" in image)
    assert _rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == RAY_PIN
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    names = {image["name"]: image["newTag"] for image in kustomization["images"]}
    assert names == {"halldyll-ray": APP_VERSION, "halldyll-ray-gpu": APP_VERSION}
    for where, container in _all_containers():
        name, tag = container["image"].rsplit(":", 1)
        assert name in names and tag == APP_VERSION, f"{where}: {container['image']}"


def test_migrations_run_before_the_service() -> None:
    (job,) = _docs(KUBERAY / "migrate-job.yaml")
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    assert container["command"] == ["halldyll", "migrate"]
    assert "secretKeyRef" in _env(container)["DATABASE_URL"]["valueFrom"]
    # The head waits for the migrated schema (halldyll doctor checks it) before Ray starts.
    (init,) = _groups()["head"]["template"]["spec"]["initContainers"]
    assert "halldyll doctor" in " ".join(init["command"])


def test_readiness_is_the_apps_readyz() -> None:
    port = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["http_options"]["port"]
    spec = _rayservice()["spec"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    # The operator waits for a ready head before deploying the app: keep KubeRay's probe there.
    assert "readinessProbe" not in _ray_container(_groups()["head"])
    for group in spec["rayClusterConfig"]["workerGroupSpecs"]:
        # A probe of our own replaces KubeRay's, so it must keep KubeRay's proxy check too.
        probe = _ray_container(group)["readinessProbe"]
        command = " ".join(probe["exec"]["command"])
        assert f"http://localhost:{port}/-/healthz" in command, group["groupName"]
        assert f"http://localhost:{port}/readyz" in command, group["groupName"]
        assert command.index("/-/healthz") < command.index("&&") < command.index("/readyz")
        assert probe["failureThreshold"] == 1, "a draining proxy must leave the Service at once"


def test_kustomization_ties_it_together() -> None:
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert "secret.example.yaml" not in resources
    for resource in resources:
        assert (KUBERAY / resource).exists(), resource
    assert {"migrate-job.yaml", "rayservice.yaml", "configmap.yaml", "maintenance.yaml"} <= set(
        resources
    )
    if shutil.which("kubectl") is None:
        return
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Job", "CronJob", "RayService"}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]


# ------------------------------------------------------------------------------ RunPods
def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RUNPODS_START)],
        env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_runpods_start_script_lints() -> None:
    subprocess.run(["bash", "-n", str(RUNPODS_START)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(RUNPODS_START)], check=True)


def test_runpods_head_starts_migrates_and_deploys() -> None:
    secrets = {
        "RAY_AUTH_TOKEN": "t",
        "DATABASE_URL": "postgresql://u@db/h",
        "REDIS_URL": "redis://r",
    }
    head = _start({"ROLE": "head", **secrets})
    assert head.returncode == 0, head.stderr
    lines = head.stdout.splitlines()
    assert lines[0].startswith("+ ray start --head --port=6380 ")
    assert lines[1] == "+ halldyll migrate"
    assert lines[2] == (
        "+ serve deploy --address http://127.0.0.1:8265 " + str(ROOT / "runpods/serve_config.yaml")
    )

    worker = _start(
        {
            "ROLE": "worker",
            "RAY_HEAD_ADDRESS": "10.0.0.2:6380",
            **secrets,
            "EMBEDDING_GPU_SLOTS": "2",
        }
    )
    assert worker.returncode == 0, worker.stderr
    (line,) = worker.stdout.splitlines()
    words = shlex.split(line[2:])
    assert words[:3] == ["ray", "start", "--address=10.0.0.2:6380"] and words[-1] == "--block"
    assert '--resources={"embedding_gpu": 2}' in words

    # An Instant Cluster's variables pick the role and the head's address.
    ranked = _start(
        {"NODE_RANK": "1", "PRIMARY_ADDR": "10.65.0.2", "NODE_ADDR": "10.65.0.3", **secrets}
    )
    assert "--address=10.65.0.2:6380" in ranked.stdout
    assert "--node-ip-address=10.65.0.3" in ranked.stdout

    missing = _start({"ROLE": "head", "DATABASE_URL": "postgresql://u@db/h"})
    assert missing.returncode == 2 and "RAY_AUTH_TOKEN" in missing.stderr


def test_every_launcher_sets_the_serve_environment() -> None:
    """One source (halldyll_ray.serve_env): serve.sh, the image, KubeRay and RunPods agree."""
    from halldyll_ray.serve_env import SERVE_ENVIRONMENT

    assert SERVE_ENVIRONMENT  # the test below would pass vacuously otherwise
    # serve.sh runs halldyll_ray.serve_local, which applies serve_env itself (tests/unit).
    assert (
        "-m halldyll_ray.serve_local serve_config.yaml"
        in (ROOT / "scripts" / "serve.sh").read_text()
    )
    shell = {"runpods/start.sh": (ROOT / "runpods" / "start.sh").read_text()}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    configmap = yaml.safe_load((ROOT / "kuberay" / "configmap.yaml").read_text())["data"]
    for name, value in SERVE_ENVIRONMENT.items():
        for path, text in shell.items():
            assert f'export {name}="${{{name}:-{value}}}"' in text, (path, name)
        assert re.search(rf"^\s+{name}={value}\b", dockerfile, re.M), ("Dockerfile", name)
        assert configmap.get(name) == value, ("configmap", name)
    # Every Ray container of the RayService takes the ConfigMap.
    service = yaml.safe_load((ROOT / "kuberay" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            refs = [e.get("configMapRef", {}).get("name") for e in container.get("envFrom", [])]
            assert "halldyll-config" in refs, container["name"]


# ------------------------------------------------------- the multi-node tier's cluster shape
def test_local_cluster_nodes_and_config_are_the_rayservices() -> None:
    """What tests/cluster and benchmarks/autoscaling.py start: the pods' resources, scaled,
    and the serveConfigV2 with only the one-machine changes."""
    from halldyll_ray.errors import ConfigurationError
    from halldyll_ray.serve import local_cluster

    rayservice = local_cluster.load_rayservice(KUBERAY / "rayservice.yaml")
    shapes = local_cluster.node_shapes(rayservice, cpu_scale=1 / 3)
    for name, group in _groups().items():
        offer = _pod_offer(group)
        shape = shapes[name]
        assert shape.num_cpus == pytest.approx(offer["CPU"] / 3, abs=1e-4), name
        assert shape.num_gpus == offer["GPU"], name
        assert shape.resources == {k: v for k, v in offer.items() if k not in ("CPU", "GPU")}

    settings = {"DATABASE_URL": "postgresql://u@db/h", "REDIS_URL": "redis://r"}
    config = local_cluster.cluster_serve_config(
        rayservice,
        settings=settings,
        port=8123,
        cpu_scale=1 / 3,
        deployment_overrides={"Search": {"autoscaling_config": {"downscale_delay_s": 5}}},
    )
    assert config["proxy_location"] == "HeadOnly"
    assert config["http_options"]["port"] == 8123
    (app,) = config["applications"]
    assert app["args"]["settings"] == settings
    original = _deployments(_serve_v2())
    for name, deployment in _deployments(config).items():
        options, before = deployment["ray_actor_options"], original[name]["ray_actor_options"]
        # Three replicas of a third of a CPU must fit a scaled CPU pod (1 logical CPU).
        assert options["num_cpus"] == pytest.approx(before["num_cpus"] / 3, abs=1e-4)
        assert 3 * options["num_cpus"] <= 1
        assert options.get("resources") == before.get("resources")
        assert options.get("num_gpus") == before.get("num_gpus")
    search = _deployments(config)["Search"]["autoscaling_config"]
    assert search["downscale_delay_s"] == 5 and search["max_replicas"] == 8
    embedding_env = _deployments(config)["Embedding"]["ray_actor_options"]["runtime_env"]
    assert embedding_env["env_vars"]["EMBEDDING_PROVIDER"] == "cpu"
    with pytest.raises(ConfigurationError):
        local_cluster.cluster_serve_config(
            rayservice,
            settings=settings,
            port=1,
            cpu_scale=1,
            deployment_overrides={"Nope": {}},
        )
