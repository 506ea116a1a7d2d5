"""Per-step algorithm metrics: loss statistics over micro-batches and DP ranks, covariance of all
and of the selected tokens, reward and advantage statistics of the rollout batch."""
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_rl.algorithms.advantages import informative_groups
from megatron_rl.algorithms.selection import token_covariance


class TokenStats:
    """Sums losses.policy_loss stats over a step's micro-batches; reduce() adds them over the DP
    group and divides by the token count, giving token means over the whole mini-batch(es):
    entropy, ppo_kl, pg_clipfrac_low/high, dual_clipfrac, clip_cov_frac, kl_cov_frac, kl_ref."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, stats: Dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            value = value.detach().to(torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def reduce(self, group=None) -> Dict[str, float]:
        """Token means; every rank of `group` must call it with the same stat names."""
        names = sorted(self.sums)
        totals = torch.stack([self.sums[name] for name in names])
        if group is not None:
            dist.all_reduce(totals, group=group)
        by_name = dict(zip(names, totals.tolist()))
        num_tokens = by_name.pop("num_tokens")
        means = {name: value / max(num_tokens, 1.0) for name, value in by_name.items()}
        means["num_tokens"] = num_tokens
        return means


def covariance_metrics(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       selected: Optional[torch.Tensor] = None, group=None) -> Dict[str, float]:
    """Mean Cov(y_i) over all response tokens of the mini-batch and over the selected ones
    (the paper reports 0.003 for all tokens and 3.1 / 5.7 for its top 0.2% / 0.02%)."""
    mask = mask.bool()
    cov, num_tokens = token_covariance(logprobs, advantages, mask, group)
    chosen = mask if selected is None else mask & selected.bool()
    local = torch.stack([cov.sum(), (cov * chosen).sum(), chosen.sum().to(torch.float64)])
    if group is not None:
        dist.all_reduce(local, group=group)
    cov_sum, selected_sum, num_selected = local.tolist()
    out = {"cov_mean": cov_sum / max(num_tokens, 1)}
    if selected is not None:
        out["cov_selected_mean"] = selected_sum / num_selected if num_selected else 0.0
        out["selected_tokens"] = num_selected
    return out


def rollout_metrics(rewards: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    n: int) -> Dict[str, float]:
    """Reward, advantage and response-length statistics of a rollout batch (rewards [B],
    token advantages and mask [B, T], contiguous groups of n), and the fraction of prompts whose
    n rewards are all equal (those filter_equal_groups drops)."""
    mask = mask.bool()
    rewards64 = rewards.to(torch.float64)
    token_advantages = advantages[mask].to(torch.float64)
    lengths = mask.sum(-1).to(torch.float64)
    equal_groups = ~informative_groups(rewards, n).view(-1, n)[:, 0]
    return {
        "reward_mean": rewards64.mean().item(),
        "reward_std": rewards64.std().item() if rewards.numel() > 1 else 0.0,
        "reward_min": rewards64.min().item(),
        "reward_max": rewards64.max().item(),
        "equal_reward_group_frac": equal_groups.to(torch.float64).mean().item(),
        "advantage_mean": token_advantages.mean().item(),
        "advantage_std": token_advantages.std().item() if token_advantages.numel() > 1 else 0.0,
        "advantage_min": token_advantages.min().item(),
        "advantage_max": token_advantages.max().item(),
        "response_length_mean": lengths.mean().item(),
        "response_length_max": lengths.max().item(),
    }
