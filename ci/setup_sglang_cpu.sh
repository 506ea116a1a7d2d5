#!/usr/bin/env bash
# Create (or reuse) the virtualenv that runs SGLang servers on a CPU-only machine: CI and
# developers alike. The trainer's venv (ci/setup_env.sh) stays free of sglang and triton;
# the job starts servers with this venv's python (rollout.sglang.python, or the
# MEGATRON_RL_SGLANG_PYTHON environment variable the tests read).
#   SGLANG_VENV=path   where it lives (default: .venv-sglang in the repository root)
#
# What a CPU install of sglang 0.5.23 needs (README "SGLang on CPU" says why each):
#  - the same CPU torch 2.13.0 as the trainer, installed first, so tensors shared for
#    update_weights_from_tensor and the gloo group of update_weights_from_distributed
#    meet the same torch on both sides;
#  - sglang itself and its pure-Python needs with --no-deps, pinned in
#    ci/sglang-cpu-requirements.txt (its own metadata pins torch 2.14.1 and CUDA-only wheels);
#  - megatron_rl/compat/sglang_cpu: a stand-in sgl_kernel (sglang imports its CUDA kernels at
#    load; the CPU path calls none) and a .pth hook that lets PyPI's CUDA torchvision import
#    beside CPU torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SGLANG_VENV:-$ROOT/.venv-sglang}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install --no-deps -r "$ROOT/ci/sglang-cpu-requirements.txt"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$SITE/sgl_kernel"
cp -r "$ROOT/megatron_rl/compat/sglang_cpu/sgl_kernel" "$SITE/sgl_kernel"
cp "$ROOT/megatron_rl/compat/sglang_cpu/torchvision_ops_schema.py" \
   "$SITE/megatron_rl_torchvision_ops_schema.py"
echo "import megatron_rl_torchvision_ops_schema as _m; _m.install()" > "$SITE/megatron_rl_sglang_cpu.pth"

SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -W ignore - <<'PY'
import sglang, torch
import sglang.launch_server, sglang.srt.managers.scheduler, sglang.srt.models.qwen2  # noqa: F401
import sglang_router.router  # noqa: F401
print(f"sglang env ready: sglang {sglang.__version__}, torch {torch.__version__}")
PY
