#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine, under 8 minutes on one GPU (docs/benchmarks.md, "GPU check").
#
#   scripts/gpu_check.sh          # a CUDA machine: nvidia-smi and torch.cuda, make-tiny of both released kinds,
#                                 # pytest -m gpu tests/gpu, benchmarks/bench_gpu.py --device cuda
#   scripts/gpu_check.sh --cpu    # the CPU-runnable parts (make-tiny, the gpu tests reported skipped, the
#                                 # benchmark on the CPU): exercises this script where there is no GPU
#
# Exits non-zero on any failure, naming the step (a failing test does not stop the benchmark: device time is
# scarce); every step runs under `timeout` with what is left of the 8 minutes. PYTHON picks the interpreter
# (default python3); this checkout goes first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

mode=cuda
case "${1:-}" in
  "") ;;
  --cpu) mode=cpu ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--cpu]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
budget=480  # seconds: the whole check
start=$(date +%s)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/posterrl-gpu-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

failed=()  # the checks that failed; the later steps still run (device time is scarce), the exit status says it

# run NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (MAX_SECONDS or what is left of the budget, whichever
# is less), its output shown and kept in $tmp/NAME.log; returns its status (124: ran out of time).
run() {
  local name=$1 cap=$2
  shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -le 0 ]; then
    echo "gpu check: no time left for '$name' (budget ${budget} s)" >&2
    return 124
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (limit ${limit} s)"
  local began rc
  began=$(date +%s)
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$tmp/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== $name: FAILED, ran past ${limit} s" >&2
    return 124
  elif [ "$rc" -ne 0 ]; then
    echo "== $name: FAILED, exit status $rc" >&2
    return "$rc"
  fi
  echo "== $name: ok in $(( $(date +%s) - began )) s"
}

# step: a step the rest needs; the check stops at its failure.
step() {
  local rc=0
  run "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "gpu check FAILED at '$1'" >&2
    exit 1
  fi
}

# check: a step whose failure is noted; the check goes on and exits non-zero at the end.
check() {
  run "$@" || failed+=("$1")
}

# 1. the device
if [ "$mode" = cuda ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "gpu check FAILED: nvidia-smi not found (no NVIDIA driver?); scripts/gpu_check.sh --cpu runs the CPU parts" >&2
    exit 1
  fi
  step nvidia-smi 30 nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  step torch-cuda 60 "$PYTHON" -c '
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device (a CPU build of torch?)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
x = torch.randn(256, 256, device="cuda")
assert torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-2), "a matmul on the GPU differs from the CPU"'
else
  step torch 60 "$PYTHON" -c '
import torch
print(f"--cpu: torch {torch.__version__}, torch.cuda.is_available() = {torch.cuda.is_available()}; "
      "the gpu tests will report skipped, the benchmark runs on the CPU")'
fi

# 2. tiny checkpoints of both released kinds, through the command line
step make-tiny-flux_kontext 120 "$PYTHON" -m posterrl.cli model make-tiny --kind flux_kontext --out "$tmp/flux_kontext"
step make-tiny-qwen_image_edit 120 "$PYTHON" -m posterrl.cli model make-tiny --kind qwen_image_edit \
  --out "$tmp/qwen_image_edit"

# 3. the gpu tests (-rs: each skip says what it needs)
check pytest-gpu 300 "$PYTHON" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider

# 4. the benchmark, on the checkpoint made above
check bench 300 "$PYTHON" benchmarks/bench_gpu.py --device "$mode" --checkpoint "$tmp/flux_kontext"

echo
grep -E '^(SKIPPED|FAILED|ERROR|[0-9]+ (passed|skipped|failed))' "$tmp/pytest-gpu.log" || true
sed -n '/^tiny FLUX.1 Kontext on/,/^(actor groups/p' "$tmp/bench.log"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu check ($mode) FAILED in $(( $(date +%s) - start )) s: ${failed[*]}" >&2
  exit 1
fi
echo "gpu check ($mode) passed in $(( $(date +%s) - start )) s"
