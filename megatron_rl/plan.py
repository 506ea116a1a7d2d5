"""The cost before the launch: GPUs, per-GPU memory and time per RL step of a job config.

  python -m megatron_rl.plan --config examples/qwen2.5-7b/grpo.yaml [--world-size 8]
      [--gpu h100|h200] [--mfu 0.35] [--decode-efficiency 0.5] [--mean-prompt-tokens 256]
      [--mean-response-tokens N] [--informative-fraction 0.5] [key.sub=value ...]

Prints a markdown report: the layout (TP/PP/DP, nodes, SGLang engines), the per-GPU memory of
megatron_rl.parallel.memory_plan.plan_memory (its table, unchanged), the largest micro-batch and
KV cache that fit, an estimate of the time per RL step and for the whole run, and every
assumption with its value and the flag that changes it. Exits 2, naming what to change, when
the layout does not fit (plan_memory's raise_if_not_fits) or the config or a flag is invalid.

The time model (docs/memory_plan.md, "Cost estimate"):
- Rollout: decode is memory-bandwidth bound. Each decode step of an engine reads its weights
  (weight bytes / engine TP per GPU); each generated token also reads its sequence's KV cache.
  An engine runs its share of the step's sequences in waves of as many as its KV cache holds
  (at mean prompt + mean response tokens each); every wave but the last takes the mean response
  length in decode steps, the last takes rollout.max_new_tokens (the longest response sets the
  step's wall time). Dynamic sampling (filter_equal_groups=resample) runs ceil(1 / informative
  fraction) rounds, at most 1 + resample_max_rounds. Prefill, reward scoring and weight sync
  are not counted.
- Training: 2 x matmul params x tokens per forward, twice that for the backward, plus causal
  attention's 2 x s^2 x heads x head_dim per layer and sequence (forward); a full recompute
  re-runs the forward, selective only attention's; the old-log-prob pass (always run: the
  trainer recomputes the sampling policy's log-probs) and the reference pass (kl_ref_coef > 0)
  are one forward each. Time = FLOPs / world size / (peak bf16 FLOP/s x MFU), where MFU counts
  every FLOP run (recompute included). Micro-batch padding and pipeline bubbles are in the MFU.
"""
import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from megatron_rl.config import ConfigError, load_config
from megatron_rl.parallel.memory_plan import (GIB, MemoryPlan, engine_weight_bytes,
                                              kv_bytes_per_token, model_params, plan_memory)

GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GpuKind:
    name: str
    memory_gib: float  # what nvidia-smi reports, rounded: 80 GB HBM3 is 80 GiB (81559 MiB)
    hbm_bytes_per_s: float
    bf16_flops: float  # dense, no sparsity


GPU_KINDS = {
    "h100": GpuKind("H100 SXM 80 GB", 80.0, 3.35e12, 989e12),
    "h200": GpuKind("H200 SXM 141 GB", 140.0, 4.8e12, 989e12),
}


@dataclass(frozen=True)
class Assumptions:
    gpu: str = "h100"
    gpu_memory_gib: Optional[float] = None  # None: the GPU kind's
    mfu: float = 0.35  # megatron-core dense training at long sequences reaches 0.3-0.45
    decode_efficiency: float = 0.5  # share of peak HBM bandwidth a batched decode step achieves
    mean_prompt_tokens: int = 256  # DAPO-Math-17k prompts with the chat template: ~100-400
    # None: a quarter of rollout.max_new_tokens. Base Qwen2.5 models on DAPO-style math RL start
    # near 1k tokens and grow over training; a quarter of 8192 is a mid-run guess, not a fact.
    mean_response_tokens: Optional[int] = None
    informative_fraction: float = 0.5  # groups whose rewards are not all equal
    kv_cache_fraction: float = 0.25  # plan_memory's KV item (share of an engine's sequences)

    @property
    def kind(self) -> GpuKind:
        return GPU_KINDS[self.gpu]

    @property
    def memory_gib(self) -> float:
        return self.gpu_memory_gib if self.gpu_memory_gib is not None else self.kind.memory_gib

    def response_tokens(self, cfg) -> int:
        if self.mean_response_tokens is not None:
            return self.mean_response_tokens
        return max(1, cfg.rollout.max_new_tokens // 4)


def check_assumptions(a: Assumptions) -> None:
    """ValueError naming the flag of the first out-of-range assumption."""
    for flag, value in (("--mfu", a.mfu), ("--decode-efficiency", a.decode_efficiency),
                        ("--informative-fraction", a.informative_fraction)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{flag} must be in (0, 1], got {value}")
    if not 0.0 <= a.kv_cache_fraction <= 1.0:
        raise ValueError(f"--kv-cache-fraction must be in [0, 1], got {a.kv_cache_fraction}")
    for flag, value in (("--mean-prompt-tokens", a.mean_prompt_tokens),
                        ("--mean-response-tokens", a.mean_response_tokens),
                        ("--gpu-memory-gib", a.gpu_memory_gib)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if a.gpu not in GPU_KINDS:
        raise ValueError(f"--gpu must be one of {', '.join(GPU_KINDS)}, got {a.gpu!r}")


# ---------------------------------------------------------------------------------------------
# Layout


def launch_world_size(path: str) -> Optional[int]:
    """GPUs of the recipe's header line "# Launch: N node(s) x G GPUs", or None."""
    with open(path) as f:
        for line in f:
            match = re.match(r"#\s*Launch:\s*(\d+)\s+nodes?\s+x\s+(\d+)\s+GPUs", line)
            if match:
                return int(match.group(1)) * int(match.group(2))
    return None


@dataclass(frozen=True)
class Engines:
    count: int
    tp: int
    placement: str  # colocated / disaggregated / builtin
    notes: Tuple[str, ...]


def rollout_engines(cfg, world_size: int) -> Engines:
    """How many engines generate, with which TP, and what plan_memory's rollout model misses."""
    tp = cfg.parallel.tensor_model_parallel_size
    if cfg.rollout.engine != "sglang":  # the trainer's model generates, one per TP group
        return Engines(world_size // tp, tp, "builtin",
                       ("builtin engine: generation on the trainer's model, assumed one engine "
                        "per TP group; plan_memory models no KV cache for it",))
    s = cfg.rollout.sglang
    nodes = max(1, math.ceil(world_size / GPUS_PER_NODE))
    notes = []
    if s.tp_size != tp:
        notes.append(f"rollout.sglang.tp_size={s.tp_size} differs from the trainer's TP={tp}: "
                     f"plan_memory's rollout items assume engines of the trainer's TP, so the "
                     f"rollout memory (and the KV cache that fits) is approximate")
    if s.placement == "disaggregated":
        notes.append("placement=disaggregated: the engines' GPUs are assumed to be on top of "
                     "the world size; their memory is the engine alone (weights / TP, the "
                     "runtime overhead, the KV cache), not plan_memory's colocated model")
    return Engines(nodes * s.engines_per_node, s.tp_size, s.placement, tuple(notes))


# ---------------------------------------------------------------------------------------------
# Memory


def memory_plan(cfg, a: Assumptions, engines: Engines, micro_batch: Optional[int] = None
                ) -> MemoryPlan:
    if micro_batch is not None:
        cfg = replace(cfg, training=replace(cfg.training, micro_batch_size=micro_batch))
    return plan_memory(cfg, a.memory_gib, recompute=cfg.model.recompute_granularity or "none",
                       kv_cache_fraction=a.kv_cache_fraction,
                       colocated_rollout=engines.placement == "colocated")


def micro_batch_cap(cfg) -> int:
    """Sequences per mini-batch on one DP rank: a micro-batch cannot be larger."""
    dp = cfg.parallel.data_parallel_size or 1
    return max(1, cfg.rollout.prompts_per_step // dp * cfg.algorithm.n // cfg.training.mini_batches)


def largest_micro_batch(cfg, a: Assumptions, engines: Engines) -> int:
    """training.micro_batch_size raised one at a time until plan_memory's training peak exceeds
    the GPU (0: not even 1 fits), at most micro_batch_cap."""
    limit = int(a.memory_gib * GIB)
    size = 0
    while size < micro_batch_cap(cfg):
        if memory_plan(cfg, a, engines, size + 1).train_bytes > limit:
            break
        size += 1
    return size


@dataclass(frozen=True)
class KvFit:
    per_token_bytes: int  # one engine GPU
    largest_tokens: int  # what the GPU holds after everything else of the rollout phase
    static_tokens: Optional[int]  # what rollout.sglang.mem_fraction_static gives SGLang


def kv_fit(cfg, plan: MemoryPlan, a: Assumptions, engines: Engines) -> KvFit:
    per_token = kv_bytes_per_token(cfg, engines.tp)
    gpu = int(a.memory_gib * GIB)
    if engines.placement == "colocated":
        others = plan.rollout_bytes - plan.item("kv_cache").bytes
    else:  # an engine GPU holds its weights share and the runtime overhead
        others = (engine_weight_bytes(cfg, engines.tp)
                  + int(plan.settings["runtime_overhead_gib"] * GIB))
    fraction = (cfg.rollout.sglang.mem_fraction_static if cfg.rollout.engine == "sglang"
                else None)
    # SGLang sizes its pool as mem_fraction_static x GPU minus what is in use when it starts
    # (here: everything of the rollout phase but the KV cache), keeping the rest for activations.
    static = None if fraction is None else max(0, int(fraction * gpu) - others) // per_token
    return KvFit(per_token, max(0, gpu - others) // per_token, static)


# ---------------------------------------------------------------------------------------------
# Time


def rollout_rounds(cfg, a: Assumptions) -> int:
    """Generation rounds per step: dynamic sampling redraws until the step has prompts_per_step
    informative groups, each round drawing prompts_per_step prompts."""
    if cfg.algorithm.filter_equal_groups != "resample":
        return 1
    return min(math.ceil(1.0 / a.informative_fraction), 1 + cfg.algorithm.resample_max_rounds)


@dataclass(frozen=True)
class Rollout:
    rounds: int
    sequences_per_engine: int
    concurrent: int
    waves: int
    decode_steps: int  # per round
    weight_bytes: int  # per GPU per decode step
    kv_read_bytes: int  # per GPU per round
    round_seconds: float

    @property
    def seconds(self) -> float:
        return self.rounds * self.round_seconds


def rollout_time(cfg, a: Assumptions, engines: Engines, kv_tokens: int) -> Rollout:
    prompt, response = a.mean_prompt_tokens, a.response_tokens(cfg)
    per_engine = math.ceil(cfg.rollout.prompts_per_step * cfg.algorithm.n / engines.count)
    # The scheduler keeps as many sequences running as their KV fits (at their mean length).
    concurrent = max(1, min(per_engine, kv_tokens // (prompt + response)))
    waves = math.ceil(per_engine / concurrent)
    steps = (waves - 1) * response + cfg.rollout.max_new_tokens
    weights = engine_weight_bytes(cfg, engines.tp)
    # Generating token t of a sequence reads its prompt + t tokens of KV: summed over a response
    # of length r, r x prompt + r^2 / 2 (the mean r: E[r^2] > r^2, so this is a lower bound).
    kv_read = per_engine * (response * prompt + response * response // 2) * \
        kv_bytes_per_token(cfg, engines.tp)
    seconds = (steps * weights + kv_read) / (a.kind.hbm_bytes_per_s * a.decode_efficiency)
    return Rollout(rollout_rounds(cfg, a), per_engine, concurrent, waves, steps, weights,
                   kv_read, seconds)


def matmul_params(cfg) -> int:
    """Parameters that multiply: all but the input embedding (a lookup; a tied output layer
    is the same matrix and does multiply)."""
    m = cfg.model
    n = model_params(cfg)
    return n if m.tie_word_embeddings else n - m.padded_vocab_size(1) * m.hidden_size


def training_flops(cfg, a: Assumptions) -> List[Tuple[str, float]]:
    """(pass, FLOPs) for one RL step over the whole job."""
    m, t = cfg.model, cfg.training
    sequences = cfg.rollout.prompts_per_step * cfg.algorithm.n
    seq = a.mean_prompt_tokens + a.response_tokens(cfg)
    tokens = sequences * seq
    # Causal attention: QK^T and AV, 2 FLOPs per multiply-add, half the s x s scores.
    attention = sequences * m.num_layers * 2 * seq * seq * m.num_attention_heads * m.head_dim
    forward = 2 * matmul_params(cfg) * tokens + attention
    epochs = t.ppo_epochs
    rows = [("forward + backward", 3 * forward * epochs)]
    recompute = cfg.model.recompute_granularity or "none"
    if recompute == "full":
        rows.append(("full recompute (forward again)", forward * epochs))
    elif recompute == "selective":
        rows.append(("selective recompute (attention again)", attention * epochs))
    rows.append(("old log-probs (forward)", forward))
    if cfg.algorithm.kl_ref_coef > 0:
        rows.append(("reference log-probs (forward)", forward))
    return rows


def trained_tokens(cfg, a: Assumptions) -> int:
    return (cfg.rollout.prompts_per_step * cfg.algorithm.n
            * (a.mean_prompt_tokens + a.response_tokens(cfg)) * cfg.training.ppo_epochs)


def flops_seconds(flops: float, world_size: int, a: Assumptions) -> float:
    return flops / world_size / (a.kind.bf16_flops * a.mfu)


# ---------------------------------------------------------------------------------------------
# Report


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(header: Tuple[str, ...], rows: List[Tuple]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def report(cfg, config_path: str, world_size: int, a: Assumptions) -> Tuple[str, MemoryPlan]:
    p, r = cfg.parallel, cfg.rollout
    engines = rollout_engines(cfg, world_size)
    plan = memory_plan(cfg, a, engines)
    out = [f"# Plan: {config_path} on {world_size} x {a.kind.name}", "", "## Layout", ""]
    layout = [("world size", world_size),
              ("nodes", f"{math.ceil(world_size / GPUS_PER_NODE)} x {GPUS_PER_NODE} GPUs"),
              ("TP / PP / DP", f"{p.tensor_model_parallel_size} / "
                               f"{p.pipeline_model_parallel_size} / {p.data_parallel_size}"),
              ("rollout engine", r.engine)]
    if r.engine == "sglang":
        s = r.sglang
        layout += [("sglang placement", s.placement),
                   ("engines", f"{engines.count} ({s.engines_per_node} per node x TP={s.tp_size})"),
                   ("mem_fraction_static", s.mem_fraction_static)]
    else:
        layout.append(("engines", f"{engines.count} (assumed, TP={engines.tp})"))
    out += _table(("", ""), layout)

    out += ["", "## Memory per GPU (megatron_rl.parallel.memory_plan)", "", plan.table(), ""]
    if plan.fits:
        kv = kv_fit(cfg, plan, a, engines)
        mbs = largest_micro_batch(cfg, a, engines)
        cap = micro_batch_cap(cfg)
        out.append(f"- Largest micro-batch that fits training: {mbs}"
                   + (f" (the cap: {cap} sequences per mini-batch per DP rank)" if mbs == cap
                      else "") + f"; the config has {cfg.training.micro_batch_size}.")
        line = (f"- Largest KV cache per engine: {kv.largest_tokens / 1e6:.2f}M tokens "
                f"({kv.per_token_bytes} B per token per GPU)")
        if kv.static_tokens is not None:
            line += (f"; mem_fraction_static={r.sglang.mem_fraction_static} gives "
                     f"{kv.static_tokens / 1e6:.2f}M")
        out.append(line + ".")
    else:
        return "\n".join(out), plan

    out += _time_section(cfg, world_size, a, engines, kv)
    out += ["", "## Assumptions", ""] + _assumption_rows(cfg, a, engines)
    return "\n".join(out), plan


def _time_section(cfg, world_size: int, a: Assumptions, engines: Engines, kv: KvFit
                  ) -> List[str]:
    kv_tokens = kv.static_tokens if kv.static_tokens is not None else kv.largest_tokens
    roll = rollout_time(cfg, a, engines, kv_tokens)
    passes = training_flops(cfg, a)
    rows = [("rollout", f"{roll.rounds} round(s) x {roll.sequences_per_engine} sequences per "
                        f"engine, {roll.concurrent} at once, {roll.waves} wave(s), "
                        f"{roll.decode_steps} decode steps x {roll.weight_bytes / GIB:.2f} GiB "
                        f"weights + {roll.kv_read_bytes / GIB:.0f} GiB KV reads per GPU",
             "-", _duration(roll.seconds))]
    train_seconds = 0.0
    for name, flops in passes:
        seconds = flops_seconds(flops, world_size, a)
        train_seconds += seconds
        rows.append((name, "", f"{flops:.3g}", _duration(seconds)))
    step = roll.seconds + train_seconds
    rows.append(("**step**", "", f"{sum(f for _, f in passes):.3g}", f"**{_duration(step)}**"))
    steps = cfg.training.steps
    rows.append((f"**run** ({steps} steps)", "", "", f"**{_duration(steps * step)}**"))
    # The training stage alone (forward + backward and recompute), as NeMo-RL reports it.
    stage = sum(flops_seconds(f, world_size, a) for n, f in passes if "log-probs" not in n)
    tps = trained_tokens(cfg, a) / stage / world_size
    return (["", "## Time per RL step", ""] + _table(("phase", "what", "FLOPs", "time"), rows)
            + ["", f"- Training tokens/s/GPU (forward + backward + recompute, no log-prob "
                   f"passes): {tps:.0f}; {trained_tokens(cfg, a) / 1e6:.2f}M tokens per step, "
                   f"{matmul_params(cfg) / 1e9:.2f}B matmul params.",
               f"- GPU-hours for the run: {steps * step * world_size / 3600:.0f}."])


def _assumption_rows(cfg, a: Assumptions, engines: Engines) -> List[str]:
    k = a.kind
    rows = [("GPU", f"{k.name}: {a.memory_gib:g} GiB, {k.hbm_bytes_per_s / 1e12:g} TB/s, "
                    f"{k.bf16_flops / 1e12:g} TFLOP/s bf16 dense", "--gpu, --gpu-memory-gib"),
            ("MFU (every FLOP run, recompute included)", a.mfu, "--mfu"),
            ("decode efficiency (share of peak HBM bandwidth)", a.decode_efficiency,
             "--decode-efficiency"),
            ("mean prompt tokens", a.mean_prompt_tokens, "--mean-prompt-tokens"),
            ("mean response tokens", a.response_tokens(cfg)
             if a.mean_response_tokens is not None
             else f"{a.response_tokens(cfg)} (max_new_tokens / 4)", "--mean-response-tokens"),
            ("longest response (last wave)", cfg.rollout.max_new_tokens,
             "rollout.max_new_tokens="),
            ("informative fraction (dynamic sampling)",
             a.informative_fraction if cfg.algorithm.filter_equal_groups == "resample"
             else "unused (no resample)", "--informative-fraction"),
            ("plan_memory KV item: share of an engine's sequences", a.kv_cache_fraction,
             "--kv-cache-fraction"),
            ("recompute", cfg.model.recompute_granularity or "none",
             "model.recompute_granularity="),
            ("not counted", "prefill, reward scoring, weight sync, checkpointing, evaluation",
             "")]
    lines = _table(("assumption", "value", "flag"), rows)
    if engines.notes:
        lines += ["", "## Limitations", ""] + [f"- {note}" for note in engines.notes]
    return lines


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    d = Assumptions()
    parser = argparse.ArgumentParser(prog="python -m megatron_rl.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int,
                        help="default: the recipe's '# Launch: N nodes x G GPUs' line")
    parser.add_argument("--gpu", choices=sorted(GPU_KINDS), default=d.gpu)
    parser.add_argument("--gpu-memory-gib", type=float, help="default: the GPU kind's")
    parser.add_argument("--mfu", type=float, default=d.mfu)
    parser.add_argument("--decode-efficiency", type=float, default=d.decode_efficiency)
    parser.add_argument("--mean-prompt-tokens", type=int, default=d.mean_prompt_tokens)
    parser.add_argument("--mean-response-tokens", type=int,
                        help="default: rollout.max_new_tokens / 4")
    parser.add_argument("--informative-fraction", type=float, default=d.informative_fraction)
    parser.add_argument("--kv-cache-fraction", type=float, default=d.kv_cache_fraction)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    assumptions = Assumptions(
        gpu=args.gpu, gpu_memory_gib=args.gpu_memory_gib, mfu=args.mfu,
        decode_efficiency=args.decode_efficiency, mean_prompt_tokens=args.mean_prompt_tokens,
        mean_response_tokens=args.mean_response_tokens,
        informative_fraction=args.informative_fraction, kv_cache_fraction=args.kv_cache_fraction)
    try:
        check_assumptions(assumptions)
    except ValueError as e:
        parser.error(str(e))  # exits 2
    world_size = args.world_size or launch_world_size(args.config)
    if not world_size or world_size < 1:
        parser.error(f"--world-size is needed: {args.config} has no '# Launch: N nodes x G GPUs' "
                     f"line" if not args.world_size else "--world-size must be >= 1")
    return args, assumptions, world_size


def main(argv=None) -> int:
    args, assumptions, world_size = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
    except (ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    text, plan = report(cfg, args.config, world_size, assumptions)
    print(text)
    try:
        plan.raise_if_not_fits()
    except MemoryError as e:
        print(f"does not fit: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
