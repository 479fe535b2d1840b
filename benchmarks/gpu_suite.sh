#!/usr/bin/env bash
# Every GPU check of the project in one run, figures as JSON and Markdown under OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR            # on one H100/H200: <= 8 minutes
#   bash benchmarks/gpu_suite.sh --dry-run OUTDIR  # CPU, tiny sizes (what CI runs)
#
# Steps (each with its own timeout; a failed or timed-out step is recorded and the suite
# goes on; on a GPU the timeouts sum to 450 s (+ 3 s grace each), so the run ends within
# 8 minutes):
#   env           device, driver, versions
#   tests_ops     the kernel and fused-op tests (tests/trainer/ops) compiled on CUDA
#   tests_gpu     the other @pytest.mark.gpu tests (trainer, teacher service)
#   dense_kl      benchmarks/bench_dense_kl.py: full-vocab and top-K kernels vs copy
#                 bandwidth, eager and torch.compile (N=8192, V=151,936, K=64, bf16)
#   fused_lm_head benchmarks/bench_fused_lm_head.py (N=8192, d=3584, V=151,936, K=64, bf16)
#   service       benchmarks/bench_service.py: torch backend, bf16, a random model of
#                 Qwen2.5-0.5B's shape, 16 gRPC clients vs in-process
#   vllm          benchmarks/bench_vllm.py: the vLLM backend vs offline vLLM, run by
#                 $VLLM_PYTHON (vLLM lives in its own environment)
# Output: OUTDIR/summary.md, OUTDIR/summary.json (every step's status, seconds and
# figures), OUTDIR/<step>.json (each benchmark's own JSON), OUTDIR/logs/<step>.log.
# --dry-run runs the same steps on the CPU at tiny sizes, with timeouts of minutes (a shared
# CPU can take a minute just to import torch): the GPU tests are collected and
# skipped, the Triton kernels run under the interpreter, the vLLM step only checks that
# vLLM is installed and the script parses its flags (an engine start alone takes 15-50 s).
#
# Environment: PYTHON (default .venv/bin/python), VLLM_PYTHON (default
# .venv-vllm/bin/python), SUITE_T_<STEP> (a step's timeout in seconds, e.g. SUITE_T_VLLM),
# SUITE_STEPS (comma-separated step names: run only those, e.g. to rerun one that failed).
# Exit status: 0 when every step that ran succeeded or was skipped, else 1.
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1/logs"
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
VLLM_PY=${VLLM_PYTHON:-$ROOT/.venv-vllm/bin/python}
STEPS="$OUT/steps.tsv"
: >"$STEPS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUITE_START=$(date +%s)

selected() { [ -z "${SUITE_STEPS:-}" ] || [[ ",$SUITE_STEPS," == *",$1,"* ]]; }

# record NAME STATUS RC SECONDS TIMEOUT JSON COMMAND...
record() {
  local name=$1 status=$2 rc=$3 secs=$4 tmo=$5 json=$6
  shift 6
  local cmd="$*"
  cmd=${cmd//$'\n'/ }  # one line per step in the TSV
  cmd=${cmd//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$tmo" "$json" "$cmd" >>"$STEPS"
  echo "== $name: $status (rc $rc, ${secs}s of ${tmo}s)"
}

# step NAME TIMEOUT JSON COMMAND...: run COMMAND with a timeout, log its output, record it.
step() {
  local name=$1 tmo=$2 json=$3
  shift 3
  selected "$name" || return 0
  local var="SUITE_T_${name^^}"
  tmo=${!var:-$tmo}
  echo "== $name (timeout ${tmo}s): $*"
  local t0 rc status ms
  t0=$(date +%s%N)
  timeout --kill-after=3 "$tmo" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  ms=$((($(date +%s%N) - t0) / 1000000))
  record "$name" "$status" "$rc" "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))" "$tmo" \
    "$json" "$@"
}

skip() {  # skip NAME REASON
  selected "$1" || return 0
  echo "$2" >"$OUT/logs/$1.log"
  record "$1" skipped - 0 0 - "$2"
}

# -- env -------------------------------------------------------------------------------
step env $((DRY ? 120 : 15)) "$OUT/env.json" "$PY" - "$OUT/env.json" "$DRY" <<'EOF'
import datetime, json, platform, subprocess, sys
import torch
info = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "dry_run": sys.argv[2] == "1",
    "host": platform.node(),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=4)
    info["nvidia_smi"] = smi.stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(json.dumps(info))
EOF

# -- tests -----------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if [ $DRY = 1 ]; then  # collected and skipped on a CPU: proves the markers and imports
  step tests_ops 300 "$OUT/tests_ops.xml" "${PYTEST[@]}" -m gpu tests/trainer/ops \
    --junitxml "$OUT/tests_ops.xml"
else
  step tests_ops 90 "$OUT/tests_ops.xml" "${PYTEST[@]}" tests/trainer/ops \
    --junitxml "$OUT/tests_ops.xml"
fi
step tests_gpu $((DRY ? 300 : 40)) "$OUT/tests_gpu.xml" "${PYTEST[@]}" -m gpu tests/trainer/test_train.py \
  tests/teacher_service/test_gpu_memory.py --junitxml "$OUT/tests_gpu.xml"

# -- kernel benchmarks -------------------------------------------------------------------
if [ $DRY = 1 ]; then
  step dense_kl 300 "$OUT/dense_kl.json" env TRITON_INTERPRET=1 OMP_NUM_THREADS=1 \
    "$PY" -m benchmarks.bench_dense_kl --device cpu --tiny --json "$OUT/dense_kl.json"
else
  step dense_kl 90 "$OUT/dense_kl.json" "$PY" -m benchmarks.bench_dense_kl --device cuda \
    --dtype bf16 --n 8192 --v 151936 --k 64 --reps 10 --json "$OUT/dense_kl.json"
fi

if [ ! -f benchmarks/bench_fused_lm_head.py ]; then
  skip fused_lm_head "benchmarks/bench_fused_lm_head.py not found"
elif [ $DRY = 1 ]; then
  step fused_lm_head 300 "$OUT/fused_lm_head.json" env TRITON_INTERPRET=1 OMP_NUM_THREADS=1 \
    "$PY" -m benchmarks.bench_fused_lm_head --dry-run --json "$OUT/fused_lm_head.json"
else
  step fused_lm_head 75 "$OUT/fused_lm_head.json" "$PY" -m benchmarks.bench_fused_lm_head \
    --device cuda --dtype bf16 --n 8192 --d 3584 --v 151936 --k 64 \
    --json "$OUT/fused_lm_head.json"
fi

# -- teacher service -------------------------------------------------------------------
if [ $DRY = 1 ]; then
  step service 300 "$OUT/service.json" "$PY" benchmarks/bench_service.py --vocab 256 \
    --hidden 32 --layers 1 --heads 2 --sequences 8 --length 32 --start 16 --top-k 8 \
    --clients 2 --repeats 1 --torch-threads 1 --json "$OUT/service.json"
else
  step service 60 "$OUT/service.json" "$PY" benchmarks/bench_service.py \
    --preset qwen2.5-0.5b --device cuda --weight-dtype bfloat16 --dtype bfloat16 \
    --sequences 128 --length 512 --start 256 --top-k 64 --clients 16 --repeats 2 \
    --json "$OUT/service.json"
fi

# -- vLLM ------------------------------------------------------------------------------
if [ ! -x "$VLLM_PY" ]; then
  skip vllm "no vLLM environment at $VLLM_PY (set VLLM_PYTHON)"
elif [ $DRY = 1 ]; then
  step vllm 300 - "$VLLM_PY" -c "import importlib.util, runpy, sys
assert importlib.util.find_spec('vllm'), 'vllm is not installed in this environment'
sys.argv = ['bench_vllm.py', '--help']
try:
    runpy.run_path('benchmarks/bench_vllm.py', run_name='__main__')
except SystemExit as e:
    assert e.code in (0, None), e.code
print('vllm is installed; bench_vllm.py parses its flags')"
else
  step vllm 80 "$OUT/vllm.json" "$VLLM_PY" benchmarks/bench_vllm.py --vocab 32000 \
    --hidden 1024 --layers 8 --heads 16 --sequences 256 --length 1024 --start 512 \
    --repeats 1 --clients 4 --json "$OUT/vllm.json"
fi

# -- report ----------------------------------------------------------------------------
"$PY" -m benchmarks.gpu_suite_report "$OUT" --dry-run "$DRY" \
  --seconds "$(($(date +%s) - SUITE_START))"
