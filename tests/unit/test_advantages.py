"""Advantage estimators against hand-computed values."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.algorithms import (
    AlgorithmConfig,
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    informative_groups,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = dict(dtype=torch.float64)


def test_grpo_normalises_by_unbiased_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], **F64)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1: all equal -> 0
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0], **F64)
    torch.testing.assert_close(grpo_advantages(rewards, 4), expected, rtol=1e-12, atol=1e-12)


def test_dr_grpo_only_centres():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0], **F64)
    expected = torch.tensor([1.0, -1.0, 0.0, -2.0, -2.0, 4.0], **F64)
    torch.testing.assert_close(grpo_advantages(rewards, 3, norm_by_std=False), expected)


def test_rloo_leave_one_out_baseline():
    # A_i = R_i - mean of the group's other n - 1 rewards
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 0.0, 6.0], **F64)
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -4 / 3, 4 / 3, -4.0, 4.0], **F64)
    torch.testing.assert_close(rloo_advantages(rewards, 4), expected)


def test_informative_groups_marks_groups_with_different_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    expected = torch.tensor([False] * 6 + [True] * 3)
    assert torch.equal(informative_groups(rewards, 3), expected)


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of n=4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="n >= 2"):
        rloo_advantages(torch.zeros(3), 1)


def test_reinforce_pp_whitens_returns_over_tokens():
    rewards = torch.tensor([1.0, 0.0], **F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # gamma 1: token returns [1, 1] and [0, 0, 0]; mean 0.4, unbiased var 1.2 / 4 = 0.3
    hi, lo = 0.6 / math.sqrt(0.3 + 1e-8), -0.4 / math.sqrt(0.3 + 1e-8)
    expected = torch.tensor([[hi, hi, 0.0], [lo, lo, lo]], **F64)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask), expected)
    # gamma 0.5: returns [0.5, 1] and [0, 0, 0]; mean 0.3, var (0.04 + 0.49 + 0.27) / 4 = 0.2
    s = math.sqrt(0.2 + 1e-8)
    expected = torch.tensor([[0.2 / s, 0.7 / s, 0.0], [-0.3 / s] * 3], **F64)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=0.5), expected)


def test_masked_whiten_ignores_masked_entries():
    values = torch.tensor([1.0, 3.0, 1000.0], **F64)
    mask = torch.tensor([True, True, False])
    # mean 2, unbiased var 2
    expected = torch.tensor([-1 / math.sqrt(2 + 1e-8), 1 / math.sqrt(2 + 1e-8), 0.0], **F64)
    torch.testing.assert_close(masked_whiten(values, mask), expected)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], **F64)
    values = torch.tensor([[0.5, 0.6, 0.7]], **F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]], **F64))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]], **F64))
    # gamma 0.9, lam 0.5: deltas 0.04, 0.03, 0.3; A2 = 0.3, A1 = 0.03 + 0.45 * 0.3,
    # A0 = 0.04 + 0.45 * A1
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3]], **F64))


def test_gae_skips_positions_outside_the_mask():
    rewards = torch.tensor([[0.0, 5.0, 1.0]], **F64)
    values = torch.tensor([[0.5, 99.0, 0.7]], **F64)
    mask = torch.tensor([[True, False, True]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # t0 bootstraps from t2: delta0 = 0.9 * 0.7 - 0.5 = 0.13, A0 = 0.13 + 0.45 * 0.3
    torch.testing.assert_close(adv, torch.tensor([[0.265, 0.0, 0.3]], **F64))
    torch.testing.assert_close(ret, torch.tensor([[0.765, 0.0, 1.0]], **F64))


def test_compute_advantages_broadcasts_to_response_tokens():
    config = AlgorithmConfig(advantage_estimator="grpo", n=2, norm_by_std=False)
    rewards = torch.tensor([1.0, 0.0], **F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]], **F64)
    torch.testing.assert_close(compute_advantages(config, rewards, mask), expected)
    # GAE needs a critic's values: the config refuses it (test_losses), and compute_advantages
    # points at gae_advantages should a config get past that.
    with pytest.raises(ValueError, match="gae_advantages"):
        compute_advantages(SimpleNamespace(advantage_estimator="gae"), rewards, mask)
