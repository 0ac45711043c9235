"""Run schemathesis against the running HTTP API, as its OpenAPI schema describes it.

Starts everything on this machine, on free loopback ports, and stops it all at the end:
- a private embedded PostgreSQL in a temporary folder, migrated;
- Ray and the Serve app of ``build_app`` (the product's Serve environment);
- an Admin user and its API key.

Then it runs ``schemathesis run <url>/openapi.json --checks all`` (less positive data
acceptance: see the comment below; ``<url>/graphql`` with ``--graphql``, its schema read by
introspection, and GraphQL's errors judged by ``scripts/fuzz_hooks.py``) with that key for
``--max-time`` seconds and exits with schemathesis's status (0: no failure). Extra arguments
after ``--`` go to schemathesis.

Usage (about ``--max-time`` + 60 s)::

    .venv/bin/python scripts/fuzz_http.py [--max-time 180] [--graphql] [-- --phases fuzzing]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _admin_key(database_url: str) -> str:
    from halldyll_ray import MemoryEngine, Settings

    settings = Settings.from_env(database_url=database_url, redis_url=None)
    async with MemoryEngine(settings) as engine:
        admin = await engine.create_user("fuzzadmin", None, "admin")
        return (await engine.create_api_key(admin.id, name="schemathesis")).key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-time", type=int, default=180, help="schemathesis time budget (s)")
    parser.add_argument(
        "--graphql", action="store_true", help="fuzz POST /graphql instead of the REST routes"
    )
    parser.add_argument("extra", nargs="*", help="after --: more schemathesis options")
    args = parser.parse_args()

    from halldyll_ray import serve_env

    serve_env.apply()  # before Ray is imported: Serve reads it at import
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    import ray
    from ray import serve

    from halldyll_ray.serve import build_app
    from halldyll_ray.serve_local import free_port
    from halldyll_ray.storage.embedded import EmbeddedPostgres
    from halldyll_ray.storage.migrate import apply_migrations

    with tempfile.TemporaryDirectory(prefix="hr-fuzz-") as tmp:
        server = EmbeddedPostgres(Path(tmp), database="fuzz")
        url = asyncio.run(server.start_async())
        try:
            asyncio.run(apply_migrations(url, embedding_dimension=384))
            key = asyncio.run(_admin_key(url))
            port = free_port()
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"settings": {"DATABASE_URL": url}}), name="fuzz", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            command = [
                str(Path(sys.executable).with_name("schemathesis")),
                # Check settings the command line cannot give (see the file's comments).
                "--config-file",
                str(ROOT / "scripts" / "schemathesis.toml"),
                "run",
                f"{base}/graphql" if args.graphql else f"{base}/openapi.json",
                "--checks",
                "all",
                # Positive data acceptance expects every schema-valid request to succeed, but
                # some rules cannot be written in OpenAPI: a cursor must be one the API
                # returned, expires_at must be in the future, grants are for Viewers, a
                # context needs a query or messages. Those answer 422 by design.
                "--exclude-checks",
                # GraphQL's own server-error check takes the API's refusals (lowercase REST
                # codes, not Apollo's) for server errors: fuzz_hooks.py judges them instead.
                "positive_data_acceptance" + (",not_a_server_error" if args.graphql else ""),
                "--header",
                f"Authorization: Bearer {key}",
                "--max-time",
                str(args.max_time),
                "--workers",
                "2",
                "--report",
                "junit",
                "--report-dir",
                str(ROOT / "benchmarks" / "results" / "schemathesis"),
                # The run's own Admin must stay one: deleting, disabling or demoting itself
                # ("me") would turn the rest of the run into 401s. (GraphQL has neither.)
                *(
                    []
                    if args.graphql
                    else [
                        "--exclude-name",
                        "DELETE /v1/users/{user_id}",
                        "--exclude-name",
                        "PATCH /v1/users/{user_id}",
                    ]
                ),
                *args.extra,
            ]
            shown = [
                part if not part.startswith("Authorization") else "Authorization: ***"
                for part in command
            ]
            print("$", " ".join(shown), flush=True)
            started = time.monotonic()
            # The import's NDJSON body needs a serializer of our own (scripts/fuzz_hooks.py).
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks"}
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")])
            )
            status = subprocess.run(command, check=False, env=env).returncode
            print(f"schemathesis exited {status} after {time.monotonic() - started:.0f} s")
            return status
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
