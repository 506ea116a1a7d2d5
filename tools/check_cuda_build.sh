#!/usr/bin/env bash
# Builds megatron_rl._C with its CUDA kernels and ATen CUDA launchers on a machine without a GPU,
# against a CUDA build of torch in a throwaway venv, then runs the op tests on the CPU kernels of
# that library. What CI's ci/check_cuda_kernels.sh (plain nvcc on the torch-free .cu) cannot see:
# the launchers (csrc/cuda/*.cpp) against torch's CUDA headers, and that the CUDA-built library
# registers and runs every op. 2-6 minutes (mostly installing the torch wheel) and 6 GB of disk;
# not part of CI.
# Usage: bash tools/check_cuda_build.sh [WORK_DIR]   (CUDA_HOME: the toolkit, default /usr/local/cuda;
#        TORCH_SPEC: the torch to install, default torch==2.14.1, a CUDA 13.0 build here)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3.11}"

"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "${TORCH_SPEC:-torch==2.14.1}" setuptools packaging ninja numpy \
  pytest pytest-timeout tqdm pyyaml rich
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
git -C "$ROOT" archive HEAD | tar -x -C "$WORK/src"
cd "$WORK/src"
"$WORK/venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
MEGATRON_RL_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$WORK/venv/bin/python" setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; echo "check_cuda_build: build FAILED ($WORK/build.log)"; exit 1; }
"$WORK/venv/bin/python" -c "
import torch, megatron_rl._C as C
assert C.with_cuda == 1, 'built without the CUDA kernels'
for op in ('logprob_stats', 'logprob_entropy_backward', 'logprob_entropy_backward_',
           'covariance_partials'):
    dump = torch._C._dispatch_dump('megatron_rl::' + op)
    assert 'CPU: registered' in dump and 'CUDA: registered' in dump, dump
print('check_cuda_build: every op has CPU and CUDA kernels')"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/unit/test_ops.py -k "not fallback"
echo "check_cuda_build: OK ($WORK)"
