"""Train-phase throughput of the RL update vs a plain PyTorch loop on the same model.

    python tools/bench_train.py [--layers 4 --hidden 256 --seq 256 --batch 16 --iters 5]

(a) the RL path: train_mini_batch -- megatron DDP + schedule, vocab-parallel log-prob/entropy op,
    PPO-clip loss with global normalisers, finiteness check, megatron Adam step;
(b) the plain loop: the same GPTModel (same shapes, weights, tokens), logits -> cross-entropy ->
    backward -> torch.optim.AdamW step, nothing else.
Both process every position of the same batch; tokens/s counts all positions. MFU is the
model FLOPs (6 x params x tokens + attention) over the peak fp32 matmul rate measured here with
torch.mm, since a CPU has no datasheet peak that torch reaches. Single process (TP=PP=DP=1).
"""
import argparse
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
    args = parser.parse_args()

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
    n_tokens = args.batch * args.seq

    # (a) the RL update
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.training)
    for mb, lp in zip(micro, compute_logprobs(model, micro, 1.0, args.vocab)):
        mb.old_logprobs = lp
    alg = AlgorithmConfig(loss_mode="ppo_clip")
    train_mini_batch(model, optimizer, micro, alg, 1.0, args.vocab, seed=0)  # warm-up
    t0 = time.perf_counter()
    for i in range(args.iters):
        train_mini_batch(model, optimizer, micro, alg, 1.0, args.vocab, seed=i)
    rl_s = (time.perf_counter() - t0) / args.iters

    # (b) the plain loop on the same architecture and weights
    plain = build_gpt_model(cfg.model, cfg.parallel)
    plain.load_state_dict(model.module.state_dict())
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    positions = torch.arange(args.seq).unsqueeze(0)

    def plain_step():
        for mb in micro:
            logits = plain(mb.tokens, positions.expand_as(mb.tokens), None)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     mb.targets.flatten())
            (loss / len(micro)).backward()
        adam.step()
        adam.zero_grad(set_to_none=True)

    plain_step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        plain_step()
    plain_s = (time.perf_counter() - t0) / args.iters

    params = sum(p.numel() for p in plain.parameters())
    flops_per_token = 6 * params + 12 * args.layers * args.hidden * args.seq
    peak = matmul_peak_gflops()
    print(f"model: {params / 1e6:.1f}M params, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}; batch {args.batch} x seq {args.seq} = {n_tokens} tokens/step, "
          f"micro-batch {args.micro}; peak fp32 matmul measured {peak:.1f} GFLOP/s")
    print(f"{'path':<10}{'s/step':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}")
    for name, sec in (("rl-train", rl_s), ("plain", plain_s)):
        gflops = flops_per_token * n_tokens / sec / 1e9
        print(f"{name:<10}{sec:>10.3f}{n_tokens / sec:>12.0f}{gflops:>10.1f}{gflops / peak:>8.1%}")
    print(f"rl-train / plain tokens/s: {plain_s / rl_s:.2f} (target >= 0.70)")
    state.destroy()


if __name__ == "__main__":
    main()
