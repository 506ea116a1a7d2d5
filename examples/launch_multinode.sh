#!/usr/bin/env bash
# One torchrun per node, c10d rendezvous: run this on every node of the job (slurm: srun does it,
# see slurm_qwen2.5_32b.sbatch).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch_multinode.sh \
#       examples/qwen2.5-7b/grpo.yaml [--resume auto] [key.sub=value ...]
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500),
# GPUS_PER_NODE (8), RDZV_ID (a job id shared by all nodes; default SLURM_JOB_ID or "megatron-rl"),
# PYTHON (the venv's python). Everything after the config is passed to megatron_rl.train.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [--resume auto] [key.sub=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-megatron-rl}}"
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

cd "$ROOT"
# Refuse a layout that does not fit before any GPU is touched (exit 2 with what to change).
if [ "$NODE_RANK" = "0" ] && [ "${SKIP_MEMORY_PLAN:-0}" != "1" ]; then
  overrides=()
  for arg in "$@"; do [[ "$arg" == *=* && "$arg" != -* ]] && overrides+=("$arg"); done
  "$PYTHON" tools/memory_plan.py --config "$CONFIG" --world-size "$WORLD_SIZE" \
      --gpu-memory-gib "${GPU_MEMORY_GIB:-80}" "${overrides[@]}" >/dev/null
fi
# NCCL over InfiniBand where there is one; keep the sockets off loopback/docker interfaces.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron's TP/SP overlap needs ordered kernel launches
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
    -m megatron_rl.train --config "$CONFIG" "$@"
