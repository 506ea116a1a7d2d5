"""Token-level policy losses: vanilla PG, PPO clip (clip-higher, dual clip), Clip-Cov, KL-Cov,
plus the entropy bonus and a KL penalty to a reference policy.

Pure functions over token tensors [B, T] (B sequences, T tokens; `mask` marks response tokens).
They know nothing about the model or its parallel layout.

Exactness across micro-batches and data-parallel ranks: the optimizer mini-batch is split over
DP ranks and micro-batches, and each call sees one piece. Every aggregation divides a *sum over
this piece* by a *global* normaliser passed in by the caller (`num_global_tokens`: masked tokens
of the whole mini-batch over all DP ranks; `num_global_sequences`: its sequences with at least
one response token). The sum of the returned losses over all micro-batches and DP ranks is then
the mini-batch loss, whatever the split, and each token's gradient is the same. (If the caller's
DDP averages gradients over DP ranks and its schedule divides by the number of micro-batches,
multiply the loss by dp_size * num_micro_batches to undo both.) The Clip-Cov / KL-Cov selection
mask must likewise be computed once for the whole mini-batch (selection.select_tokens) before the
micro-batch loop and sliced per micro-batch.
"""
from typing import Dict, Optional, Tuple, Union

import torch

from megatron_rl.algorithms.config import AlgorithmConfig

# exp() of a log-ratio beyond this overflows float32 or gives meaningless ratios; PPO's clip makes
# the surrogate flat there anyway.
MAX_LOG_RATIO = 20.0

Count = Union[int, float, torch.Tensor, None]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
              num_global_tokens: Count = None, num_global_sequences: Count = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to this piece's share of the mini-batch scalar.

    token-mean:          sum_{i,t} x * m / num_global_tokens
    seq-mean-token-mean: sum_i (sum_t x * m / sum_t m) / num_global_sequences
    seq-mean-token-sum:  sum_{i,t} x * m / num_global_sequences
    The normalisers default to this piece's own counts (right only for a single, whole
    mini-batch); pass the mini-batch totals when it is split over micro-batches or DP ranks.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "token-mean":
        denominator = mask.sum() if num_global_tokens is None else num_global_tokens
        return masked.sum() / denominator
    if per_token.dim() < 2:
        raise ValueError(f"aggregation {mode!r} needs [sequences, tokens] tensors, "
                         f"got shape {tuple(per_token.shape)}")
    tokens_per_sequence = mask.sum(-1)
    if num_global_sequences is None:
        num_global_sequences = (tokens_per_sequence > 0).sum()
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / tokens_per_sequence.clamp(min=1)).sum() / num_global_sequences
    if mode == "seq-mean-token-sum":
        return masked.sum() / num_global_sequences
    raise ValueError(f"unknown aggregation {mode!r}")


def ppo_clip_active(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(low, high) bool masks of tokens whose PPO-clipped branch is active (zero gradient):
    low: A < 0 and ratio < 1 - eps_low; high: A > 0 and ratio > 1 + eps_high."""
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return (advantages < 0) & (ratio < 1 - eps_low), (advantages > 0) & (ratio > 1 + eps_high)


def reference_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    With d = log pi_ref - log pi: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, >= 0).
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, config: AlgorithmConfig, *,
                selected: Optional[torch.Tensor] = None,
                entropy: Optional[torch.Tensor] = None,
                ref_logprobs: Optional[torch.Tensor] = None,
                rollout_logprobs: Optional[torch.Tensor] = None,
                num_global_tokens: Count = None,
                num_global_sequences: Count = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """This piece's share of the policy loss, and its metric token sums.

    Per token, with ratio = pi / pi_old and A the advantage (loss = minus the objective):
      vanilla:  -A * ratio                       (on-policy gradient = REINFORCE's)
      ppo_clip: max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)); with dual_clip_c,
                min(that, -A * c) where A < 0
      clip_cov: ppo_clip, and 0 (no gradient) on the `selected` tokens
      kl_cov:   -A * ratio, plus beta * |log pi - log pi_old| on the `selected` tokens; no clip
    then aggregated with config.aggregation over the global normalisers (module docstring).
    With rollout_is_cap = C, each token's term above is first weighted by the detached
    min(pi_old / pi_rollout, C) (truncated importance sampling; `rollout_logprobs` required).
    Adds -entropy_coef * agg(entropy) and kl_ref_coef * agg(KL(pi || pi_ref)) when set.

    `selected`: bool [B, T] from selection.select_tokens over the whole mini-batch, sliced to this
    piece; required by clip_cov and kl_cov. Returns (loss, stats) where stats are detached
    float64 sums over this piece's masked tokens, reduced to per-token means by
    metrics.TokenStats: num_tokens, ppo_kl (approx KL(pi_old || pi)), and per mode
    pg_clipfrac_low/high, dual_clipfrac, clip_cov_frac, kl_cov_frac, entropy, kl_ref.
    """
    mode = config.loss_mode
    mask = mask.bool()
    if mode in ("clip_cov", "kl_cov") and selected is None:
        raise ValueError(f"loss_mode={mode} needs the `selected` token mask "
                         f"(selection.select_tokens over the whole mini-batch)")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    per_token = -advantages * ratio
    stats = {}

    def token_sum(values):
        return (values.detach().to(torch.float64) * mask).sum()

    if mode in ("ppo_clip", "clip_cov"):
        clipped = -advantages * ratio.clamp(1 - config.eps_low, 1 + config.eps_high)
        per_token = torch.maximum(per_token, clipped)
        clip_low, clip_high = ppo_clip_active(log_ratio, advantages, config.eps_low,
                                              config.eps_high)
        stats["pg_clipfrac_low"] = token_sum(clip_low)
        stats["pg_clipfrac_high"] = token_sum(clip_high)
        if config.dual_clip_c is not None:
            dual_bound = -advantages * config.dual_clip_c
            dual_active = (advantages < 0) & (per_token > dual_bound)
            per_token = torch.where(dual_active, dual_bound, per_token)
            stats["dual_clipfrac"] = token_sum(dual_active)
    elif mode not in ("vanilla", "kl_cov"):
        raise ValueError(f"unknown loss_mode {mode!r}")

    if mode == "clip_cov":
        # A selected token contributes neither loss nor gradient but still counts in the
        # token-mean denominator, as in the paper's code.
        per_token = torch.where(selected, torch.zeros_like(per_token), per_token)
        stats["clip_cov_frac"] = token_sum(selected)
    elif mode == "kl_cov":
        penalty = config.beta * log_ratio.abs()
        per_token = per_token + torch.where(selected, penalty, torch.zeros_like(penalty))
        stats["kl_cov_frac"] = token_sum(selected)

    if config.rollout_is_cap is not None:
        if rollout_logprobs is None:
            raise ValueError("rollout_is_cap is set: pass the engine's `rollout_logprobs`")
        weight = torch.exp((old_logprobs - rollout_logprobs).clamp(max=MAX_LOG_RATIO))
        weight = weight.clamp(max=config.rollout_is_cap).detach()
        per_token = per_token * weight
        stats["rollout_is_weight"] = token_sum(weight)

    def agg(values):
        return aggregate(values, mask, config.aggregation, num_global_tokens,
                         num_global_sequences)

    loss = agg(per_token)
    if config.entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef is set: pass the per-token `entropy`")
        loss = loss - config.entropy_coef * agg(entropy)
    if entropy is not None:
        stats["entropy"] = token_sum(entropy)
    if config.kl_ref_coef:
        if ref_logprobs is None:
            raise ValueError("kl_ref_coef is set: pass `ref_logprobs` of the reference policy")
        kl = reference_kl(logprobs, ref_logprobs, config.kl_ref_estimator)
        loss = loss + config.kl_ref_coef * agg(kl)
        stats["kl_ref"] = token_sum(kl)
    stats["ppo_kl"] = token_sum(-log_ratio)
    stats["num_tokens"] = mask.sum().to(torch.float64)
    return loss, stats
