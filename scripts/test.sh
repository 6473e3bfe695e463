#!/usr/bin/env bash
# Install mediagate with its dev tools, then lint, type-check and run every test.
# Integration tests start one local Ray instance for the whole session.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
