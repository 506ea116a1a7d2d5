#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install megatron-rl into it, CPU build.
# Used by the README's commands, by .ci/run and by developers alike.
#   VENV=path   where the virtualenv lives (default: .venv in the repository root)
# Idempotent: a second run only rebuilds the extension.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
C=(-c "$ROOT/ci/constraints-cpu.txt")

# torch first, from the pinned CPU wheel: once it is installed, every later requirement on torch
# is already satisfied, so nothing can pull a multi-GB CUDA build by accident.
"${PIP[@]}" install "${C[@]}" torch==2.13.0 numpy packaging
# megatron-core 0.19.2 declares Python >= 3.12 but installs and runs on 3.11 (README: "Why
# Python 3.11 and megatron-core 0.19.2"); --ignore-requires-python is needed for it alone.
"${PIP[@]}" install "${C[@]}" --ignore-requires-python megatron-core==0.19.2
"${PIP[@]}" install "${C[@]}" pyyaml psutil pybind11 tqdm ninja pytest pytest-timeout pytest-xdist \
  transformers safetensors matplotlib pyarrow math-verify tensorboard requests ruff
# The package and its extension, built against the torch above (no build isolation).
"${PIP[@]}" install "${C[@]}" --ignore-requires-python --no-build-isolation --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import torch, megatron_rl._C as ext
from megatron_rl.compat import apply_cpu_patches
from megatron_rl.console import silence_third_party_warnings
silence_third_party_warnings()  # megatron-core's TE / apex fallback notices at import
apply_cpu_patches()  # megatron.core does not import on CPU without them
import megatron.core
assert torch.version.cuda is None or torch.cuda.is_available(), (
    f"a CUDA torch ({torch.__version__}) was installed on a host without a GPU")
print(f"megatron-rl env ready: torch {torch.__version__}, megatron-core "
      f"{megatron.core.__version__}, extension with_cuda={bool(ext.with_cuda)}")
PY
