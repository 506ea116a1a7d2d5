"""Vocab-parallel log-prob, entropy and covariance on logits split across tensor-parallel ranks.

Each rank reads its shard of the logits once per op with the extension's phase kernels
(torch.ops.megatron_rl.*, see csrc/bindings.cpp) and the ranks exchange only O(tokens) numbers:
one all-reduce MAX of the per-token max and one all-reduce SUM of the stacked [3, tokens] partial
sums (sum-exp, sum-exp * z, target logit). The backward recomputes the softmax from the saved
logits and the per-token lse / entropy, so no [tokens, vocab] probability tensor is ever held;
it needs no communication because the loss is replicated across the TP ranks.
"""
import logging
from types import SimpleNamespace

import torch
import torch.distributed as dist

import megatron_rl.ops.reference as reference

logger = logging.getLogger(__name__)

try:
    from megatron_rl import _C  # noqa: F401  (loading it registers torch.ops.megatron_rl)

    _NATIVE_OPS = torch.ops.megatron_rl
    _NATIVE_HAS_CUDA = bool(_C.with_cuda)
except ImportError as exc:  # pragma: no cover - exercised by the fallback test in a subprocess
    logger.warning("megatron_rl._C unavailable (%s); vocab-parallel ops use the PyTorch reference",
                   exc)
    _NATIVE_OPS = None
    _NATIVE_HAS_CUDA = False

_REFERENCE_OPS = SimpleNamespace(
    logprob_stats=reference.logprob_stats,
    logprob_entropy_backward=reference.logprob_entropy_backward,
    logprob_entropy_backward_=reference.logprob_entropy_backward_,
    covariance_partials=reference.covariance_partials,
)


_WARNED_DEVICE_TYPES = set()


def phase_ops(device):
    """The extension's phase ops when they are built for `device`, else the PyTorch reference."""
    if _NATIVE_OPS is not None and (device.type == "cpu"
                                    or (device.type == "cuda" and _NATIVE_HAS_CUDA)):
        return _NATIVE_OPS
    if _NATIVE_OPS is not None and device.type not in _WARNED_DEVICE_TYPES:
        _WARNED_DEVICE_TYPES.add(device.type)
        logger.warning("megatron_rl._C has no %s kernels (rebuild with MEGATRON_RL_FORCE_CUDA=1 "
                       "on a CUDA host); vocab-parallel ops use the PyTorch reference",
                       device.type)
    return _REFERENCE_OPS


def shard_columns(local_vocab, group, vocab_size):
    """(global id of this shard's first column, number of its columns that are real vocabulary).

    The vocabulary is split evenly and in order over the ranks of `group`; columns at global id
    >= vocab_size are padding (megatron pads the vocabulary to a multiple of 128 * TP).
    """
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    padded = local_vocab * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} outside (0, {padded}] for {world} x "
                         f"{local_vocab} columns")
    start = rank * local_vocab
    return start, min(max(vocab_size - start, 0), local_vocab)


def rebase_moments(row_max, sum_exp, sum_exp_z, new_max):
    """Re-expresses sum exp(z - max) and sum exp(z - max)(z - max) relative to new_max >= max.

    Blocks with no mass (every logit -inf, or no valid column) contribute zeros instead of NaNs.
    """
    has_mass = sum_exp > 0
    shift = torch.where(has_mass, row_max - new_max, 0.0)
    scale = shift.exp()
    return (torch.where(has_mass, sum_exp * scale, 0.0),
            torch.where(has_mass, scale * (sum_exp_z + shift * sum_exp), 0.0))


def global_softmax_moments(stats, group):
    """lse, entropy and target z per token from each rank's logprob_stats [4, tokens].

    Two collectives: all-reduce MAX of the max, then all-reduce SUM of the rebased sums.
    """
    row_max, sum_exp, sum_exp_z, target_z = stats
    if group is not None:
        row_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([*rebase_moments(stats[0], sum_exp, sum_exp_z, row_max), target_z])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_z, target_z = sums
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp
    entropy = log_sum_exp - sum_exp_z / sum_exp
    return lse, entropy, target_z


def _as_rows(logits):
    """[..., V] -> a [tokens, V] view with unit column stride (copies only if it cannot view)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1])


def logprob_entropy_grad_(logits, target, lse, entropy, grad_logprob, grad_entropy, shard):
    """Writes d(grad_logprob . logprob + grad_entropy . entropy)/d(logits) over `logits`
    (detached) and returns it. The version bump makes autograd refuse any later use of the old
    values it saved (a second backward, another function that saved these logits)."""
    logits = logits.detach()
    phase_ops(logits.device).logprob_entropy_backward_(logits, target, lse, entropy, grad_logprob,
                                                        grad_entropy, *shard)
    torch.autograd.graph.increment_version(logits)
    return logits


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, inv_temperature, vocab_start, valid_cols, group,
                inplace_backward):
        ops = phase_ops(logits.device)
        stats = ops.logprob_stats(logits, target, inv_temperature, vocab_start, valid_cols)
        lse, entropy, target_z = global_softmax_moments(stats, group)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.shard = (inv_temperature, vocab_start, valid_cols)
        ctx.inplace_backward = inplace_backward
        return target_z - lse, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, target, lse, entropy = ctx.saved_tensors
        grads = (grad_logprobs.to(lse.dtype).contiguous(), grad_entropy.to(lse.dtype).contiguous())
        if ctx.inplace_backward:
            grad = logprob_entropy_grad_(logits, target, lse, entropy, *grads, ctx.shard)
        else:
            grad = phase_ops(logits.device).logprob_entropy_backward(
                logits, target, lse, entropy, *grads, *ctx.shard)
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits, target, temperature=1.0, group=None, *,
                                    vocab_size=None, inplace_backward=False):
    """Log-prob of `target` and entropy of softmax(logits / temperature) over the sharded
    vocabulary.

    logits: this rank's shard [..., V_local] (bf16, fp16, fp32 or fp64) of a vocabulary split evenly
    and in order over the ranks of `group` (None: this process holds the whole vocabulary).
    target: global token ids [...]; ids outside [0, vocab_size) contribute no target logit (their
    log-prob is -lse: mask them in the loss). vocab_size: number of real vocabulary columns when
    the vocabulary is padded; padding columns are excluded. Returns float32 (float64 for float64
    logits) log-probs and entropies of shape [...], differentiable w.r.t. logits.

    inplace_backward: the backward writes the logits' gradient over the logits themselves (as
    megatron's vocab_parallel_cross_entropy does) instead of allocating a [tokens, V_local] tensor,
    for callers whose logits are dead after the backward (an output layer needs only their
    gradient). The gradient is bitwise the out-of-place one. Afterwards the logits hold the
    gradient: autograd raises if anything that saved them runs its backward later, or if this
    backward runs twice; a leaf tensor (which the caller keeps) is refused.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} vs logits {tuple(logits.shape)}")
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_backward=True would overwrite a leaf tensor's values with its "
                         "gradient: pass logits computed by an op (or inplace_backward=False)")
    vocab_start, valid_cols = shard_columns(logits.shape[-1], group, vocab_size)
    logprobs, entropy = _VocabParallelLogprobsEntropy.apply(
        _as_rows(logits),
        target.reshape(-1).to(device=logits.device, dtype=torch.long).contiguous(),
        1.0 / temperature, vocab_start, valid_cols, group, inplace_backward)
    return logprobs.view(target.shape), entropy.view(target.shape)


@torch.no_grad()
def vocab_parallel_covariance(logits, delta, temperature=1.0, group=None, *, vocab_size=None):
    """Per token Cov_{a~pi}(log pi(a), delta(a)) and E_{a~pi}[delta(a)] over the sharded vocabulary.

    pi = softmax(logits / temperature); delta is a logits-shaped shard [..., V_local] (e.g. the
    change of the logits after an update; it is not divided by the temperature), in the logits'
    dtype or float32. Padding columns (global id >= vocab_size) are excluded. No gradient.
    """
    if delta.shape != logits.shape:
        raise ValueError(f"delta {tuple(delta.shape)} vs logits {tuple(logits.shape)}")
    vocab_start, valid_cols = shard_columns(logits.shape[-1], group, vocab_size)
    rows = _as_rows(logits)
    ops = phase_ops(rows.device)
    inv_temperature = 1.0 / temperature
    lse, entropy, _ = global_softmax_moments(
        ops.logprob_stats(rows, None, inv_temperature, vocab_start, valid_cols), group)
    if delta.dtype not in (logits.dtype, torch.float32):
        delta = delta.float()
    partials = ops.covariance_partials(rows, _as_rows(delta), lse, entropy, inv_temperature,
                                       valid_cols)
    if group is not None:
        dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
    shape = logits.shape[:-1]
    return partials[0].view(shape), partials[1].view(shape)
