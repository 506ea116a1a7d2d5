"""Rollout throughput and weight-sync bandwidth, on one model and one batch of prompts.

    .venv/bin/python tools/bench_rollout.py [--prompts 32 --new-tokens 64 --hidden 512 --layers 4
        --ffn 1408 --vocab 8192 --sync-repeats 3 --json PATH]

Needs the SGLang venv (--sglang-python, default .venv-sglang/bin/python); CPU, float32, TP=PP=1.

1. Generation tokens/s (generated tokens / wall seconds, after one warm-up call each) of
   (a) builtin: megatron_rl.rollout.builtin.BuiltinEngine (the megatron model, static KV cache);
   (b) sglang:  one SGLang server on CPU loaded from the model's HF folder (SGLangClient);
   (c) hf:      transformers generate() on the same HF folder, batched with left padding and an
                attention mask, do_sample, same temperature, top_k/top_p off, min_new_tokens =
                max_new_tokens (the random model has no eos, so every sequence is full length).
   Same prompts (random ids, --min-len..--max-len tokens) for all; median of --gen-repeats calls;
   'short' counts sequences that stopped before --new-tokens. Target: builtin >= 2x hf.
2. Weight-sync seconds and bytes/s of SGLangClient.update_weights for each method (distributed
   over gloo, tensor via shared memory, disk via an HF folder), median of --sync-repeats after a
   warm-up (the first distributed call also creates the group), vs a raw gloo broadcast of one
   flat uint8 tensor of the same bytes from this process to a helper process that joins a 2-rank
   group the way SGLang does (TCPStore + PrefixStore + c10d helper; helper acks each broadcast).
   Target: distributed >= 50% of raw gloo bandwidth.

--builtin-compaction-compare [--config examples/tiny_cpu.yaml --sft-steps 0 --gen-repeats 3
--tries 3]: only the built-in engine, on a job config's model and rollout settings (its task's
prompts for one step, rollout.prompts_per_step x algorithm.n samples, rollout.max_new_tokens,
temperature, top-k/top-p, stopping at the task's eos), with finished sequences leaving the
decode batch (compacted) against the static batch decoded to the longest response (static):
generated tokens/s of each, after a warm-up call each, for seeds 0 .. --gen-repeats - 1, the
best of --tries calls of each per seed, the two alternating; their samples must be identical.
The speed-up is the median over the seeds of compacted / static. The model is the config's,
randomly initialized, or after --sft-steps of its warm start (cached under training.cache_dir,
as the job caches it: 500 is the job's own); --set KEY=VALUE ... overrides the config.
Target: compacted >= 1.5x static. The other model and prompt flags do not apply; nothing
needs the SGLang venv.
"""
import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_rl.console import setup_logging, silence_third_party_warnings  # noqa: E402

log = logging.getLogger("megatron_rl.bench_rollout").info  # progress, on stderr; the report: stdout


def _raw_helper(port, nbytes, count):
    """Rank 1 of the raw baseline, joined the way SGLang's init_custom_process_group joins
    weight_sync_group: receive `count` broadcasts, ack each with a 1-element all-reduce."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                    _world)

    timeout, name = timedelta(seconds=120), "bench_raw_gloo"
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timeout)
    group, _ = _new_process_group_helper(2, 1, [], Backend("gloo"), PrefixStore(name, store),
                                         group_name=name, timeout=timeout)
    _world.pg_group_ranks[group] = {0: 0, 1: 1}
    buf, ack = torch.empty(nbytes, dtype=torch.uint8), torch.zeros(1)
    for _ in range(count):
        dist.broadcast(buf, group=group, group_src=0)
        dist.all_reduce(ack, group=group)
    dist.destroy_process_group(group)  # else gloo's threads can abort the interpreter's exit


def raw_gloo_seconds(nbytes, repeats):
    """Seconds per broadcast of nbytes to a helper process (warm-up first), each until acked."""
    import torch.distributed as dist

    from megatron_rl.ports import free_port
    from megatron_rl.rollout.weight_transfer import weight_sync_group

    port = free_port()
    helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-helper",
                               str(port), str(nbytes), str(repeats + 1)], cwd=ROOT)
    try:
        group, _store = weight_sync_group(port, 2, "gloo", "bench_raw_gloo", 120)
        flat, ack, times = torch.randint(0, 256, (nbytes,), dtype=torch.uint8), torch.zeros(1), []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            dist.broadcast(flat, group=group, group_src=0)
            dist.all_reduce(ack, group=group)
            times.append(time.perf_counter() - t0)
        dist.destroy_process_group(group)
        if helper.wait(60) != 0:
            raise RuntimeError(f"raw gloo helper exited with {helper.returncode}")
    finally:
        if helper.poll() is None:
            helper.kill()
    return times


def timed_generate(fn, prompts, repeats, new_tokens):
    """(median generated tokens/s, its tokens, its seconds, its early-stopped sequences) after
    one warm-up call; fn returns the generated length of each sequence."""
    fn(prompts)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lengths = fn(prompts)
        seconds = time.perf_counter() - t0
        runs.append((sum(lengths) / seconds, sum(lengths), seconds,
                     sum(n < new_tokens for n in lengths)))
    return sorted(runs)[len(runs) // 2]


def hf_generate_fn(hf_dir, params, pad_id=0):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def run(prompts):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=params.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=params.max_new_tokens,
                                 min_new_tokens=params.max_new_tokens, pad_token_id=pad_id)
        return [out.shape[1] - width] * len(prompts)  # min_new_tokens: all full length
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("prompts", 32), ("min-len", 16), ("max-len", 32), ("new-tokens", 64),
                          ("temperature", 1.0), ("layers", 4), ("hidden", 512), ("ffn", 1408),
                          ("heads", 8), ("groups", 4), ("vocab", 8192)):
        parser.add_argument(f"--{flag}", type=type(default), default=default)
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed calls per engine")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=None,
                        help="rollout.sglang.bucket_mb for the sync (default: the config's)")
    parser.add_argument("--sync-only", action="store_true",
                        help="skip generation (weight sync at larger model sizes)")
    parser.add_argument("--sglang-python", default=os.path.join(ROOT, ".venv-sglang/bin/python"))
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--raw-helper", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--builtin-compaction-compare", action="store_true",
                        help="only the built-in engine, compacted vs static decode batch")
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/tiny_cpu.yaml"),
                        help="--builtin-compaction-compare: the job config")
    parser.add_argument("--sft-steps", type=int, default=0,
                        help="--builtin-compaction-compare: warm-start steps (0: random model)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="--builtin-compaction-compare: config overrides, e.g. "
                        "model.hidden_size=512")
    parser.add_argument("--tries", type=int, default=3,
                        help="--builtin-compaction-compare: calls per seed and batch; the best "
                        "counts (the shared machine's load swings)")
    args = parser.parse_args()
    if args.raw_helper:
        return _raw_helper(*args.raw_helper)
    silence_third_party_warnings()
    setup_logging()
    if args.builtin_compaction_compare:
        return compaction_compare(args)

    from megatron_rl.config import load_config
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state

    model_cfg = dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=args.heads, num_query_groups=args.groups,
                     vocab_size=args.vocab, make_vocab_size_divisible_by=128,
                     # SGLang caps new tokens at its context length - prompt - 1: leave room
                     max_position_embeddings=max(512, args.max_len + args.new_tokens + 8))
    cfg = load_config(None, [f"model.{k}={v}" for k, v in model_cfg.items()], world_size=1)
    state.initialize(cfg.parallel)
    torch.manual_seed(0)
    model = build_gpt_model(cfg.model, cfg.parallel)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {params_m:.1f}M params, {args.layers} layers, hidden {args.hidden}, ffn "
          f"{args.ffn}, vocab {args.vocab}, float32; {args.prompts} prompts of {args.min_len}-"
          f"{args.max_len} tokens, {args.new_tokens} new tokens, temperature {args.temperature}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    work = tempfile.mkdtemp(prefix="bench_rollout_")
    try:
        gen, sync, startup_s = run_engines(args, cfg, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nbytes = sync["distributed"][0]
    raw = raw_gloo_seconds(nbytes, args.sync_repeats)
    sync["raw-gloo"] = (nbytes, statistics.median(raw[1:]), min(raw[1:]), raw[0])
    state.destroy()
    report(args, params_m, startup_s, gen, sync)
    return 0


def compaction_compare(args):
    """--builtin-compaction-compare (the module docstring); returns the exit status."""
    from megatron_rl.config import load_config
    from megatron_rl.data.task import build_task
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.rollout import SamplingParams
    from megatron_rl.rollout.builtin import BuiltinEngine
    from megatron_rl.training.optimizer import wrap_ddp
    from megatron_rl.training.sft import warm_start

    cfg = load_config(args.config, [*args.set, f"training.sft_steps={args.sft_steps}"],
                      world_size=1)
    info = state.initialize(cfg.parallel)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    if args.sft_steps:
        log(f"warm start: {warm_start(model, cfg, info)}")
    task, rc = build_task(cfg), cfg.rollout
    prompts = [p for p, _ in task.prompts_for_step(1, rc.prompts_per_step)]
    sp = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                        max_new_tokens=rc.max_new_tokens, n=cfg.algorithm.n,
                        stop_token_ids=(task.eos_id,))
    engines = {name: BuiltinEngine(model, vocab_size=task.vocab_size, compact=name == "compacted")
               for name in ("static", "compacted")}
    rates = {name: [] for name in engines}  # tokens/s of each seed's best call
    lengths, decode_rows = [], []  # of the timed calls: response lengths, compacted batches
    for seed in [-1] + list(range(args.gen_repeats)):  # a warm-up call first
        outputs, best = {}, {name: 0.0 for name in engines}
        for _ in range(1 if seed < 0 else args.tries):
            for name, engine in engines.items():
                t0 = time.perf_counter()
                samples = engine.generate(prompts, sp, seed=max(seed, 0))
                seconds = time.perf_counter() - t0
                outputs[name] = [(s.output_ids, s.output_logprobs, s.finish_reason)
                                 for s in samples]
                best[name] = max(best[name], sum(len(s.output_ids) for s in samples) / seconds)
            if outputs["static"] != outputs["compacted"]:
                raise SystemExit(f"seed {seed}: the compacted batch's samples differ from the "
                                 f"static batch's")
        if seed < 0:
            continue
        for name in engines:
            rates[name].append(best[name])
        lengths += [len(ids) for ids, _, _ in outputs["static"]]
        decode_rows += engines["compacted"]._decode_rows
        log(f"seed {seed}: static {best['static']:.0f} tokens/s, compacted "
            f"{best['compacted']:.0f} tokens/s")
    state.destroy()
    steps = len(decode_rows)
    print(f"{' '.join([os.path.relpath(args.config, ROOT), *args.set])}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{f'{args.sft_steps}-step warm start' if args.sft_steps else 'random weights'}; "
          f"{len(prompts)} prompts x {sp.n} samples, at most {sp.max_new_tokens} new tokens, "
          f"temperature {sp.temperature}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads")
    print(f"seeds 0-{args.gen_repeats - 1}, the best of {args.tries} calls of each per seed "
          f"(alternating, after a warm-up call); samples identical in every call. "
          f"Responses {min(lengths)}-"
          f"{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.1f}, "
          f"{sum(n < sp.max_new_tokens for n in lengths)} of {len(lengths)} stopped early; "
          f"compacted decode batch: mean {sum(decode_rows) / steps:.1f} rows over {steps} decode "
          f"steps (static: {len(prompts) * sp.n})")
    print(f"{'batch':<11}{'median tokens/s':>16}{'best':>8}  (over the seeds)")
    for name, r in rates.items():
        print(f"{name:<11}{statistics.median(r):>16.0f}{max(r):>8.0f}")
    per_call = [c / s for s, c in zip(rates["static"], rates["compacted"])]
    speedup = statistics.median(per_call)
    print(f"compacted / static = {speedup:.2f}x (median of the per-seed ratios, which range "
          f"{min(per_call):.2f}-{max(per_call):.2f}x); target >= 1.5x: "
          f"{'met' if speedup >= 1.5 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "raw_helper"},
                       "tokens_per_s": rates, "speedup": speedup,
                       "mean_response_tokens": sum(lengths) / len(lengths),
                       "mean_decode_rows": sum(decode_rows) / steps}, f, indent=2)
    return 0


def run_engines(args, cfg, model, work):
    from megatron_rl.rollout import SamplingParams
    from megatron_rl.rollout.builtin import BuiltinEngine
    from megatron_rl.rollout.config import SGLangConfig
    from megatron_rl.rollout.sglang_client import SGLangClient
    from megatron_rl.rollout.weight_sync import hf_weights, write_hf_folder

    hf_dir = os.path.join(work, "hf")
    write_hf_folder(hf_weights(model, cfg.model), hf_dir, cfg=cfg.model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g)]
    sp = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens)
    gen, sync = {}, {}
    if not args.sync_only:
        builtin = BuiltinEngine(model, vocab_size=args.vocab, seed=0)
        for name, fn in (("builtin", lambda ps: [len(s.output_ids)
                                                 for s in builtin.generate(ps, sp)]),
                         ("hf", hf_generate_fn(hf_dir, sp))):
            gen[name] = timed_generate(fn, prompts, args.gen_repeats, args.new_tokens)
            log(f"{name}: {gen[name][0]:.0f} tokens/s")

    bucket = {} if args.bucket_mb is None else {"bucket_mb": args.bucket_mb}
    scfg = SGLangConfig(python=args.sglang_python, dtype="float32", startup_timeout_s=300, **bucket,
                        max_total_tokens=max(4096, 2 * args.prompts * (args.max_len +
                                                                       args.new_tokens)))
    t0 = time.perf_counter()
    engine = SGLangClient.launch(hf_dir, scfg, os.path.join(work, "logs"), 1)
    startup_s = time.perf_counter() - t0
    try:
        log(f"sglang server ready in {startup_s:.1f} s")
        if not args.sync_only:
            gen["sglang"] = timed_generate(
                lambda ps: [len(s.output_ids) for s in engine.generate(ps, sp)], prompts,
                args.gen_repeats, args.new_tokens)
            log(f"sglang: {gen['sglang'][0]:.0f} tokens/s")
        version = 0
        for method in ("distributed", "tensor", "disk"):
            runs = [engine.update_weights(hf_weights(model, cfg.model), version + i + 1,
                                          method=method, disk_dir=os.path.join(work, "sync"))
                    for i in range(args.sync_repeats + 1)]
            version += len(runs)
            times = [r["seconds"] for r in runs]
            sync[method] = (runs[0]["bytes"], statistics.median(times[1:]), min(times[1:]),
                            times[0])
            log(f"sync {method}: {sync[method][1]:.3f} s (first call {times[0]:.3f} s)")
        assert engine.generate(prompts[:1], sp)[0].weight_version == version
    finally:
        engine.shutdown()
    return gen, sync, startup_s


def report(args, params_m, startup_s, gen, sync):
    nbytes = sync["distributed"][0]
    builtin_x = sglang_x = None
    if gen:
        print(f"\nGeneration ({args.prompts} prompts x {args.new_tokens} new tokens, warm-up + "
              f"median of {args.gen_repeats}):")
        print(f"{'engine':<10}{'tokens':>8}{'seconds':>10}{'tokens/s':>11}{'vs hf':>8}"
              f"{'short':>7}")
        for name in ("builtin", "sglang", "hf"):
            rate, tokens, seconds, short = gen[name]
            print(f"{name:<10}{tokens:>8}{seconds:>10.2f}{rate:>11.0f}"
                  f"{rate / gen['hf'][0]:>8.2f}{short:>7}")
        builtin_x = gen["builtin"][0] / gen["hf"][0]
        sglang_x = gen["sglang"][0] / gen["hf"][0]
        print(f"builtin / hf = {builtin_x:.2f}x, sglang / hf = {sglang_x:.2f}x; target builtin "
              f">= 2x hf: {'met' if builtin_x >= 2 else 'NOT met'}")
    print(f"\nWeight sync ({nbytes / 2**20:.1f} MiB; median and best of {args.sync_repeats} "
          f"after a warm-up call, whose time is 'first s'):")
    print(f"{'method':<13}{'MiB':>8}{'median s':>10}{'MiB/s':>9}{'vs raw':>8}{'best s':>9}"
          f"{'first s':>9}")
    raw_bw = nbytes / sync["raw-gloo"][1]
    for name, (b, seconds, best, first) in sync.items():
        print(f"{name:<13}{b / 2**20:>8.1f}{seconds:>10.3f}{b / seconds / 2**20:>9.0f}"
              f"{b / seconds / raw_bw:>8.1%}{best:>9.3f}{first:>9.3f}")
    dist_frac = nbytes / sync["distributed"][1] / raw_bw
    print(f"distributed / raw gloo bandwidth = {dist_frac:.1%}; target >= 50%: "
          f"{'met' if dist_frac >= 0.5 else 'NOT met'}")
    if args.json:
        result = {"args": {k: v for k, v in vars(args).items() if k != "raw_helper"},
                  "params_m": params_m, "sglang_startup_s": startup_s,
                  "generation": {k: dict(zip(("tokens_per_s", "tokens", "seconds", "short"), v))
                                 for k, v in gen.items()},
                  "sync": {k: dict(zip(("bytes", "median_s", "best_s", "first_s"), v),
                                   bytes_per_s=v[0] / v[1]) for k, v in sync.items()},
                  "builtin_vs_hf": builtin_x, "sglang_vs_hf": sglang_x,
                  "distributed_vs_raw": dist_frac, "targets_met": {
                      "builtin_2x_hf": None if builtin_x is None else builtin_x >= 2,
                      "distributed_half_raw": dist_frac >= 0.5}}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

if __name__ == "__main__":
    sys.exit(main())
