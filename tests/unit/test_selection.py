"""Clip-Cov / KL-Cov selection in one process against brute-force float64 references.
(The multi-rank exactness check is tests/distributed/test_selection_dp.py.)"""
import math
from fractions import Fraction

import pytest
import torch

from megatron_rl.algorithms import (
    AlgorithmConfig,
    TokenStats,
    clip_cov_select,
    covariance_metrics,
    kl_cov_select,
    policy_loss,
    rollout_metrics,
    select_tokens,
    token_covariance,
)
from megatron_rl.algorithms.selection import _selection_count

F64 = dict(dtype=torch.float64)


def batch(seed=0, rows=6, cols=20):
    """Float32 log-probs and GRPO-like per-sequence advantages; padding holds extreme values that
    would win every selection if the mask were ignored."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, cols, generator=g) * 4
    advantages = torch.randn(rows, 1, generator=g).expand(rows, cols).contiguous()
    mask = torch.rand(rows, cols, generator=g) > 0.25
    logprobs[~mask] = -60.0
    advantages[~mask] = 50.0
    return logprobs, advantages, mask


def reference_covariance(logprobs, advantages, mask):
    """Plain Python float64 over the masked tokens in row-major order: (cov list, flat indices)."""
    flat = mask.reshape(-1).tolist()
    index = [i for i, m in enumerate(flat) if m]
    lp = [float(v) for v in logprobs.reshape(-1).tolist()]
    adv = [float(v) for v in advantages.reshape(-1).tolist()]
    mean_lp = math.fsum(lp[i] for i in index) / len(index)
    mean_adv = math.fsum(adv[i] for i in index) / len(index)
    return [(lp[i] - mean_lp) * (adv[i] - mean_adv) for i in index], index


def as_mask(flat_indices, like):
    out = torch.zeros(like.numel(), dtype=torch.bool)
    out[list(flat_indices)] = True
    return out.view(like.shape)


def test_covariance_matches_float64_reference():
    logprobs, advantages, mask = batch()
    cov, num_tokens = token_covariance(logprobs, advantages, mask)
    expected, index = reference_covariance(logprobs, advantages, mask)
    assert num_tokens == len(index)
    torch.testing.assert_close(cov.reshape(-1)[index], torch.tensor(expected, **F64),
                               rtol=1e-14, atol=1e-15)
    assert torch.equal(cov[~mask], torch.zeros(int((~mask).sum()), **F64))


def test_covariance_mean_is_exact():
    # float summation would lose the 1.0 next to 1e16 (and the result depends on the order);
    # the mean must be the exact one, rounded once.
    advantages = torch.tensor([1e16, 1.0, -1e16, 3.0], **F64)
    logprobs = torch.tensor([0.0, 0.0, 0.0, 1.0], **F64)
    cov, _ = token_covariance(logprobs, advantages, torch.ones(4, dtype=torch.bool))
    mean_adv = float(Fraction(1e16) + 1 - Fraction(1e16) + 3) / 4  # = 1.0
    assert cov[3].item() == (1.0 - 0.25) * (3.0 - mean_adv)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_cov_is_the_top_k_by_covariance(seed):
    logprobs, advantages, mask = batch(seed)
    cov, index = reference_covariance(logprobs, advantages, mask)
    count = math.floor(0.05 * len(index))
    assert count > 0
    order = sorted(range(len(index)), key=lambda j: (-cov[j], j))[:count]
    expected = as_mask([index[j] for j in order], mask)
    assert torch.equal(kl_cov_select(logprobs, advantages, mask, ratio=0.05), expected)


def test_kl_cov_ties_go_to_the_lower_index():
    # three identical sequences tie on the top Cov; two are picked: the first two
    logprobs = torch.tensor([[-1.0, -3.0]] * 3 + [[-2.0, -2.0]], **F64)
    advantages = torch.tensor([[1.0, 1.0]] * 3 + [[-3.0, -3.0]], **F64)
    mask = torch.ones(4, 2, dtype=torch.bool)
    cov, _ = token_covariance(logprobs, advantages, mask)
    # means -2 and 0: Cov 1 on the (-1, 1) tokens, -1 on (-3, 1), 0 on (-2, -3)
    assert cov.tolist() == [[1.0, -1.0]] * 3 + [[0.0, 0.0]]
    selected = kl_cov_select(logprobs, advantages, mask, ratio=0.25)  # floor(0.25 * 8) = 2
    assert selected.nonzero().tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_cov_draws_uniformly_among_candidates(seed):
    logprobs, advantages, mask = batch(seed, rows=8, cols=40)
    lb, ub, ratio = 0.2, 2.0, 0.02
    cov, index = reference_covariance(logprobs, advantages, mask)
    candidates = [index[j] for j in range(len(index)) if lb <= cov[j] <= ub]
    count = math.floor(ratio * len(index))
    assert 0 < count < len(candidates)
    # the documented draw: randperm over candidates in global (row-major) order
    drawn = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(7))[:count]
    expected = as_mask([candidates[j] for j in drawn.tolist()], mask)
    selected = clip_cov_select(logprobs, advantages, mask, ratio=ratio, lb=lb, ub=ub, seed=7)
    assert torch.equal(selected, expected)
    other = clip_cov_select(logprobs, advantages, mask, ratio=ratio, lb=lb, ub=ub, seed=8)
    assert not torch.equal(other, selected) and other.sum() == count


def test_clip_cov_takes_every_candidate_when_fewer_than_r_n():
    logprobs, advantages, mask = batch(0)
    cov, index = reference_covariance(logprobs, advantages, mask)
    candidates = [index[j] for j in range(len(index)) if 1.0 <= cov[j] <= 5.0]
    assert 0 < len(candidates) < math.floor(0.5 * len(index))
    selected = clip_cov_select(logprobs, advantages, mask, ratio=0.5, lb=1.0, ub=5.0)
    assert torch.equal(selected, as_mask(candidates, mask))


def test_empty_selections():
    logprobs, advantages, mask = batch(0)
    n = int(mask.sum())
    nothing = torch.zeros_like(mask)
    # r * N < 1 floors to no token
    assert torch.equal(clip_cov_select(logprobs, advantages, mask, ratio=0.99 / n, lb=-1e9,
                                       ub=1e9), nothing)
    assert torch.equal(kl_cov_select(logprobs, advantages, mask, ratio=0.99 / n), nothing)
    assert kl_cov_select(logprobs, advantages, mask, ratio=1.01 / n).sum() == 1
    # no candidate in [omega_low, omega_high]
    assert torch.equal(clip_cov_select(logprobs, advantages, mask, ratio=0.5, lb=1e6, ub=1e7),
                       nothing)
    # no response token at all
    empty = torch.zeros_like(mask)
    assert torch.equal(kl_cov_select(logprobs, advantages, empty, ratio=0.5), nothing)
    assert torch.equal(clip_cov_select(logprobs, advantages, empty, ratio=0.5), nothing)


def test_masked_tokens_are_never_selected():
    logprobs, advantages, mask = batch(3)
    everything = kl_cov_select(logprobs, advantages, mask, ratio=0.999)
    assert not (everything & ~mask).any()
    assert everything.sum() == math.floor(0.999 * int(mask.sum()))
    wide = clip_cov_select(logprobs, advantages, mask, ratio=0.999, lb=-1e9, ub=1e9)
    assert not (wide & ~mask).any()


def test_selection_count_floors_r_as_written():
    assert _selection_count(2e-4, 5000) == 1
    assert _selection_count(2e-4, 4999) == 0
    assert math.floor(0.29 * 100) == 28  # binary 0.29 is below 0.29 ...
    assert _selection_count(0.29, 100) == 29  # ... the count uses r as written


def test_select_tokens_uses_the_configured_policy_and_skips_ppo_clipped_tokens():
    logprobs, advantages, mask = batch(1, rows=8, cols=40)
    old = logprobs - 0.05
    config = dict(r=0.5, omega_low=0.2, omega_high=2.0, eps_low=0.2, eps_high=0.2)
    # tokens whose ratio is pushed out of [0.8, 1.2] in the direction PPO clips
    current = logprobs.clone()
    current[:, ::3] = old[:, ::3] + torch.where(advantages[:, ::3] > 0, 0.5, -0.5)
    clipped = (current - old).abs() > 0.4

    rollout = select_tokens(AlgorithmConfig(loss_mode="clip_cov", cov_policy="rollout", **config),
                            current, old, advantages, mask, seed=0)
    assert torch.equal(rollout, clip_cov_select(old, advantages, mask, 0.5, 0.2, 2.0, seed=0))

    cfg = AlgorithmConfig(loss_mode="clip_cov", cov_policy="current", **config)
    selected = select_tokens(cfg, current, old, advantages, mask, seed=0)
    expected = clip_cov_select(current, advantages, mask, 0.5, 0.2, 2.0, seed=0, exclude=clipped)
    assert torch.equal(selected, expected)
    assert not (selected & clipped).any()
    cov, _ = token_covariance(current, advantages, mask)
    assert ((cov >= 0.2) & (cov <= 2.0) & clipped & mask).any()  # the exclusion mattered

    kl = select_tokens(AlgorithmConfig(loss_mode="kl_cov", k=0.1), current, old, advantages,
                       mask, seed=0)
    assert torch.equal(kl, kl_cov_select(current, advantages, mask, 0.1))
    assert select_tokens(AlgorithmConfig(loss_mode="ppo_clip"), current, old, advantages, mask,
                         seed=0) is None
    with pytest.raises(ValueError, match="current_logprobs"):
        select_tokens(cfg, None, old, advantages, mask, seed=0)


def test_selected_tokens_get_the_intended_gradient():
    logprobs, advantages, mask = batch(2)
    logprobs = logprobs.to(torch.float64)
    advantages = advantages.to(torch.float64)
    old = logprobs - 0.01
    num_tokens = int(mask.sum())

    config = AlgorithmConfig(loss_mode="clip_cov", r=0.2, omega_low=-1e9, omega_high=1e9)
    selected = select_tokens(config, logprobs, old, advantages, mask, seed=0)
    assert selected.sum() == math.floor(0.2 * num_tokens)
    current = logprobs.clone().requires_grad_()
    policy_loss(current, old, advantages, mask, config, selected=selected)[0].backward()
    assert torch.equal(current.grad[selected], torch.zeros(int(selected.sum()), **F64))
    ratio = torch.exp(logprobs - old)  # inside [0.8, 1.2]: PPO's clip is inactive
    rest = mask & ~selected
    torch.testing.assert_close(current.grad[rest], (-advantages * ratio)[rest] / num_tokens)

    config = AlgorithmConfig(loss_mode="kl_cov", k=0.2, beta=0.5)
    selected = select_tokens(config, logprobs, old, advantages, mask, seed=0)
    current = logprobs.clone().requires_grad_()
    policy_loss(current, old, advantages, mask, config, selected=selected)[0].backward()
    # d/dlogprob (beta * |logprob - old|) = beta * sign(0.01) on the selected tokens
    expected = (-advantages * ratio + 0.5 * selected) / num_tokens
    torch.testing.assert_close(current.grad[mask], expected[mask])


def test_step_metrics():
    logprobs, advantages, mask = batch(0)
    selected = kl_cov_select(logprobs, advantages, mask, ratio=0.1)
    cov, _ = token_covariance(logprobs, advantages, mask)
    metrics = covariance_metrics(logprobs, advantages, mask, selected)
    assert metrics["cov_mean"] == pytest.approx(cov[mask].mean().item(), abs=1e-12)
    assert metrics["cov_selected_mean"] == pytest.approx(cov[selected].mean().item(), abs=1e-12)
    assert metrics["cov_selected_mean"] > metrics["cov_mean"]

    # two micro-batches of 2 tokens, A = 1; ratio 3 on one token (clipped high)
    stats = TokenStats()
    old, ones, mask = torch.zeros(1, 2, **F64), torch.ones(1, 2, **F64), torch.ones(1, 2) > 0
    config = AlgorithmConfig(loss_mode="ppo_clip")
    for ratio, entropy in ((3.0, 1.0), (1.0, 3.0)):
        logprob = torch.log(torch.tensor([[ratio, 1.0]], **F64))
        _, s = policy_loss(logprob, old, ones, mask, config, entropy=entropy * ones)
        stats.add(s)
    means = stats.reduce()
    assert means["num_tokens"] == 4
    assert means["pg_clipfrac_high"] == 0.25
    assert means["entropy"] == 2.0
    assert means["ppo_kl"] == pytest.approx(-math.log(3.0) / 4)

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    token_adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    token_mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    metrics = rollout_metrics(rewards, token_adv, token_mask, n=2)
    assert metrics["reward_mean"] == 0.75
    assert metrics["equal_reward_group_frac"] == 0.5
    assert metrics["advantage_mean"] == pytest.approx(1 / 6)
    assert metrics["response_length_mean"] == 1.5
