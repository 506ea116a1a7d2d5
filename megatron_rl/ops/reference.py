"""Pure-PyTorch reference of the vocab-parallel ops.

Two kinds of functions live here:
- the phase ops with the signatures of the extension's torch.ops.megatron_rl.* (used instead
  of them, with a one-line warning, when megatron_rl._C is missing or was built without the
  logits' device), chunked over tokens so they too stay within O(tokens) + one chunk of memory;
- dense references on gathered (full-vocabulary) logits, exact in float64 and differentiable by
  autograd, that the tests and the benchmark compare against.
"""
import torch

# Logits elements per chunk of the phase ops: bounds their temporaries at a few x 64 MiB in fp32.
_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(logits):
    rows, cols = logits.shape
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _valid_z(logits, start, end, inv_temperature, valid_cols):
    return logits[start:end, :valid_cols].to(_acc_dtype(logits)) * inv_temperature


def logprob_stats(logits, target, inv_temperature, vocab_start, valid_cols):
    """[4, tokens]: max z, sum exp(z - max), sum exp(z - max)(z - max), z[target] over this
    block."""
    rows = logits.shape[0]
    stats = torch.zeros(4, rows, dtype=_acc_dtype(logits), device=logits.device)
    stats[0] = float("-inf")
    if valid_cols == 0:
        return stats
    for start, end in _row_chunks(logits):
        z = _valid_z(logits, start, end, inv_temperature, valid_cols)
        row_max = z.amax(dim=-1)
        # Rows with no finite logit keep max = -inf and zero sums instead of (-inf) - (-inf).
        shifted = z - torch.where(torch.isfinite(row_max), row_max, 0.0).unsqueeze(-1)
        e = shifted.exp()
        stats[0, start:end] = row_max
        stats[1, start:end] = e.sum(-1)
        stats[2, start:end] = torch.where(e > 0, e * shifted, 0.0).sum(-1)
        if target is not None:
            col = target[start:end] - vocab_start
            here = (col >= 0) & (col < valid_cols)
            picked = z.gather(1, torch.where(here, col, 0).unsqueeze(-1)).squeeze(-1)
            stats[3, start:end] = torch.where(here, picked, 0.0)
    return stats


def _logprob_entropy_backward_into(grad, logits, target, lse, entropy, grad_logprob, grad_entropy,
                                   inv_temperature, vocab_start, valid_cols):
    """Writes the gradient into grad (may be logits: each row chunk is read before it is
    overwritten)."""
    grad[:, valid_cols:] = 0
    if valid_cols == 0:
        return
    for start, end in _row_chunks(logits):
        lp = _valid_z(logits, start, end, inv_temperature, valid_cols) - lse[start:end, None]
        p = lp.exp()
        g_lp = grad_logprob[start:end, None]
        g_h = grad_entropy[start:end, None]
        g = -g_lp * p - g_h * torch.where(p > 0, p * (lp + entropy[start:end, None]), 0.0)
        col = target[start:end] - vocab_start
        here = (col >= 0) & (col < valid_cols)
        g.scatter_add_(1, torch.where(here, col, 0).unsqueeze(-1),
                       torch.where(here, grad_logprob[start:end], 0.0).unsqueeze(-1))
        grad[start:end, :valid_cols] = (g * inv_temperature).to(logits.dtype)


def logprob_entropy_backward(logits, *args):
    """Gradient of sum(grad_logprob * logprob + grad_entropy * entropy) w.r.t. this logits block."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _logprob_entropy_backward_into(grad, logits, *args)
    return grad


def logprob_entropy_backward_(logits, *args):
    """logprob_entropy_backward written over the logits."""
    _logprob_entropy_backward_into(logits, logits, *args)


def covariance_partials(logits, delta, lse, entropy, inv_temperature, valid_cols):
    """[2, tokens]: this block's sum of p (log p + H) delta and of p delta."""
    partials = torch.zeros(2, logits.shape[0], dtype=_acc_dtype(logits), device=logits.device)
    if valid_cols == 0:
        return partials
    for start, end in _row_chunks(logits):
        lp = _valid_z(logits, start, end, inv_temperature, valid_cols) - lse[start:end, None]
        p = lp.exp()
        d = delta[start:end, :valid_cols].to(lp.dtype)
        partials[0, start:end] = torch.where(p > 0, p * (lp + entropy[start:end, None]) * d,
                                             0.0).sum(-1)
        partials[1, start:end] = torch.where(p > 0, p * d, 0.0).sum(-1)
    return partials


def _dense_log_softmax(logits, temperature, vocab_size):
    z = logits[..., : logits.shape[-1] if vocab_size is None else vocab_size] / temperature
    return torch.log_softmax(z, dim=-1)


def dense_logprobs_entropy(logits, target, temperature=1.0, vocab_size=None):
    """log p(target) and entropy from full-vocabulary logits [..., V] by plain autograd ops.

    Columns >= vocab_size (vocabulary padding) are ignored. Entries with p = 0 (-inf logits)
    contribute 0 to the entropy and to its gradient.
    """
    logp = _dense_log_softmax(logits, temperature, vocab_size)
    logprobs = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    finite_logp = torch.where(torch.isfinite(logp), logp, 0.0)
    entropy = -(logp.exp() * finite_logp).sum(-1)
    return logprobs, entropy


def dense_covariance(logits, delta, temperature=1.0, vocab_size=None):
    """Cov_{a~p}(log p(a), delta(a)) and E_{a~p}[delta(a)] from full-vocabulary logits [..., V]."""
    logp = _dense_log_softmax(logits, temperature, vocab_size)
    p = logp.exp()
    d = delta[..., : logp.shape[-1]].to(logp.dtype)
    mean_delta = (p * d).sum(-1)
    mean_logp = torch.where(p > 0, p * logp, 0.0).sum(-1)
    centered = torch.where(p > 0,
                           p * (logp - mean_logp.unsqueeze(-1)) * (d - mean_delta.unsqueeze(-1)),
                           0.0)
    return centered.sum(-1), mean_delta
