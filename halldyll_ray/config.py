"""Process settings, read once from the environment (SPEC §5) and passed down.

Nothing here runs at import time: build :class:`Settings` at start (``Settings()`` reads the
environment; ``Settings.from_env()`` does the same but turns pydantic's validation error into a
:class:`~halldyll_ray.errors.ConfigurationError` whose message names each variable and the fix).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from halldyll_ray.errors import ConfigurationError, HalldyllError, quoted
from halldyll_ray.models import MAX_SEARCH_LIMIT, PAGE_MAX_BYTES
from halldyll_ray.urls import check_postgres_url, check_redis_url
from halldyll_ray.validation import error_message

#: Cosine similarity below which a semantic hit is dropped, calibrated for all-MiniLM-L6-v2.
#: ``benchmarks/calibrate_threshold.py``: on 83 hand-labelled paraphrase pairs the matching
#: pair scores a median 0.45 (5th percentile 0.24) and non-matching pairs a median 0.05 (95th
#: percentile 0.22); 0.20 is the highest 0.05 step keeping >= 95 % of matches (97.6 %).
DEFAULT_SIMILARITY_THRESHOLD = 0.20


#: A bearer token as an HTTP header carries it: visible ASCII, no spaces.
_TOKEN = re.compile(r"[!-~]+")


def _default_data_dir() -> Path:
    return platformdirs.user_data_path("halldyll-ray")


class Settings(BaseSettings):
    """Every environment variable the product reads. Field names are the variable names."""

    model_config = SettingsConfigDict(
        env_file=None,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user:pass@host:port/db; several hosts for "
        "failover). Unset: a private embedded PostgreSQL in DATA_DIR.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL (redis://host:port/db). Unset: in-process cache only.",
    )
    redis_key_prefix: str = Field(
        default="halldyll",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every Redis key, so several deployments can share one Redis.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the embedded PostgreSQL keeps its data (when DATABASE_URL is unset).",
    )
    embedded_database: str = Field(
        default="halldyll",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Database name created inside the embedded PostgreSQL.",
    )
    embedding_model: Literal["minilm", "use-multilingual"] = Field(
        default="minilm",
        description="Packaged text encoder: minilm (all-MiniLM-L6-v2, English, 384-d) or "
        "use-multilingual (Universal Sentence Encoder Multilingual v3, 16 languages in one "
        "vector space, 512-d; the 'multilingual' extra). EMBEDDING_MODEL_PATH replaces "
        "minilm with a model of your own.",
    )
    embedding_model_path: Path | None = Field(
        default=None,
        description="ONNX text encoder: a folder with model.onnx and tokenizer.json, or an .onnx "
        "file with tokenizer.json beside it. Unset: packaged all-MiniLM-L6-v2 (int8).",
    )
    embedding_dimension: int = Field(
        default=384,
        ge=8,
        le=4000,
        description="Vector size, checked against the model. Default: the model's own (384 "
        "for minilm, 512 for use-multilingual).",
    )
    embedding_provider: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="ONNX Runtime execution provider: auto (CUDA when available), cpu or cuda.",
    )
    embedding_batch_size: int = Field(default=32, ge=1, le=1024)
    embedding_cpu_mem_arena: bool = Field(
        default=True,
        description="ONNX Runtime's CPU memory arena on the encoder session. Off, a process "
        "keeps ~70 MB less after batched encodes (more with many batch shapes) but bulk "
        "encodes ran 7% slower (benchmarks/encoder_arena.py).",
    )
    embedding_max_seq_length: int = Field(
        default=256,
        ge=2,
        le=8192,
        description="Tokens (special tokens included) a text is truncated to for embedding; "
        "part of the model's identity: changing it re-embeds the stored memories.",
    )
    reembed_batch_size: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Chunks embedded per transaction when the embedding model changes.",
    )
    reembed_in_background: bool = Field(
        default=True,
        description="Started with another model than the database's: re-embed every stored "
        "chunk in a background task of this process (false: leave it to `halldyll reembed`; "
        "either way the process follows the switch).",
    )
    search_top_k: int = Field(
        default=10,
        ge=1,
        le=MAX_SEARCH_LIMIT,
        description="Results of a search that names no limit: at most 100, the most any "
        "search returns (a larger value would refuse every such search).",
    )
    page_max_bytes: int = Field(
        default=PAGE_MAX_BYTES,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Bytes of memory text (content and payload) one page of a listing holds "
        "at most: a page ends early, with a next_cursor, past this many (it always holds one "
        "memory). 500 transcriptions of 200,000 characters made one page of 100 MB.",
    )
    search_mode: Literal["semantic", "hybrid", "fulltext"] = Field(
        default="hybrid",
        description="Default search mode. hybrid: the vector and BM25 full-text lists "
        "ranked together by a learned model (cosine, BM25 coverage, neighbours and memory, "
        "length, speaker named); on the LoCoMo development split it finds more evidence turns "
        "than either alone (benchmarks/results/locomo.md).",
    )
    hybrid_semantic_weight: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        description="Hybrid ranking: weight of the cosine similarity in the fused score of a "
        "part's neighbours and memory, two features of the learned ranking (fitted at 0.4); "
        "the BM25 share of the query's weight gets the rest. 0.4 was best on the LoCoMo "
        "development split before the learned ranking (flat from 0.3 to 0.45).",
    )
    similarity_threshold: float = Field(default=DEFAULT_SIMILARITY_THRESHOLD, ge=-1.0, le=1.0)
    hnsw_ef_search: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="pgvector hnsw.ef_search: candidates kept per HNSW scan (recall vs speed).",
    )
    large_user_index_rows: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000_000,
        description="Users with at least this many searchable rows get a partial HNSW index "
        "of their own (`halldyll index-users`).",
    )
    cache_size: int = Field(default=1000, ge=0, le=10_000_000)
    search_cache_ttl_seconds: int = Field(default=60, ge=0, le=86_400)
    ephemeral_fact_ttl_days: float = Field(default=30, gt=0, le=36_500)
    store_batch_max: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Most memories one bulk store (store_memories, POST .../memories/batch) "
        "takes; more is refused (InvalidInput, HTTP 422) and nothing is stored.",
    )
    fact_merge_similarity: float = Field(
        default=0.92,
        gt=0.5,
        le=1.0,
        description="Cosine similarity at which a new fact merges into an existing one.",
    )
    fact_promotion_confidence: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Confidence at which a reinforced ephemeral fact becomes permanent.",
    )
    fact_consolidation_neighbours: int = Field(
        default=5,
        ge=1,
        le=50,
        description="Stored facts shown to the model beside each fact it learns from a turn "
        "(the closest open facts of the same model scope).",
    )
    fact_consolidation_min_similarity: float = Field(
        default=0.4,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity below which a stored fact is not shown to the model as a "
        "candidate to reinforce, update or contradict. With all-MiniLM-L6-v2 an update scores "
        "0.5-0.65 ('lives in Paris' / 'moved to Berlin'), unrelated facts 0.2-0.3.",
    )
    fact_contradiction_floor: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="A contradicted fact whose confidence falls below this is closed.",
    )
    session_summary_max_words: int = Field(
        default=120, ge=10, le=2000, description="Words of a session summary a model writes."
    )
    summary_rollup_after_days: float = Field(
        default=30,
        gt=0,
        le=36_500,
        description="Sessions quiet for this long are rolled up into period summaries (one per "
        "calendar month and model scope).",
    )
    period_summary_max_words: int = Field(
        default=100, ge=10, le=4000, description="Words of a period summary a model writes."
    )
    max_context_tokens: int = Field(default=4000, ge=32, le=1_000_000)
    context_history_share: float = Field(
        default=0.2,
        ge=0.0,
        le=0.5,
        description="Largest share of a context's budget for the user's earlier sessions "
        "(period summaries, or the session summaries they cover when the budget allows); 0: "
        "no history section.",
    )
    context_recency_half_life_days: float = Field(default=14, gt=0, le=36_500)
    context_weight_similarity: float = Field(default=0.7, ge=0, le=1)
    context_weight_recency: float = Field(default=0.15, ge=0, le=1)
    context_weight_salience: float = Field(default=0.15, ge=0, le=1)
    session_summary_every_n_turns: int = Field(default=5, ge=1, le=1000)
    memory_extraction: Literal["auto", "inline", "background"] = Field(
        default="auto",
        description="How record_turn learns from a turn. inline: candidate facts and the "
        "session summary are written before it returns (the heuristic model); background: it "
        "queues durable jobs in the turn's transaction and returns (stored conversations queue "
        "extraction too), workers run them with the memory model. auto: background when an LLM "
        "is configured, else inline.",
    )
    jobs_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Background jobs one process runs at once (an Ingestion replica, or an "
        "in-process engine); 0: this process runs none.",
    )
    jobs_poll_seconds: float = Field(
        default=2.0,
        ge=0.01,
        le=300,
        description="Idle workers look for due jobs (retries, jobs of a dead worker) this "
        "often; a new job wakes them at once (LISTEN/NOTIFY).",
    )
    jobs_max_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Tries of a job before it is failed for good, its last error kept.",
    )
    jobs_retry_base_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="Backoff before the second try; doubled for each further one (at most "
        "10 minutes), with jitter.",
    )
    jobs_lease_seconds: float = Field(
        default=60,
        ge=0.5,
        le=3600,
        description="How long a worker holds a job without renewing its lease (it renews every "
        "third of it); a job whose worker died is taken again after this.",
    )
    jobs_timeout_seconds: float = Field(
        default=300,
        gt=0,
        le=86_400,
        description="A try running longer is stopped and counts as failed.",
    )
    jobs_retention_hours: float = Field(
        default=168,
        gt=0,
        le=87_600,
        description="Done and failed jobs older than this are deleted by `halldyll purge-expired`.",
    )
    db_pool_size: int = Field(default=5, ge=1, le=200)
    db_command_timeout_seconds: float = Field(default=30, gt=0, le=3600)
    db_role: str | None = Field(
        default="halldyll_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Role each connection switches to (SET ROLE); it owns nothing and cannot "
        "bypass row-level security. Empty: keep the login role (which must then be such a role).",
    )

    @field_validator("data_dir", mode="before")
    @classmethod
    def _check_data_dir(cls, value: object) -> object:
        # Empty is unset, as for every other setting (Path("") is the current folder).
        if value == "":
            return _default_data_dir()
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a folder path, not blanks (unset it for the default)")
        return value

    @field_validator("db_role", mode="before")
    @classmethod
    def _empty_role(cls, value: object) -> object:
        return None if value == "" else value

    api_key_secret: SecretStr | None = Field(
        default=None,
        min_length=32,
        description="HMAC key for API key hashes (32+ characters). Unset: a random key "
        "generated by the migrations and kept in the database.",
    )
    audit_retention_days: int = Field(
        default=365,
        ge=1,
        le=36_500,
        description="Audit rows older than this are deleted by `halldyll purge-audit`.",
    )
    events_retention_hours: float = Field(
        default=168,
        gt=0,
        le=87_600,
        description="Change feed events older than this are deleted by `halldyll purge-expired`; "
        "a client resuming from before them is told to resync.",
    )
    events_keepalive_seconds: float = Field(
        default=15,
        ge=1,
        le=300,
        description="Seconds between keep-alive comments on an idle change feed stream.",
    )
    events_max_streams: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="Change feed subscriptions one process (an Ingress replica) serves at once; "
        "past it a new one gets 503. Each open stream holds one of the replica's "
        "max_ongoing_requests: keep this well under it, or streams starve the REST API.",
    )
    events_recheck_seconds: float = Field(
        default=30,
        ge=0.1,
        le=3600,
        description="Seconds between checks, on an open change feed stream, that its API key, "
        "permission and user still hold; also how long one send to a client that reads "
        "nothing may wait before the stream ends.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    llm_provider: Literal["none", "openai", "serve"] = Field(
        default="none",
        description="The LLM behind the background memory jobs (#14). none: no LLM "
        "(heuristic extraction and extractive summaries); openai: an OpenAI-compatible "
        "chat-completions endpoint at LLM_BASE_URL; serve: a co-located Ray Serve "
        "application (LLM_SERVE_APP) called by handle.",
    )
    llm_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="API root of the OpenAI-compatible endpoint, ending in /v1 "
        "(http://127.0.0.1:8000/v1). Only with LLM_PROVIDER=openai.",
    )
    llm_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token for LLM_BASE_URL; never logged. Unset: none sent.",
    )
    llm_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Model id sent in each request (as the server lists it at /v1/models); "
        "also names the model in audit rows and job results. Required with an LLM.",
    )
    llm_timeout_s: float = Field(
        default=60, gt=0, le=3600, description="Seconds one LLM call (one attempt) may take."
    )
    llm_max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Further attempts after a transient LLM failure (timeout, 429, 5xx, "
        "connection), with exponential backoff.",
    )
    llm_max_concurrency: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="LLM calls in flight at once from one process; more wait their turn.",
    )
    llm_structured_output: Literal["json_schema", "json_object", "none"] = Field(
        default="json_schema",
        description="How answers are constrained: json_schema (response_format with the "
        "answer's schema), json_object, or none (the prompt only). A server that refuses "
        "one gets the next; every answer is validated on our side either way.",
    )
    llm_serve_app: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Name of the co-located Ray Serve application serving the model "
        "(LLM_PROVIDER=serve).",
    )
    llm_serve_method: str = Field(
        default="chat_completions",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="Method of that application's ingress deployment taking an OpenAI "
        "chat-completions request body (a dict) and returning the response body.",
    )

    @field_validator("llm_base_url", "llm_model", "llm_serve_app", "llm_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("llm_base_url")
    @classmethod
    def _check_llm_base_url(cls, value: str | None) -> str | None:
        if value is not None:
            # The check of the HTTP client that will call it: a port past 65535, a '[' without
            # its ']' failed each LLM call instead of the start.
            from halldyll_ray.client.requests import check_base_url

            try:
                check_base_url(value)
            except HalldyllError as exc:
                raise ValueError(exc.message.removeprefix("base_url ")) from None
        return value

    @field_validator("llm_api_key")
    @classmethod
    def _check_llm_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Sent in an HTTP header: a line break or a non-ASCII letter failed each call.
        if value is not None and not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("must be the key alone: printable ASCII without spaces")
        return value

    @field_validator("llm_provider", "llm_structured_output", mode="before")
    @classmethod
    def _lower_llm(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_llm(self) -> Settings:
        provider = self.llm_provider
        if provider == "none":
            stray = [
                name
                for name, value in (
                    ("LLM_BASE_URL", self.llm_base_url),
                    ("LLM_SERVE_APP", self.llm_serve_app),
                    ("LLM_MODEL", self.llm_model),
                )
                if value is not None
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but LLM_PROVIDER is none: set LLM_PROVIDER "
                    "(openai or serve) to use the LLM, or unset them"
                )
            return self
        if self.llm_model is None:
            raise ValueError(f"LLM_PROVIDER={provider} needs LLM_MODEL (the model id to ask for)")
        if provider == "openai":
            if self.llm_base_url is None:
                raise ValueError(
                    "LLM_PROVIDER=openai needs LLM_BASE_URL (for example http://127.0.0.1:8000/v1)"
                )
            if self.llm_serve_app is not None:
                raise ValueError("LLM_SERVE_APP is for LLM_PROVIDER=serve; unset it")
        else:
            if self.llm_serve_app is None:
                raise ValueError(
                    "LLM_PROVIDER=serve needs LLM_SERVE_APP (the Serve application's name)"
                )
            if self.llm_base_url is not None or self.llm_api_key is not None:
                raise ValueError(
                    "LLM_BASE_URL and LLM_API_KEY are for LLM_PROVIDER=openai; unset them"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _model_dimension(cls, data: object) -> object:
        # EMBEDDING_DIMENSION defaults to the chosen packaged model's size.
        if isinstance(data, dict):
            model = str(data.get("embedding_model", "")).strip().lower()
            if model == "use-multilingual" and data.get("embedding_dimension") in (None, ""):
                return {**data, "embedding_dimension": 512}
        return data

    @field_validator("log_level", "embedding_provider", "embedding_model", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("memory_extraction", mode="before")
    @classmethod
    def _lower_mode(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            check_postgres_url(value.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"{exc}; unset it to use the embedded PostgreSQL") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            check_redis_url(value.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"{exc}; unset it to cache in-process only") from None
        return value

    @field_validator("embedding_model_path")
    @classmethod
    def _check_model_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None or str(value) == "":
            return None
        model = info.data.get("embedding_model", "minilm")
        if model != "minilm":
            # A field error (not a model one): the message then shows this value only.
            raise ValueError(
                f"EMBEDDING_MODEL={model} and EMBEDDING_MODEL_PATH name two models: unset "
                "EMBEDDING_MODEL_PATH to use the packaged one, or EMBEDDING_MODEL to use "
                "your own file"
            )
        try:
            exists = value.exists()
        except OSError:  # a name too long for the file system, say
            exists = False
        if not exists:
            raise ValueError(
                f"{quoted(str(value))} does not exist; point it at a folder holding model.onnx and "
                "tokenizer.json, or unset it to use the packaged all-MiniLM-L6-v2"
            )
        return value

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read the environment, raising ConfigurationError with one line per bad variable.

        The line names the variable and the rule; it shows the value only for settings that
        cannot hold a secret (every ``SecretStr`` field and any name with SECRET, PASSWORD,
        TOKEN, KEY or _URL in it is never echoed, nor the input of a check across settings,
        which is all of them).
        """
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                name = ".".join(str(part) for part in error["loc"]).upper() or "SETTINGS"
                value = error.get("input")
                # A check across settings (no loc) gets them all as its input: never shown.
                secret = (
                    not error["loc"]
                    or name in _SECRET_FIELDS
                    or any(word in name for word in ("SECRET", "PASSWORD", "TOKEN", "KEY", "_URL"))
                )
                shown = "" if secret else f" (got {quoted(value)})"
                message = error_message(error)
                lines.append(f"{name}: {message}{shown}")
            raise ConfigurationError(
                "invalid configuration:\n  " + "\n  ".join(lines), variables=len(lines)
            ) from None

    @property
    def context_weights(self) -> tuple[float, float, float]:
        """(similarity, recency, salience) weights of the context ranking."""
        return (
            self.context_weight_similarity,
            self.context_weight_recency,
            self.context_weight_salience,
        )


#: Settings whose values are secrets: never shown in an error message or a log.
_SECRET_FIELDS = frozenset(
    name.upper()
    for name, field in Settings.model_fields.items()
    if "SecretStr" in str(field.annotation)
)

__all__ = ["DEFAULT_SIMILARITY_THRESHOLD", "Settings"]
