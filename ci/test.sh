#!/usr/bin/env bash
# The README's test command: set up the environment, then run every check CI runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash ci/setup_env.sh
VENV="${VENV:-$ROOT/.venv}"
if [ -f ci/check_cuda_kernels.sh ]; then
  bash ci/check_cuda_kernels.sh
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
# Small-config RL runs against stored metric curves (ci/regression/README.md).
"$VENV/bin/python" ci/regression/run.py
