#!/usr/bin/env bash
# The README's test command: set up the environment, then run every check CI runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash ci/setup_env.sh
VENV="${VENV:-$ROOT/.venv}"
# SGLang servers run from their own venv on CPU (ci/setup_sglang_cpu.sh says why); the engine
# tests fail, not skip, when this variable names a python that is missing.
bash ci/setup_sglang_cpu.sh
export MEGATRON_RL_SGLANG_PYTHON="${SGLANG_VENV:-$ROOT/.venv-sglang}/bin/python"
if [ -f ci/check_cuda_kernels.sh ]; then
  bash ci/check_cuda_kernels.sh
fi
# Two pytest workers (pytest-xdist), one torch thread each, keep both cores busy: most tests are
# start-up, subprocess and small-tensor work that a second thread barely speeds up, and two
# workers at two threads each would oversubscribe the cores (OpenMP spin-waits). A file's tests
# stay on one worker (--dist loadfile), so module fixtures (a served SGLang engine) are built once.
# PYTEST_WORKERS=1 runs them in one process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORKERS="${PYTEST_WORKERS:-2}"
# Lint first: seconds, and a finding fails CI like a test (ruff.toml: line length, pyflakes).
"$VENV/bin/ruff" check --no-cache .
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
# Small-config RL runs against stored metric curves (ci/regression/README.md).
"$VENV/bin/python" ci/regression/run.py
