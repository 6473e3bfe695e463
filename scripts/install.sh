#!/usr/bin/env bash
# Install mediagate into ./.venv. `scripts/install.sh dev` adds the test and lint tools.
# Without an NVIDIA GPU the CPU build of torch is installed first (an unpinned torch
# would pull a multi-GB CUDA build); with one, pip picks the CUDA build as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  echo "no GPU found: installing the CPU build of torch ${TORCH_CPU_VERSION}" >&2
  python -m pip install --quiet "torch==${TORCH_CPU_VERSION}"
fi

if [ "${1:-}" = "dev" ]; then
  python -m pip install --quiet -e ".[dev]"
  # The previous major version of the openai client, apart (its tests put it first on
  # PYTHONPATH in a subprocess): mediagate must answer 2.x clients as well as 3.x ones.
  if [ ! -d .venv/openai-2/openai ]; then
    python -m pip install --quiet --no-deps --target .venv/openai-2 "openai>=2.54,<3" distro
  fi
else
  python -m pip install --quiet -e .
fi
echo "installed mediagate into $(pwd)/.venv" >&2
