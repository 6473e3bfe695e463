#!/usr/bin/env bash
# Install mediagate with its dev tools, then lint, type-check and run every test.
# Integration tests start one local Ray instance for the whole session.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# Debian packages the tests drive for real: redis-server (the Redis backend's tests
# start their own on a free port), prometheus (the metrics test scrapes the service) and
# chromium (the console's browser tests, through playwright; no browser is downloaded).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2
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
