#!/usr/bin/env bash
# Install mediagate with its dev tools, then lint, type-check and run every test.
# Integration tests start one local Ray instance for the whole session.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# The Redis backend's tests start their own redis-server on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing redis-server"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing: install it (e.g. apt-get install redis-server)" >&2
        exit 1
    fi
fi
. .venv/bin/activate
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
