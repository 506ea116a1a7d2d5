#!/usr/bin/env python
"""Peak memory of the RL update with and without chunked log-probs (training.logprob_chunking) on
CPU, for a vocabulary-heavy model, each path in a fresh process.

    python tools/logprob_memory.py [--layers 4 --hidden 512 --vocab 151936 --micro 2 --seq 512]

Per path, on one micro-batch (float32, untied output layer as Qwen2.5-7B, megatron DDP and Adam):
the old-log-probs forward (compute_logprobs) and two PPO-clip updates (train_mini_batch; the first
allocates Adam's state). Reported: the peak RSS (VmHWM, reset through /proc/self/clear_refs)
above the RSS just before the forward and before the second update (its forward + backward, then
its optimizer step), the second update's time,
and how far the chunked path's old log-probs, entropy and grad norm are from the logits path's.
The optimizer step is measured apart (its Adam temporaries over all parameters are the same on
both paths). Next to it the memory planner's `logits` item for the same shapes
(parallel/memory_plan.py).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.console import silence_third_party_warnings  # noqa: E402

silence_third_party_warnings()
MIB = 1 << 20
# child processes: the logits path with a separate logits gradient, the logits path as the trainer
# runs it (gradient written over the logits), the chunked path
PATHS = ("copy", "off", "on")
LABELS = {"copy": "logits, gradient copy", "off": "logits", "on": "chunked"}


def config(args, chunked):
    from megatron_rl.config import load_config

    return load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.hidden * 11 // 4}", "model.num_attention_heads=8",
        "model.num_query_groups=4", f"model.vocab_size={args.vocab}",
        "model.tie_word_embeddings=false", f"model.max_position_embeddings={args.seq}",
        "model.transformer_impl=local", f"training.seq_length={args.seq}",
        f"training.micro_batch_size={args.micro}", "rollout.prompts_per_step=1",
        f"algorithm.n={args.micro}", f"training.logprob_chunking={str(chunked).lower()}",
        "training.lr=1e-5"], world_size=1)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS


def peak_and_current():
    with open("/proc/self/status") as f:
        status = f.read()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024
                 for key in ("VmHWM", "VmRSS"))


def child(args):
    """One path in this (fresh) process; writes its results to args.out."""
    import torch

    from megatron_rl.algorithms import AlgorithmConfig
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.parallel.memory_plan import logprob_chunking_choice
    from megatron_rl.training.actor import compute_logprobs, train_mini_batch
    from megatron_rl.training.optimizer import build_optimizer, wrap_ddp
    from megatron_rl.training.rl_batch import MicroBatch

    if args.child == "copy":  # the logits path with its gradient in a new tensor (the op's
        from megatron_rl.training import actor  # inplace_backward off), for comparison

        op = actor.vocab_parallel_logprobs_entropy
        actor.vocab_parallel_logprobs_entropy = (
            lambda *a, inplace_backward=False, **k: op(*a, inplace_backward=False, **k))
    cfg = config(args, args.child == "on")
    chunked = logprob_chunking_choice(cfg)
    state.initialize(cfg.parallel)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.training)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g)
    mask = torch.zeros(args.micro, args.seq)
    mask[:, args.seq // 4:] = 1.0
    batch = [MicroBatch(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask,
                        advantages=torch.randn(args.micro, 1, generator=g) * mask,
                        rollout_logprobs=torch.zeros_like(mask))]
    alg = AlgorithmConfig(loss_mode="ppo_clip", entropy_coef=0.01)
    result = {"chunked": chunked}
    before = peak_and_current()[1]
    reset_peak()
    batch[0].old_logprobs = compute_logprobs(model, batch, 1.0, args.vocab, chunked=chunked)[0]
    result["forward_peak"] = peak_and_current()[0] - before
    # The optimizer step's own temporaries (Adam over every parameter) are measured apart: the
    # forward + backward peak is read and reset when it starts.
    step, marks = optimizer.step, {}

    def measured_step(*a, **k):
        marks["fwd_bwd"] = peak_and_current()[0]
        reset_peak()
        return step(*a, **k)

    optimizer.step = measured_step
    updates = []
    for _ in range(2):
        before = peak_and_current()[1]
        reset_peak()
        t0 = time.perf_counter()
        metrics = train_mini_batch(model, optimizer, batch, alg, 1.0, args.vocab, seed=0,
                                   chunked=chunked)
        updates.append(dict(fwd_bwd=marks["fwd_bwd"] - before,
                            optimizer=peak_and_current()[0] - before,
                            seconds=time.perf_counter() - t0, metrics=metrics))
    result.update(fwd_bwd_peak=updates[1]["fwd_bwd"], step_peak=updates[1]["optimizer"],
                  update_s=updates[1]["seconds"], entropy=updates[0]["metrics"]["entropy"],
                  grad_norm=updates[0]["metrics"]["grad_norm"])
    torch.save(batch[0].old_logprobs, args.out + ".pt")
    with open(args.out, "w") as f:
        json.dump(result, f)
    state.destroy()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from megatron_rl.parallel.memory_plan import plan_memory

    shape = [f"--layers={args.layers}", f"--hidden={args.hidden}", f"--vocab={args.vocab}",
             f"--micro={args.micro}", f"--seq={args.seq}"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            out = os.path.join(tmp, path)
            subprocess.run([sys.executable, os.path.abspath(__file__), *shape, "--child", path,
                            "--out", out], check=True)
            with open(out) as f:
                results[path] = json.load(f)
            results[path]["old"] = torch.load(out + ".pt")
    off, on = results["off"], results["on"]
    tokens = args.micro * args.seq
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab} (untied), float32; "
          f"one micro-batch {args.micro} x {args.seq} = {tokens} tokens; logits "
          f"{tokens * args.vocab * 4 / MIB:.0f} MiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("peak RSS above the RSS before the phase, MiB: the old-log-probs forward; the second "
          "update's forward + backward, then its optimizer step")
    print(f"{'path':<22}{'forward':>10}{'fwd+bwd':>10}{'opt step':>10}{'update s':>10}"
          f"{'planned logits':>16}")
    # the planner's `logits` item of each path the trainer can take
    planned = {path: plan_memory(config(args, path == "on"), 80, distributed_optimizer=False,
                                 colocated_rollout=False, runtime_overhead_gib=0
                                 ).item("logits").bytes for path in ("off", "on")}
    for path in PATHS:
        r = results[path]
        assert r["chunked"] == (path == "on")
        plan_column = f"{planned[path] / MIB:>16.0f}" if path in planned else ""
        print(f"{LABELS[path]:<22}{r['forward_peak'] / MIB:>10.0f}"
              f"{r['fwd_bwd_peak'] / MIB:>10.0f}{r['step_peak'] / MIB:>10.0f}"
              f"{r['update_s']:>10.2f}{plan_column}")
    copy = results["copy"]
    print(f"logits path, gradient written over the logits / in a new tensor: forward + backward "
          f"peak {off['fwd_bwd_peak'] / copy['fwd_bwd_peak']:.2f} (saved "
          f"{(copy['fwd_bwd_peak'] - off['fwd_bwd_peak']) / MIB:.0f} MiB), grad norm "
          f"{off['grad_norm']:.6f} vs {copy['grad_norm']:.6f}")
    print(f"chunked / logits peak: forward {on['forward_peak'] / off['forward_peak']:.2f}, "
          f"forward + backward {on['fwd_bwd_peak'] / off['fwd_bwd_peak']:.2f} (saved "
          f"{(off['fwd_bwd_peak'] - on['fwd_bwd_peak']) / MIB:.0f} MiB; planned "
          f"{(planned['off'] - planned['on']) / MIB:.0f} MiB)")
    print(f"chunked vs logits: old log-probs max abs diff "
          f"{(on['old'] - off['old']).abs().max().item():.2e}, entropy {on['entropy']:.6f} vs "
          f"{off['entropy']:.6f}, grad norm {on['grad_norm']:.6f} vs {off['grad_norm']:.6f}")


if __name__ == "__main__":
    main()
