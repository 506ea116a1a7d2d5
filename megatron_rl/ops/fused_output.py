"""Log-prob and entropy straight from the last hidden states and the vocab-parallel output layer.

The logits hidden @ weight.T are produced one [token_chunk, vocab_chunk] block at a time, reduced
by the extension's logprob_stats into per-token softmax moments that merge exactly across blocks
and TP ranks, and dropped; the backward recomputes each block, overwrites it with its logits
gradient (logprob_entropy_backward_) and folds that into grad_hidden and grad_weight. Peak extra
memory is one block and O(tokens), never [tokens, vocab].

TP: weight is this rank's [V_local, h] shard of megatron's ColumnParallelLinear output layer,
hidden the full input that layer multiplies (after any sequence-parallel gather). grad_weight is
local; grad_hidden gets the contributions of every rank's columns by an all-reduce over the group
(megatron's input-grad all-reduce), unless the caller's gather already reduces it in its backward.
"""
import torch
import torch.distributed as dist

from megatron_rl.ops.vocab_parallel import (global_softmax_moments, phase_ops, rebase_moments,
                                            shard_columns)


def _blocks(rows, cols, token_chunk, vocab_chunk):
    for t0 in range(0, rows, token_chunk):
        for v0 in range(0, cols, vocab_chunk):
            yield slice(t0, min(rows, t0 + token_chunk)), v0, min(cols, v0 + vocab_chunk)


class _OutputLayerLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, inv_temperature, vocab_start, valid_cols, group,
                token_chunk, vocab_chunk, all_reduce_grad_hidden):
        ops = phase_ops(hidden.device)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        rows = hidden.shape[0]
        stats = torch.zeros(4, rows, dtype=acc, device=hidden.device)
        stats[0] = float("-inf")
        for tokens, v0, v1 in _blocks(rows, weight.shape[0], token_chunk, vocab_chunk):
            logits = hidden[tokens] @ weight[v0:v1].t()
            block = ops.logprob_stats(logits, target[tokens], inv_temperature, vocab_start + v0,
                                      min(max(valid_cols - v0, 0), v1 - v0))
            # Online merge of this vocab block into the running moments of these tokens.
            running = stats[:, tokens]
            new_max = torch.maximum(running[0], block[0])
            s_run, w_run = rebase_moments(running[0], running[1], running[2], new_max)
            s_blk, w_blk = rebase_moments(block[0], block[1], block[2], new_max)
            stats[:, tokens] = torch.stack([new_max, s_run + s_blk, w_run + w_blk,
                                            running[3] + block[3]])
        lse, entropy, target_z = global_softmax_moments(stats, group)
        ctx.save_for_backward(hidden, weight, target, lse, entropy)
        ctx.config = (inv_temperature, vocab_start, valid_cols, group, token_chunk, vocab_chunk,
                      all_reduce_grad_hidden)
        return target_z - lse, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, target, lse, entropy = ctx.saved_tensors
        (inv_temperature, vocab_start, valid_cols, group, token_chunk, vocab_chunk,
         all_reduce_grad_hidden) = ctx.config
        ops = phase_ops(hidden.device)
        grad_logprobs = grad_logprobs.to(lse.dtype).contiguous()
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        # Accumulate in the math dtype across blocks; bf16 accumulation would lose the small ones.
        grad_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for tokens, v0, v1 in _blocks(hidden.shape[0], weight.shape[0], token_chunk, vocab_chunk):
            # The block's logits are dead once turned into their gradient: written in place.
            grad_logits = hidden[tokens] @ weight[v0:v1].t()
            ops.logprob_entropy_backward_(
                grad_logits, target[tokens], lse[tokens], entropy[tokens], grad_logprobs[tokens],
                grad_entropy[tokens], inv_temperature, vocab_start + v0,
                min(max(valid_cols - v0, 0), v1 - v0))
            grad_hidden[tokens] += grad_logits @ weight[v0:v1]
            grad_weight[v0:v1] += grad_logits.t() @ hidden[tokens]
        if group is not None and all_reduce_grad_hidden:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                None, None, None, None, None, None, None, None)


def output_layer_logprobs_entropy(hidden, weight, target, temperature=1.0, group=None, *,
                                  vocab_size=None, token_chunk=1024, vocab_chunk=16384,
                                  all_reduce_grad_hidden=True):
    """Log-prob of `target` and entropy of softmax(hidden @ weight.T / temperature), never
    materialising the logits.

    hidden: [..., h]; weight: this rank's [V_local, h] shard of the output layer; target: global
    token ids [...]; vocab_size: real vocabulary size when the vocabulary is padded. Returns float32
    (float64 for float64 inputs) [...] tensors, differentiable w.r.t. hidden and weight. Set
    all_reduce_grad_hidden=False when hidden comes from a sequence-parallel all-gather whose
    backward already reduce-scatters the gradient over the group.
    """
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} vs hidden {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size "
                         f"{hidden.shape[-1]}")
    vocab_start, valid_cols = shard_columns(weight.shape[0], group, vocab_size)
    logprobs, entropy = _OutputLayerLogprobsEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight, target.reshape(-1).to(device=hidden.device, dtype=torch.long).contiguous(),
        1.0 / temperature, vocab_start, valid_cols, group, token_chunk, vocab_chunk,
        all_reduce_grad_hidden)
    return logprobs.view(target.shape), entropy.view(target.shape)
