#!/usr/bin/env bash
# Compile-checks the torch-free CUDA kernels (csrc/cuda/*.cu) with plain nvcc for sm_90, since CI
# has no GPU and no CUDA build of torch. Compiles to objects in a temporary directory; exits
# non-zero on any compile error; skips (exit 0) with a message when nvcc is absent.
# Usage: bash ci/check_cuda_kernels.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_kernels: nvcc not found (set NVCC or install the CUDA toolkit); skipping"
  exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_kernels: no .cu files under csrc/cuda" >&2
  exit 1
fi

"$NVCC" --version | tail -n 1
for src in "${sources[@]}"; do
  # Same flags as setup.py's CUDA build, plus warnings as errors for the kernel sources.
  "$NVCC" -c "$src" -o "$OUT/$(basename "$src" .cu).o" -I "$ROOT/csrc" \
    -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -lineinfo \
    -gencode arch=compute_90,code=sm_90 -Xcompiler -Wall -Werror all-warnings
  echo "check_cuda_kernels: OK $(realpath --relative-to="$ROOT" "$src")"
done
