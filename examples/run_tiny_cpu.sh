#!/usr/bin/env bash
# The README's main command, arXiv 2505.22617 in miniature: set up the environment, build the
# supervised warm start once (cached under runs/cache/), run GRPO, Clip-Cov and KL-Cov with several
# seeds each from those same weights, and aggregate over seeds (tools/compare_runs.py).
#   bash examples/run_tiny_cpu.sh                                  # 3 methods x seeds 0,1,2
#   bash examples/run_tiny_cpu.sh --only kl_cov --seeds 0          # comma lists
#   bash examples/run_tiny_cpu.sh --also clip_higher,entropy_bonus,ref_kl
#   bash examples/run_tiny_cpu.sh --jobs 1 --threads 2 training.steps=20
# Options:
#   --only M[,M...]   methods (default grpo,clip_cov,kl_cov); --also M[,M...] adds more:
#                     clip_higher (eps_low 0.2, eps_high 0.28, DAPO's), entropy_bonus
#                     (entropy_coef 5e-3, the paper's value that holds entropy), ref_kl
#                     (kl_ref_coef 0.01); all three on the PPO-clip loss
#   --seeds S[,S...]  seeds (default 0,1,2): each sets rollout.seed, algorithm.seed and data.seed,
#                     i.e. the RL samples, Clip-Cov's draw and the prompt order, never the warm start
#   --jobs N          runs at a time (default 2), each with --threads T torch threads (default 1):
#                     the tiny model uses a second thread poorly, so 2 runs x 1 thread are faster
#                     than 1 run x 2 threads on a 2-core machine (docs/analysis.md has the numbers)
#   key=value         config overrides, for the warm start and every run (training.steps=300)
# Every run starts from the one warm start (training.init_checkpoint=<its folder>,
# training.sft_steps=0) and writes runs/tiny_cpu/<method>/seed_<s>/ (config.json, metrics.jsonl,
# train.log, plots/); a previous folder of the same (method, seed) is removed first. A failed run
# gets a FAILED file there (the aggregation leaves it out); the script exits 1 after the others
# finish. Then runs/tiny_cpu/comparison.png, summary.json and the table.
# Environment: VENV (default .venv); SKIP_SETUP=1 uses $VENV as it is (no ci/setup_env.sh);
# OUT (default runs/tiny_cpu) is the folder of the runs and the aggregation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG=examples/tiny_cpu.yaml
OUT="${OUT:-runs/tiny_cpu}"
declare -A METHOD_ARGS=(
  [grpo]="algorithm.loss_mode=ppo_clip"
  [clip_cov]="algorithm.loss_mode=clip_cov algorithm.eps_low=1 algorithm.eps_high=1"
  [kl_cov]="algorithm.loss_mode=kl_cov"
  [clip_higher]="algorithm.loss_mode=ppo_clip algorithm.eps_low=0.2 algorithm.eps_high=0.28"
  [entropy_bonus]="algorithm.loss_mode=ppo_clip algorithm.entropy_coef=5e-3"
  [ref_kl]="algorithm.loss_mode=ppo_clip algorithm.kl_ref_coef=0.01"
)
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
ONLY=grpo,clip_cov,kl_cov; ALSO=; SEED_LIST=0,1,2; JOBS=2; THREADS=1; OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --only|--also|--seeds|--jobs|--threads)
      [ $# -ge 2 ] || { echo "$1 needs a value" >&2; usage; }
      case "$1" in
        --only) ONLY=$2 ;; --also) ALSO=$2 ;; --seeds) SEED_LIST=$2 ;;
        --jobs) JOBS=$2 ;; --threads) THREADS=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "not an option nor a key=value override: $1" >&2; usage ;;
  esac
done
METHODS=()
IFS=, read -ra requested <<<"$ONLY${ALSO:+,$ALSO}"
for m in "${requested[@]}"; do
  [ -n "${METHOD_ARGS[$m]:-}" ] || { echo "unknown method $m (${!METHOD_ARGS[*]})" >&2; exit 2; }
  [[ " ${METHODS[*]} " == *" $m "* ]] || METHODS+=("$m")
done
IFS=, read -ra SEEDS <<<"$SEED_LIST"
for s in "${SEEDS[@]}"; do [[ "$s" =~ ^[0-9]+$ ]] || { echo "bad seed '$s'" >&2; exit 2; }; done
for n in "$JOBS" "$THREADS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "--jobs / --threads must be >= 1, got '$n'" >&2; exit 2; }
done

[ "${SKIP_SETUP:-0}" = 1 ] || bash ci/setup_env.sh
PY="${VENV:-$ROOT/.venv}/bin/python"
START=$SECONDS
mkdir -p "$OUT"

# 1. the warm start, once: its folder is the last line of the module's stdout
echo "warm start (log: $OUT/warm_start.log) ..."
CORES=$(nproc 2>/dev/null || echo 1)
if ! CKPT=$(OMP_NUM_THREADS=$(( JOBS * THREADS < CORES ? JOBS * THREADS : CORES )) "$PY" -m megatron_rl.training.sft \
    --config "$CONFIG" "${OVERRIDES[@]}" 2>"$OUT/warm_start.log" | tail -n 1); then
  echo "warm start FAILED; $OUT/warm_start.log ends:" >&2
  tail -n 20 "$OUT/warm_start.log" | sed 's/^/    /' >&2
  exit 1
fi
WARM=()
if [ -n "$CKPT" ]; then
  WARM=(training.init_checkpoint="$CKPT" training.sft_steps=0)
  how=$(grep -q "loaded cached" "$OUT/warm_start.log" && echo "cached" || echo "built")
  echo "warm start: $CKPT ($how, $((SECONDS - START)) s)"
else
  echo "warm start: none (training.sft_steps=0)"
fi

# 2. the runs, JOBS at a time; each subshell writes STATUS/<method>.<seed> = "rc seconds"
STATUS=$(mktemp -d)
trap 'rm -rf "$STATUS"' EXIT
run_one() {
  local method=$1 seed=$2 dir="$OUT/$1/seed_$2" t0=$SECONDS rc=0 pid
  local -a method_args
  read -ra method_args <<<"${METHOD_ARGS[$method]}"
  rm -rf "$dir"
  mkdir -p "$dir"
  # the layout keys come last so that no override can move a run or change its seeds
  OMP_NUM_THREADS=$THREADS "$PY" -m megatron_rl.train --config "$CONFIG" "${method_args[@]}" \
      "${OVERRIDES[@]}" rollout.seed="$seed" algorithm.seed="$seed" data.seed="$seed" \
      training.output_dir="$dir" "${WARM[@]}" >"$dir/train.log" 2>&1 &
  pid=$!
  # background jobs ignore SIGINT: the launcher's TERM is passed on (the trainer then writes a
  # checkpoint at the end of its step and exits)
  trap "kill -TERM $pid 2>/dev/null" TERM
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
  [ "$rc" = 0 ] || echo "$rc" >"$dir/FAILED"
  echo "$rc $((SECONDS - t0))" >"$STATUS/$method.$seed"
}
on_signal() {
  echo "interrupted: stopping the running runs" >&2
  local pids
  pids=$(jobs -p)
  [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
  wait || true
  exit 130
}
trap on_signal INT TERM

TASKS=()
for m in "${METHODS[@]}"; do for s in "${SEEDS[@]}"; do TASKS+=("$m $s"); done; done
total=${#TASKS[@]}; launched=0; finished=0; FAILED_RUNS=()
declare -A REPORTED=()
report() {  # one line per newly finished run; a failed run's log tail
  local f name method seed rc secs dir last
  for f in "$STATUS"/*; do
    [ -e "$f" ] || continue
    name=${f##*/}
    [ -z "${REPORTED[$name]:-}" ] || continue
    REPORTED[$name]=1; finished=$((finished + 1))
    read -r rc secs <"$f"
    method=${name%.*}; seed=${name##*.}; dir="$OUT/$method/seed_$seed"
    if [ "$rc" = 0 ]; then
      last=$(grep -oE 'step [0-9]+: .*' "$dir/train.log" | tail -n 1 || true)
      echo "[$finished/$total done, $((launched - finished)) running, $((SECONDS - START)) s]" \
           "$method seed $seed: ok in $secs s${last:+ -- $last}"
    else
      FAILED_RUNS+=("$method/seed_$seed")
      echo "[$finished/$total done, $((launched - finished)) running, $((SECONDS - START)) s]" \
           "$method seed $seed: FAILED (exit $rc) after $secs s; $dir/train.log ends:"
      tail -n 20 "$dir/train.log" | sed 's/^/    /'
    fi
  done
}
wait_one() {  # until a run finishes; false when no run is left to wait for
  local rc=0
  wait -n || rc=$?
  report
  [ "$rc" != 127 ]
}
echo "$total runs (${METHODS[*]} x seeds ${SEEDS[*]}), $JOBS at a time, $THREADS thread(s)" \
     "each; logs: $OUT/<method>/seed_<s>/train.log"
for task in "${TASKS[@]}"; do
  while (( launched - finished >= JOBS )); do wait_one || break; done
  run_one $task &
  launched=$((launched + 1))
done
while (( launched > finished )); do wait_one || break; done
if (( finished < total )); then  # a runner died without writing its status
  echo "$((total - finished)) run(s) ended without a status" >&2
  FAILED_RUNS+=("$((total - finished)) without status")
fi
trap - INT TERM

ran=" ${TASKS[*]/%/ } "
earlier=()
for d in "$OUT"/*/seed_*/; do
  [ -d "$d" ] || continue
  d=${d%/}; s=${d##*/seed_}; m=${d%/seed_*}; m=${m##*/}
  [[ "$ran" == *" $m $s "* ]] || earlier+=("$m/seed_$s")
done
echo "wall time: $((SECONDS - START)) s for the warm start and $total runs (setup excluded);" \
     "${#FAILED_RUNS[@]} failed${FAILED_RUNS[*]:+: ${FAILED_RUNS[*]}}"
[ ${#earlier[@]} = 0 ] || echo "note: $OUT also holds runs of earlier invocations, aggregated" \
     "with these: ${earlier[*]}"

# 3. aggregate over seeds
agg_rc=0
"$PY" tools/compare_runs.py "$OUT" || agg_rc=$?
[ ${#FAILED_RUNS[@]} = 0 ] && [ "$agg_rc" = 0 ] || exit 1
