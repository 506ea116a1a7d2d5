"""TP=2 checks of megatron_rl.ops against float64 references on the gathered (full) logits.

Run under torchrun with 2 processes (gloo). Every rank builds the same global logits, keeps its
half of the vocabulary, runs the vocab-parallel ops with group=WORLD and compares outputs and its
shard of the gradients with dense float64 autograd on the full logits. Raises on any mismatch.
"""
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_rl.ops import output_layer_logprobs_entropy, vocab_parallel as vp  # noqa: E402
from megatron_rl.ops import vocab_parallel_covariance, vocab_parallel_logprobs_entropy  # noqa: E402
from megatron_rl.ops.reference import dense_covariance, dense_logprobs_entropy  # noqa: E402

OUTPUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 2e-6),
            torch.bfloat16: (1e-2, 1e-4)}


def global_logits(leading, vocab_padded, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*leading, vocab_padded, generator=g, dtype=torch.float64) * 3
    logits[torch.rand(logits.shape, generator=g) < 0.1] = float("-inf")
    return logits.to(dtype)


def local_shard(full, rank, world):
    return full.chunk(world, dim=-1)[rank].contiguous()


def check_logprobs_entropy(name, full, target, temperature, vocab_size, group, rank, world):
    dtype = full.dtype
    g = torch.Generator().manual_seed(99)
    grad_lp = torch.randn(target.shape, generator=g)
    grad_h = torch.randn(target.shape, generator=g)

    x = local_shard(full, rank, world).requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, target, temperature, group,
                                                        vocab_size=vocab_size)
    (grad_lp.to(logprobs.dtype) * logprobs + grad_h.to(entropy.dtype) * entropy).sum().backward()

    full64 = full.double().requires_grad_(True)
    ref_lp, ref_h = dense_logprobs_entropy(full64, target, temperature, vocab_size)
    (grad_lp.double() * ref_lp + grad_h.double() * ref_h).sum().backward()

    tol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} logprobs: {m}")
    torch.testing.assert_close(entropy.double(), ref_h, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} entropy: {m}")
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), local_shard(full64.grad, rank, world), rtol=rtol,
                               atol=atol, msg=lambda m: f"{name} grad: {m}")


def check_covariance(name, full, delta_full, temperature, vocab_size, group, rank, world):
    cov, mean_delta = vocab_parallel_covariance(local_shard(full, rank, world),
                                                local_shard(delta_full, rank, world),
                                                temperature, group, vocab_size=vocab_size)
    ref_cov, ref_mean = dense_covariance(full.double(), delta_full.double(), temperature,
                                         vocab_size)
    tol = OUTPUT_TOL[full.dtype]
    torch.testing.assert_close(cov.double(), ref_cov, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} cov: {m}")
    torch.testing.assert_close(mean_delta.double(), ref_mean, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} mean: {m}")


def check_output_layer(name, dtype, group, rank, world):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(2 * 96, 16, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    vocab_size = 181  # rank 1 holds 85 real columns and 11 padding rows of the weight
    target = torch.randint(0, vocab_size, (3, 7), generator=g)
    target[0] = torch.tensor([3, 100, 180, 95, 96, 0, 150])  # both shards, both edges of the split
    grad_lp, grad_h = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)

    h = hidden.clone().requires_grad_(True)
    w = local_shard(weight.t(), rank, world).t().contiguous().requires_grad_(True)
    logprobs, entropy = output_layer_logprobs_entropy(h, w, target, 0.9, group,
                                                      vocab_size=vocab_size, token_chunk=8,
                                                      vocab_chunk=40)
    (grad_lp.to(logprobs.dtype) * logprobs + grad_h.to(entropy.dtype) * entropy).sum().backward()

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_lp, ref_h = dense_logprobs_entropy(h64 @ w64.t(), target, 0.9, vocab_size)
    (grad_lp.double() * ref_lp + grad_h.double() * ref_h).sum().backward()
    tol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} logprobs: {m}")
    torch.testing.assert_close(entropy.double(), ref_h, rtol=tol, atol=tol,
                               msg=lambda m: f"{name} entropy: {m}")
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=10 * tol, atol=10 * tol,
                               msg=lambda m: f"{name} grad_hidden: {m}")
    torch.testing.assert_close(w.grad.double(), local_shard(w64.grad.t(), rank, world).t(),
                               rtol=10 * tol, atol=10 * tol,
                               msg=lambda m: f"{name} grad_weight: {m}")


def run_checks(group, rank, world, label):
    # Odd shard width, temperature != 1, targets forced onto the other rank's shard.
    full = global_logits((11,), 2 * 37, torch.float32, seed=1)
    target = torch.randint(0, 74, (11,), generator=torch.Generator().manual_seed(2))
    target[:4] = torch.tensor([0, 36, 37, 73])
    # A token whose logits are all -inf on rank 0: its local max is -inf, the global one is not.
    full[4, :37] = float("-inf")
    target[4] = 50
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        check_logprobs_entropy(f"{label} odd-shard {dtype}", full.to(dtype), target, 0.7, None,
                               group, rank, world)
    # Padded vocabulary (megatron pads to a multiple of 128 * TP) in the sequence-parallel layout
    # [s, b, V_local]: 97 real columns, rank 1 holds 47 of them and 3 padding columns.
    full = global_logits((3, 4), 100, torch.float32, seed=3)
    full[..., 97:] = 40.0
    target = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))
    check_logprobs_entropy(f"{label} padded", full, target, 1.6, 97, group, rank, world)
    # Padding that covers all of rank 1's columns.
    check_logprobs_entropy(f"{label} padded-rank", full, target.clamp(max=44), 1.0, 45, group,
                           rank, world)

    delta = torch.randn(3, 4, 100, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check_covariance(f"{label} covariance", full, delta.float(), 0.8, 97, group, rank, world)
    check_covariance(f"{label} covariance-bf16", full.to(torch.bfloat16), delta.float(), 1.0, None,
                     group, rank, world)

    check_output_layer(f"{label} output-layer fp64", torch.float64, group, rank, world)
    check_output_layer(f"{label} output-layer fp32", torch.float32, group, rank, world)

    # gradcheck perturbs the (replicated) full logits identically on both ranks; each rank takes
    # its shard, and the shard gradients are all-gathered so the analytic Jacobian is complete.
    full = global_logits((3,), 2 * 5, torch.float64, seed=6).clamp(min=-5).requires_grad_(True)
    target = torch.tensor([0, 7, 4])
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs_entropy(_ShardOfReplicated.apply(x, group), target, 0.9,
                                                  group, vocab_size=9),
        (full,), eps=1e-6, atol=1e-7), f"{label} gradcheck"


class _ShardOfReplicated(torch.autograd.Function):
    """This rank's vocabulary shard of a replicated tensor; backward all-gathers the shard grads."""

    @staticmethod
    def forward(ctx, full, group):
        ctx.group = group
        return local_shard(full, dist.get_rank(group), dist.get_world_size(group))

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node 2"
    group = dist.group.WORLD
    run_checks(group, rank, world, "extension")

    # The same checks through the PyTorch fallback ops.
    native_phase_ops = vp.phase_ops
    vp.phase_ops = lambda device: vp._REFERENCE_OPS
    run_checks(group, rank, world, "reference")
    vp.phase_ops = native_phase_ops

    # Control: without the TP all-reduces the same comparison must fail, or it proves nothing.
    full = global_logits((6,), 2 * 37, torch.float32, seed=8)
    target = torch.randint(0, 74, (6,), generator=torch.Generator().manual_seed(9))
    try:
        check_logprobs_entropy("no-communication", full, target, 1.0, None, None, rank, world)
    except AssertionError:
        pass
    else:
        raise AssertionError("per-shard results without all-reduce matched the global reference")

    dist.barrier()
    print(f"ops_tp_worker rank {rank}: all checks passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
