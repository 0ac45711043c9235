"""One typed builder wires the deployment graph: ``build_app(AppArgs) -> Application``.

``serve_config.yaml`` (and KubeRay's serveConfigV2) point ``import_path`` at
``halldyll_ray.serve.app:build_app`` and pass ``args``; replica counts, autoscaling and
resources live in the YAML's per-deployment overrides, not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from halldyll_ray.serve.deployments import (
    REMOTE_EMBEDDING_CALLS,
    ContextBuilder,
    EmbeddedDatabase,
    Embedder,
    Ingestor,
    Searcher,
)
from halldyll_ray.serve.http import BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMPORT_BYTES
from halldyll_ray.serve.ingress import HTTPIngress
from halldyll_ray.serve.settings import SettingsOverrides

# Requests each caller (the Ingress, an engine replica) queues for a deployment whose replicas
# are all at max_ongoing_requests; past it the call fails at once with BackPressureError, which
# the HTTP API answers 503 with Retry-After: 1. Serve's default queues without limit, so an
# overload showed as ever longer latencies instead (about 1.5 s of queue at the 170 uncached
# searches/s one replica serves here).
QUEUED = 256


class AppArgs(BaseModel):
    """Shape of the application (the ``args:`` of serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    embedding_max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most requests one embedding batch merges."
    )
    embedding_batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="How long a batch waits to fill. 0: no wait, so a lone request never "
        "waits; under load, the batches that queue while the model runs merge into its next "
        "call anyway.",
    )
    local_embedding_max_texts: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Search, Ingestion and Context embed requests of at most this many texts "
        "with their own copy of the model instead of calling Embedding (on CPU the hop costs "
        "more than one encode); 0 sends every text to Embedding, as GPU clusters should.",
    )
    remote_embedding_calls: int = Field(
        default=REMOTE_EMBEDDING_CALLS,
        ge=1,
        le=64,
        description="Calls to Embedding each Search, Ingestion and Context replica keeps in "
        "flight for requests smaller than a batch; further concurrent requests wait and leave "
        "merged, up to EMBEDDING_BATCH_SIZE texts a call, instead of one Ray request each "
        "(benchmarks/serve_http.py). Requests of a batch or more go as they are.",
    )
    access_log_between_deployments: bool = Field(
        default=False,
        description="Serve's access log line for each call from one deployment to another "
        "(in the Search, Ingestion, Context and Embedding replicas' logs). The Ingress's line "
        "for each HTTP request and handle API call is always written, with the request id. "
        "Off by default: the lines cost the Search replica 0.15 of its 0.9 ms of CPU per "
        "cached search (benchmarks/serve_http.py).",
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest HTTP request body; larger gets 413.",
    )
    max_import_bytes: int = Field(
        default=DEFAULT_MAX_IMPORT_BYTES,
        ge=1024,
        le=1 << 40,
        description="Largest body of an import (an export file, streamed in batches); larger "
        "gets 413.",
    )
    body_timeout_s: float = Field(
        default=BODY_TIMEOUT_S,
        gt=0,
        le=600,
        description="Seconds a client has to send each part of its request body; a client "
        "that stalls gets 408.",
    )
    settings: dict[str, str] = Field(
        default_factory=dict,
        description="Settings overrides by variable name (DATABASE_URL, REDIS_URL, ...); each "
        "replica's environment supplies the rest. A name that is not a setting is an error.",
    )


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """The whole application: Ingress over Search, Ingestion and Context over Embedding."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    # Built once, bound to every deployment: the given variables, checked here together with
    # this process's environment (fail fast); each replica lays them over its own environment
    # (SettingsOverrides says why the builder's environment is not theirs).
    overrides = SettingsOverrides.from_variables(args.settings)
    settings = overrides.resolve()

    embedding = serve.deployment(
        Embedder,
        name="Embedding",
        max_ongoing_requests=max(64, args.embedding_max_batch_size * 2),
        max_queued_requests=QUEUED,
    ).bind(
        overrides,
        max_batch_size=args.embedding_max_batch_size,
        batch_wait_timeout_s=args.embedding_batch_wait_timeout_s,
        access_log=args.access_log_between_deployments,
    )
    database = None
    if settings.database_url is None:
        # Local development only, and nearly idle: it holds the server process's lifetime.
        # Its options live here because it exists only when DATABASE_URL is unset.
        database = serve.deployment(
            EmbeddedDatabase, name="EmbeddedDatabase", ray_actor_options={"num_cpus": 0}
        ).bind(overrides)
    # Serve's default of 5 ongoing requests per replica capped throughput well below what
    # one replica serves (benchmarks/serve_http.py); the YAML may override it.
    ongoing = 32
    searcher, ingestor, context = (
        serve.deployment(
            cls, name=name, max_ongoing_requests=ongoing, max_queued_requests=QUEUED
        ).bind(
            embedding,
            database=database,
            settings=overrides,
            local_embedding_max_texts=args.local_embedding_max_texts,
            remote_embedding_calls=args.remote_embedding_calls,
            access_log=args.access_log_between_deployments,
        )
        for cls, name in (
            (Searcher, "Search"),
            (Ingestor, "Ingestion"),
            (ContextBuilder, "Context"),
        )
    )
    ingress = serve.deployment(HTTPIngress, name="Ingress", max_ongoing_requests=ongoing)
    return ingress.bind(
        searcher=searcher,
        ingestor=ingestor,
        context=context,
        embedder=embedding,
        database=database,
        settings=overrides,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        max_import_bytes=args.max_import_bytes,
    )


def with_options(app: Application, *, keep: Iterable[str] = (), **options: Any) -> Application:
    """The same application graph with Serve deployment ``options`` set on every deployment.

    For Python callers of ``serve.run`` (tests, benchmarks) what serve_config.yaml's
    per-deployment overrides do for a config file: for example ``health_check_period_s=1``
    or ``ray_actor_options={"num_cpus": 0.1}``. Deployments named in ``keep`` stay as built.
    The graph is walked through Serve's private ``Application._bound_deployment``.
    """
    kept = frozenset(keep)
    memo: dict[int, Application] = {}

    def rebuild(node: Any) -> Any:
        if not isinstance(node, Application):
            return node
        if id(node) not in memo:
            dep = node._bound_deployment
            args = [rebuild(a) for a in dep.init_args]
            kwargs = {k: rebuild(v) for k, v in dep.init_kwargs.items()}
            if dep.name not in kept:
                dep = dep.options(**options)
            memo[id(node)] = dep.bind(*args, **kwargs)
        return memo[id(node)]

    rebuilt: Application = rebuild(app)
    return rebuilt
