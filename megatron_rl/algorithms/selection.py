"""Clip-Cov / KL-Cov token selection over the whole optimizer mini-batch, across DP ranks.

Cov(y_i) = (log pi(y_i) - mean_j log pi(y_j)) * (A(y_i) - mean_j A(y_j)), the means over the N
response tokens of the whole mini-batch. Public code computes this per micro-batch per GPU, so
the selected tokens change with the micro-batch size and the DP size; here they do not.

Each rank passes its own tokens of the mini-batch (any shape, `mask` marking response tokens);
`group` is the data-parallel process group, None for a single process. The global token order is
the ranks' tokens concatenated in rank order, each flattened row-major; padding positions take
no part, so ranks may pad differently. For a fixed seed the concatenation of every rank's result
equals the single-process result on the concatenated tokens, bit for bit:

- the means are exact: each rank sums its values as integers (per binary exponent, see
  _exact_sum_buckets), the integers are all-reduced (associative, unlike float sums) and the mean
  is rounded once, so every token's Cov is the same float64 number in every layout;
- Clip-Cov draws floor(r * N) of the C global candidates {omega_low <= Cov <= omega_high} with
  torch.randperm(C, generator seeded with `seed`) on every rank, indices in global candidate
  order; each rank keeps those in its own range (communication: one count per rank);
- KL-Cov ranks by (Cov descending, global index ascending); each rank sends its local top
  floor(k * N) (value, index) pairs, every rank picks the same global top from the gathered
  pairs (communication: O(k * N * dp), not O(N)).

floor, not max(1, .): when r * N < 1 (or k * N < 1) nothing is selected, as in the paper's
formula; the public code's max(1, .) would pick one token of every micro-batch, i.e. a ratio
that depends on the micro-batch size.
"""
from fractions import Fraction
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.algorithms.losses import ppo_clip_active

# A float64 x is m * 2**e with |m| < 2**53 and e in [-1126, 971]; m is split into a high and a
# low part of < 2**27 each, at exponents e + 26 and e, so one bucket per exponent in
# [-1126, 997] sums up to 2**35 values in int64 without overflow.
_MANTISSA_BITS = 53
_LOW_BITS = 26
_BUCKET_OFFSET = 1126
_NUM_BUCKETS = _BUCKET_OFFSET + 997 + 1


def _exact_sum_buckets(values: torch.Tensor) -> torch.Tensor:
    """int64 [_NUM_BUCKETS] b with sum_i b[i] * 2**(i - _BUCKET_OFFSET) == sum(values) exactly."""
    x = values.detach().reshape(-1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("log-probs and advantages of response tokens must be finite")
    mantissa, exponent = torch.frexp(x)
    m = (mantissa * 2.0 ** _MANTISSA_BITS).to(torch.int64)  # exact: |mantissa| < 1
    e = exponent.to(torch.int64) - _MANTISSA_BITS + _BUCKET_OFFSET
    high = m >> _LOW_BITS  # floor division, so low = m - high * 2**26 is in [0, 2**26)
    low = m - (high << _LOW_BITS)
    buckets = torch.zeros(_NUM_BUCKETS, dtype=torch.int64, device=x.device)
    buckets.index_add_(0, e, low)
    buckets.index_add_(0, e + _LOW_BITS, high)
    return buckets


def _bucket_sum(buckets: List[int]) -> Fraction:
    scaled = sum(count << i for i, count in enumerate(buckets) if count)
    return Fraction(scaled, 1 << _BUCKET_OFFSET)


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group) -> List[torch.Tensor]:
    if group is None:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return gathered


def _my_offset(local_count: int, group, device) -> Tuple[int, int]:
    """(sum of the counts of the lower ranks, sum over all ranks) of an int per rank."""
    counts = _all_gather(torch.tensor([local_count], dtype=torch.int64, device=device), group)
    counts = [int(c) for c in counts]
    rank = 0 if group is None else dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def _selection_count(ratio: float, num_tokens: int) -> int:
    # floor(r * N) with r as written (2e-4, not its binary approximation), so r * N that is an
    # integer on paper is not floored one below by rounding.
    return int(Fraction(repr(ratio)) * num_tokens)


def _top_positions(values: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of the `count` largest values, ties going to the earlier position.
    topk plus a threshold instead of a full sort of all the tokens."""
    if count >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    threshold = torch.topk(values, count, sorted=False).values.min()
    above = values > threshold
    at_threshold = values == threshold
    tied_needed = count - int(above.sum())
    keep = above | (at_threshold & (at_threshold.cumsum(0) <= tied_needed))
    return keep.nonzero().squeeze(1)


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     group=None) -> Tuple[torch.Tensor, int]:
    """(Cov float64 of logprobs' shape, 0 outside the mask; N = global masked-token count).

    The means are over the masked tokens of all ranks in `group`, computed exactly (module
    docstring), so Cov does not depend on how the tokens are split.
    """
    mask = mask.bool()
    logprobs64 = logprobs.detach().to(torch.float64)
    advantages64 = advantages.detach().to(torch.float64)
    local = torch.cat([
        _exact_sum_buckets(logprobs64[mask]),
        _exact_sum_buckets(advantages64[mask]),
        mask.sum().reshape(1).to(torch.int64),
    ])
    totals = _all_reduce_sum(local, group).tolist()
    num_tokens = totals[-1]
    if num_tokens == 0:
        return torch.zeros_like(logprobs64), 0
    mean_logprob = float(_bucket_sum(totals[:_NUM_BUCKETS]) / num_tokens)
    mean_advantage = float(_bucket_sum(totals[_NUM_BUCKETS:-1]) / num_tokens)
    cov = (logprobs64 - mean_logprob) * (advantages64 - mean_advantage)
    return torch.where(mask, cov, torch.zeros_like(cov)), num_tokens


def clip_cov_select(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0, seed: int = 0,
                    group=None, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Clip-Cov's I_clip: floor(ratio * N) tokens drawn uniformly from the response tokens with
    lb <= Cov <= ub (omega_low, omega_high). Returns bool of mask's shape, this rank's tokens.

    `exclude` (bool, optional) removes tokens from the candidates but not from N or the means:
    select_tokens passes the tokens already cut by PPO's clip, as the paper's code does, so the
    budget is not spent on tokens that have no gradient anyway. When there are at most
    floor(ratio * N) candidates, all of them are selected.
    """
    mask = mask.bool()
    cov, num_tokens = token_covariance(logprobs, advantages, mask, group)
    candidates = mask & (cov >= lb) & (cov <= ub)
    if exclude is not None:
        candidates &= ~exclude.bool()
    positions = candidates.reshape(-1).nonzero().squeeze(1)
    offset, num_candidates = _my_offset(positions.numel(), group, positions.device)
    num_select = min(_selection_count(ratio, num_tokens), num_candidates)
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if num_select > 0:
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.randperm(num_candidates, generator=generator)[:num_select]
        mine = drawn[(drawn >= offset) & (drawn < offset + positions.numel())] - offset
        selected[positions[mine.to(positions.device)]] = True
    return selected.view(mask.shape)


def kl_cov_select(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  ratio: float = 2e-3, group=None) -> torch.Tensor:
    """KL-Cov's I_KL: the top floor(ratio * N) response tokens by Cov (k), ties to the lower
    global index. Returns bool of mask's shape marking this rank's selected tokens."""
    mask = mask.bool()
    cov, num_tokens = token_covariance(logprobs, advantages, mask, group)
    positions = mask.reshape(-1).nonzero().squeeze(1)
    offset, _ = _my_offset(positions.numel(), group, positions.device)
    num_select = _selection_count(ratio, num_tokens)
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if num_select == 0:
        return selected.view(mask.shape)
    local_cov = cov.reshape(-1)[positions]
    local_top = _top_positions(local_cov, num_select)
    # (Cov, global index) rows in ascending index order, padded to num_select rows per rank with
    # (-inf, -inf): the ranks together hold >= num_select real rows (N >= num_select), so padding
    # is never picked, and gathered in rank order the real rows stay in ascending global index
    # order, which _top_positions' tie-break needs. Indices up to 2**53 are exact in float64.
    rows = torch.full((num_select, 2), -float("inf"), dtype=torch.float64, device=cov.device)
    rows[:local_top.numel(), 0] = local_cov[local_top]
    rows[:local_top.numel(), 1] = (local_top + offset).to(torch.float64)
    rows = torch.cat(_all_gather(rows, group))
    winners = rows[_top_positions(rows[:, 0], num_select), 1].to(torch.int64)
    mine = winners[(winners >= offset) & (winners < offset + positions.numel())] - offset
    selected[positions[mine]] = True
    return selected.view(mask.shape)


def select_tokens(config: AlgorithmConfig, current_logprobs: Optional[torch.Tensor],
                  old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  seed: int, group=None) -> Optional[torch.Tensor]:
    """The Clip-Cov / KL-Cov selection for this rank's share of one optimizer mini-batch, or None
    when config.loss_mode selects nothing. Call it once per mini-batch, before the micro-batch
    loop, on all of this rank's mini-batch tokens; slice the result per micro-batch.

    The covariance uses `current_logprobs` (a no-grad forward of the policy being trained over
    the mini-batch) when config.cov_policy == "current", and `old_logprobs` when "rollout".
    `seed` should differ per step and mini-batch (e.g. mixing config.seed, step and mini-batch
    index) and be the same on every rank.
    """
    if config.loss_mode not in ("clip_cov", "kl_cov"):
        return None
    if config.cov_policy == "rollout":
        cov_logprobs = old_logprobs
    elif current_logprobs is None:
        raise ValueError("cov_policy=current needs current_logprobs: run a no-grad forward over "
                         "the mini-batch, or set cov_policy=rollout")
    else:
        cov_logprobs = current_logprobs
    if config.loss_mode == "kl_cov":
        return kl_cov_select(cov_logprobs, advantages, mask, config.k, group)
    clip_low, clip_high = ppo_clip_active(cov_logprobs - old_logprobs, advantages,
                                          config.eps_low, config.eps_high)
    return clip_cov_select(cov_logprobs, advantages, mask, config.r, config.omega_low,
                           config.omega_high, seed, group, exclude=clip_low | clip_high)
