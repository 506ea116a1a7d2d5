#!/usr/bin/env bash
# The README's main command: set up the environment, then on the tiny CPU default run a cached
# supervised warm start followed by three short RL runs -- GRPO (PPO-clip), Clip-Cov, KL-Cov --
# from the same starting weights, and plot their entropy and accuracy curves on one figure.
#   bash examples/run_tiny_cpu.sh                      # all three, then runs/tiny_cpu/comparison.png
#   bash examples/run_tiny_cpu.sh --only kl_cov        # one of grpo | clip_cov | kl_cov
#   bash examples/run_tiny_cpu.sh training.steps=20    # extra arguments are config overrides
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODES=(grpo clip_cov kl_cov)
if [ "${1:-}" = "--only" ]; then
  MODES=("$2"); shift 2
fi
bash ci/setup_env.sh
PY="${VENV:-$ROOT/.venv}/bin/python"
OUT=runs/tiny_cpu
declare -A LOSS=([grpo]=ppo_clip [clip_cov]=clip_cov [kl_cov]=kl_cov)
dirs=()
for mode in "${MODES[@]}"; do
  [ -n "${LOSS[$mode]:-}" ] || { echo "unknown mode $mode (grpo | clip_cov | kl_cov)" >&2; exit 2; }
  echo "=== $mode ==="
  rm -rf "$OUT/$mode"
  "$PY" -m megatron_rl.train --config examples/tiny_cpu.yaml \
      algorithm.loss_mode="${LOSS[$mode]}" training.output_dir="$OUT/$mode" "$@"
  dirs+=("$OUT/$mode")
done
"$PY" tools/plot_runs.py "${dirs[@]}" --out "$OUT/comparison.png"
echo "plots: $OUT/comparison.png (and each run's plots/ folder)"
