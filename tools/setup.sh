#!/usr/bin/env bash
# Creates .venv with everything the project needs on a CPU-only machine; idempotent.
#
#   bash tools/setup.sh            runtime + dev tools (tests, ruff, triton interpreter)
#
# torch is pinned to 2.13.0: on the project's CPU machines that resolves to the local
# CPU wheel, while an unpinned torch would pull a multi-GB CUDA build. triton 3.7.1 is
# the release torch 2.13 pairs with; its interpreter runs the kernels on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,trl]"  # [trl]: CI runs the TRL tests
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
