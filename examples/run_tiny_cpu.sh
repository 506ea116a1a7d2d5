#!/usr/bin/env bash
# The README's main command: set up the environment and run the tiny CPU default job.
# Extra arguments are config overrides, e.g. `bash examples/run_tiny_cpu.sh training.steps=50`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash ci/setup_env.sh
exec "${VENV:-$ROOT/.venv}/bin/python" -m megatron_rl.train --config examples/tiny_cpu.yaml "$@"
