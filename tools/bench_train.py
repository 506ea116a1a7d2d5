"""Train-phase throughput of the RL update vs a plain PyTorch loop on the same model, and the
train phase of Clip-Cov / KL-Cov relative to GRPO's PPO-clip loss on the same batch.

    python tools/bench_train.py [--layers 4 --hidden 256 --seq 256 --batch 16 --iters 5]
    python tools/bench_train.py --loss-mode clip_cov kl_cov [--mini-batches 4]

(a) the RL path: the trainer's train phase -- train_mini_batch per mini-batch (megatron DDP +
    schedule, vocab-parallel log-prob/entropy op, the loss with global normalisers, finiteness
    check, megatron Adam step), the first with old_is_current as the trainer passes it; each
    timed phase follows an untimed old-log-probs forward on the weights it starts from;
(b) the plain loop: the same GPTModel (same shapes, weights, tokens), logits -> cross-entropy ->
    backward -> torch.optim.AdamW step per mini-batch, nothing else.
--loss-mode runs (a) for each loss mode (ppo_clip always among them), interleaved iteration by
iteration so machine load hits them alike, and reports each one's train-phase time relative to
ppo_clip (Clip-Cov / KL-Cov with cov_policy current pay one no-grad forward per mini-batch after
the first). Times are medians over --iters. tokens/s counts all positions. MFU is the model FLOPs
(6 x params x tokens + attention) over the peak fp32 matmul rate measured here with torch.mm,
since a CPU has no datasheet peak that torch reaches. Single process (TP=PP=DP=1).
"""
import argparse
import statistics
import time

import torch

from megatron_rl.console import silence_third_party_warnings

silence_third_party_warnings()


def matmul_peak_gflops(n=1024, repeats=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--loss-mode", nargs="+", default=["ppo_clip"],
                        choices=("ppo_clip", "clip_cov", "kl_cov"),
                        help="train-phase loss modes to time (ppo_clip is always timed too)")
    parser.add_argument("--mini-batches", type=int, default=1,
                        help="optimizer steps per train phase: the batch split evenly")
    args = parser.parse_args()
    if args.batch % (args.micro * args.mini_batches):
        parser.error("--batch must be a multiple of --micro x --mini-batches")
    modes = ["ppo_clip"] + [m for m in dict.fromkeys(args.loss_mode) if m != "ppo_clip"]

    from megatron_rl.algorithms import AlgorithmConfig
    from megatron_rl.config import load_config
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.training.actor import compute_logprobs, train_mini_batch
    from megatron_rl.training.rl_batch import MicroBatch
    from megatron_rl.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             f"model.ffn_hidden_size={args.hidden * 11 // 4}",
                             "model.num_attention_heads=8", "model.num_query_groups=4",
                             f"model.vocab_size={args.vocab}",
                             f"model.max_position_embeddings={args.seq}", "training.lr=1e-5"],
                      world_size=1)
    state.initialize(cfg.parallel)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    mask = torch.zeros(args.batch, args.seq)
    mask[:, args.seq // 4:] = 1.0  # responses: the last three quarters
    micro = [MicroBatch(tokens=t, targets=y, loss_mask=m,
                        advantages=torch.randn(m.shape, generator=g) * m,
                        rollout_logprobs=torch.zeros(m.shape))
             for t, y, m in zip(tokens[:, :-1].chunk(args.batch // args.micro),
                                tokens[:, 1:].chunk(args.batch // args.micro),
                                mask.chunk(args.batch // args.micro))]
    per_mini = len(micro) // args.mini_batches
    minis = [micro[i:i + per_mini] for i in range(0, len(micro), per_mini)]
    n_tokens = args.batch * args.seq

    # (a) the RL train phase, one model and optimizer per loss mode (the same initial weights)
    first = build_gpt_model(cfg.model, cfg.parallel)
    policies = {}
    for mode in modes:
        model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
        model.module.load_state_dict(first.state_dict())
        # Clip-Cov / KL-Cov with the paper's orders of magnitude scaled to this batch
        alg = AlgorithmConfig(loss_mode=mode, r=2e-3, k=2e-3)
        policies[mode] = (model, build_optimizer([model], cfg.training), alg)

    def train_phase(mode, seed):
        model, optimizer, alg = policies[mode]
        for mini in minis:  # the old-log-probs phase (not timed)
            for mb, lp in zip(mini, compute_logprobs(model, mini, 1.0, args.vocab)):
                mb.old_logprobs = lp
        t0 = time.perf_counter()
        for index, mini in enumerate(minis):
            train_mini_batch(model, optimizer, mini, alg, 1.0, args.vocab, seed=seed + index,
                             old_is_current=index == 0)
        return time.perf_counter() - t0

    times = {mode: [] for mode in modes}
    for mode in modes:
        train_phase(mode, 0)  # warm-up
    for i in range(args.iters):
        for mode in modes:
            times[mode].append(train_phase(mode, 1000 * (i + 1)))
    rl_s = {mode: statistics.median(t) for mode, t in times.items()}

    # (b) the plain loop on the same architecture and weights
    plain = build_gpt_model(cfg.model, cfg.parallel)
    plain.load_state_dict(first.state_dict())
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    positions = torch.arange(args.seq).unsqueeze(0)

    def plain_step():
        for mini in minis:
            for mb in mini:
                logits = plain(mb.tokens, positions.expand_as(mb.tokens), None)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                         mb.targets.flatten())
                (loss / len(mini)).backward()
            adam.step()
            adam.zero_grad(set_to_none=True)

    plain_step()
    plain_times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        plain_step()
        plain_times.append(time.perf_counter() - t0)
    plain_s = statistics.median(plain_times)

    params = sum(p.numel() for p in plain.parameters())
    flops_per_token = 6 * params + 12 * args.layers * args.hidden * args.seq
    peak = matmul_peak_gflops()
    print(f"model: {params / 1e6:.1f}M params, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}; batch {args.batch} x seq {args.seq} = {n_tokens} tokens/step, "
          f"micro-batch {args.micro}, {args.mini_batches} mini-batch(es); peak fp32 matmul "
          f"measured {peak:.1f} GFLOP/s")
    print(f"{'path':<18}{'s/step':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}")
    rows = [(f"rl-train {m}" if len(modes) > 1 else "rl-train", rl_s[m]) for m in modes]
    for name, sec in rows + [("plain", plain_s)]:
        gflops = flops_per_token * n_tokens / sec / 1e9
        print(f"{name:<18}{sec:>10.3f}{n_tokens / sec:>12.0f}{gflops:>10.1f}{gflops / peak:>8.1%}")
    print(f"rl-train / plain tokens/s: {plain_s / rl_s['ppo_clip']:.2f} (target >= 0.70)")
    for mode in modes[1:]:
        print(f"train phase {mode} / ppo_clip: {rl_s[mode] / rl_s['ppo_clip']:.3f} "
              f"({args.mini_batches} mini-batch(es); target <= 1.05 with one)")
    state.destroy()


if __name__ == "__main__":
    main()
