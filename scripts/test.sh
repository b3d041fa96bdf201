#!/usr/bin/env bash
# What CI runs after the install: the house habits (format, lint, types, sizes), then the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_manifest.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
.venv/bin/mypy
.venv/bin/python scripts/check_sizes.py farm
exec .venv/bin/python -m pytest -q "$@"
