"""Advantage estimators over a rollout batch.

Outcome rewards are one scalar per response, `rewards` [B]. A batch holds its prompt groups
contiguously, n responses per prompt: rows [g*n, (g+1)*n) answer prompt g. Token tensors are
[B, T] with `mask` marking response tokens; returned token advantages are zero outside the mask.
"""
from typing import List, Tuple

import torch


def _grouped(rewards: torch.Tensor, n: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % n:
        raise ValueError(f"rewards must be 1-D with a multiple of n={n} entries (contiguous "
                         f"groups of n responses per prompt), got shape {tuple(rewards.shape)}")
    return rewards.view(-1, n)


def informative_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [B]: True for responses whose group's rewards are not all equal.

    An all-right or all-wrong group has zero group-relative advantage for every response, so it
    carries no learning signal but still dilutes token-mean losses; the paper filters them.
    """
    groups = _grouped(rewards, n)
    varied = (groups != groups[:, :1]).any(dim=1)
    return varied.repeat_interleave(n)


def keep_groups(rewards: torch.Tensor, n: int, count: int) -> List[int]:
    """Dynamic sampling's choice (filter_equal_groups: resample): which `count` of the drawn
    groups (rewards [G * n], groups in the order they were drawn) a step trains on, in draw
    order: the first `count` informative groups, topped up, when fewer were drawn, with the
    first uninformative ones (whose loss the mask of informative_groups removes)."""
    varied = informative_groups(rewards, n).view(-1, n)[:, 0].tolist()
    if len(varied) < count:
        raise ValueError(f"{count} groups wanted, {len(varied)} drawn")
    first = [g for g, v in enumerate(varied) if v] + [g for g, v in enumerate(varied) if not v]
    return sorted(first[:count])


def grpo_advantages(rewards: torch.Tensor, n: int, norm_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_group) / (std_group + eps), per response [B].

    std is the unbiased (n - 1) group standard deviation, as in the GRPO paper's code and verl.
    norm_by_std=False gives Dr.GRPO's centred advantage R_i - mean_group (Dr.GRPO also drops the
    per-response length normalisation: use aggregation="seq-mean-token-sum" for that).
    """
    if n < 2:
        raise ValueError(f"GRPO needs n >= 2 responses per prompt, got n={n}")
    groups = _grouped(rewards, n)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO: A_i = R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean_group), per response [B]."""
    if n < 2:
        raise ValueError(f"RLOO needs n >= 2 responses per prompt, got n={n}")
    groups = _grouped(rewards, n)
    leave_one_out_mean = (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)
    return (groups - leave_one_out_mean).reshape(-1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var); zero outside."""
    mask = mask.bool()
    count = int(mask.sum())
    if count < 2:
        raise ValueError(f"whitening needs at least 2 masked tokens, got {count}")
    selected = values[mask]
    mean = selected.mean()
    var = ((selected - mean) ** 2).sum() / (count - 1)
    return torch.where(mask, (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: the discounted return of the outcome reward, whitened over the batch's tokens.

    The reward sits on each response's last masked token, so the return at token t is
    gamma ** (number of response tokens after t) * R. Returns token advantages [B, T].
    """
    mask = mask.bool()
    tokens_after = mask.flip(-1).cumsum(-1).flip(-1) - 1
    returns = rewards.to(torch.float64)[:, None] * gamma ** tokens_after.to(torch.float64)
    return masked_whiten(returns, mask).to(rewards.dtype)


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float = 1.0, lam: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t'} - V_t and A_t = delta_t + gamma * lam * A_{t'}, where t' is the
    next *masked* token (positions outside the mask, e.g. tool output, are skipped, not treated as
    episode ends); V and A after the last response token are 0. Not whitened: apply
    masked_whiten if the recipe wants it.
    """
    mask = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        on = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(on, advantage, torch.zeros_like(advantage))
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def compute_advantages(config, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token advantages [B, T] from outcome rewards [B] for config.advantage_estimator.

    GAE needs a critic's values: call gae_advantages directly.
    """
    estimator = config.advantage_estimator
    if estimator == "grpo":
        per_response = grpo_advantages(rewards, config.n, config.norm_by_std)
    elif estimator == "rloo":
        per_response = rloo_advantages(rewards, config.n)
    elif estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, config.gamma)
    else:
        raise ValueError(f"advantage_estimator={estimator!r} needs values: use gae_advantages")
    return per_response[:, None] * mask.to(per_response.dtype)
