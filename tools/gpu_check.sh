#!/usr/bin/env bash
# GPU check of the vocab-parallel CUDA kernels on one H100/H200 (torch 2.11+cu130, Python 3.12,
# nvcc 13.0, no internet): builds the extension with its CUDA kernels, compares the CUDA results
# with float64 references, times the kernels next to a device-to-device copy, and writes
# RESULTS_DIR/gpu_check_results.json (+ build.log, gpu_check.log). Takes a few minutes (< 10).
# Usage: bash tools/gpu_check.sh [RESULTS_DIR]   (default: $OUT if set, else ./gpu_check_results)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS_DIR="${1:-${OUT:-$ROOT/gpu_check_results}}"
mkdir -p "$RESULTS_DIR"
PYTHON="${PYTHON:-python}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MEGATRON_RL_FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # H100 / H200 only: one arch builds fast
export MAX_JOBS="${MAX_JOBS:-8}"

echo "== building the extension (CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST)"
start=$SECONDS
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$RESULTS_DIR/build.log" 2>&1; then
  echo "pip install -e . failed (tail of build.log below); trying setup.py build_ext --inplace"
  tail -n 30 "$RESULTS_DIR/build.log"
  "$PYTHON" setup.py build_ext --inplace >>"$RESULTS_DIR/build.log" 2>&1 || { tail -n 60 "$RESULTS_DIR/build.log"; exit 1; }
fi
echo "built in $((SECONDS - start)) s"
"$PYTHON" -c "import megatron_rl._C as c; assert c.with_cuda, 'extension built without CUDA'; print('with_cuda', c.with_cuda)"

echo "== checks and timings"
"$PYTHON" tools/gpu_check.py --out "$RESULTS_DIR/gpu_check_results.json" 2>&1 | tee "$RESULTS_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
