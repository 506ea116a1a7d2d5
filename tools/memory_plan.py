#!/usr/bin/env python
"""Per-GPU memory of a job config on a GPU of a given size, before any GPU is touched.

  python tools/memory_plan.py --config examples/qwen2.5-7b/grpo.yaml --world-size 8 \\
      --gpu-memory-gib 80 [--recompute full] [--no-chunked-logprobs] [key.sub=value ...]

Prints a markdown table (megatron_rl/parallel/memory_plan.py lists what is counted); exits 2 when
the layout does not fit, with the biggest items and what to change on stderr. `--summary` prints
instead one row per recompute setting and log-prob path (the README's and docs/memory_plan.md's
tables) and exits 0.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.config import ConfigError, load_config  # noqa: E402
from megatron_rl.parallel.memory_plan import GIB, RECOMPUTE_SETTINGS, plan_memory  # noqa: E402


def summary_table(cfg, gpu_memory_gib, **plan_args) -> str:
    """Activations, logits and both phases' peaks on the worst stage, for every recompute setting
    with and without chunked log-probs."""
    lines = [f"| recompute | chunked log-probs | activations | logits | training peak | "
             f"rollout peak | fits {gpu_memory_gib:g} GiB (worst stage) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for recompute in RECOMPUTE_SETTINGS:
        for chunked in (False, True):
            plan = plan_memory(cfg, gpu_memory_gib, recompute=recompute,
                               chunked_logprobs=chunked, **plan_args)
            gib = {item.name: item.bytes / GIB for item in plan.items}
            lines.append(f"| {recompute} | {'yes' if chunked else 'no'} | "
                         f"{gib.get('activations', 0):.1f} | {gib.get('logits', 0):.2f} | "
                         f"{plan.train_bytes / GIB:.1f} | {plan.rollout_bytes / GIB:.1f} | "
                         f"{'yes' if plan.fits else 'no'} (stage {plan.stage}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--recompute", choices=RECOMPUTE_SETTINGS,
                        help="default: the config's model.recompute_granularity")
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--no-chunked-logprobs", action="store_true",
                        help="plan full logits (default: the path training.logprob_chunking "
                             "gives the trainer, which key overrides can set)")
    parser.add_argument("--kv-cache-fraction", type=float, default=0.25,
                        help="share of an engine's rollout sequences in its KV cache at once")
    parser.add_argument("--no-colocated-rollout", action="store_true")
    parser.add_argument("--runtime-overhead-gib", type=float, default=2.0)
    parser.add_argument("--summary", action="store_true",
                        help="one row per recompute setting and log-prob path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    plan_args = dict(distributed_optimizer=not args.no_distributed_optimizer,
                     kv_cache_fraction=args.kv_cache_fraction,
                     colocated_rollout=not args.no_colocated_rollout,
                     runtime_overhead_gib=args.runtime_overhead_gib)
    if args.summary:
        print(summary_table(cfg, args.gpu_memory_gib, **plan_args))
        return 0
    plan = plan_memory(
        cfg, args.gpu_memory_gib,
        recompute=args.recompute or cfg.model.recompute_granularity or "none",
        chunked_logprobs=False if args.no_chunked_logprobs else None, **plan_args)
    print(f"{args.config}, world size {args.world_size}: " + ", ".join(
        f"{k}={v}" for k, v in plan.settings.items()))
    print(plan.table())
    try:
        plan.raise_if_not_fits()
    except MemoryError as e:
        print(f"does not fit: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
