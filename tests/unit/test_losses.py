"""Policy losses, aggregation and the algorithm config against hand-computed values."""
import dataclasses
import math

import pytest
import torch

from megatron_rl.algorithms import ALIASES, AlgorithmConfig, aggregate, policy_loss, reference_kl
from megatron_rl.config import ConfigError, from_dict

F64 = dict(dtype=torch.float64)


def tokens():
    """One sequence of 4 tokens, the last masked out; old log-probs 0, so ratio = exp(logprob).
    ratios 1.5 (A=1), 0.5 (A=-1), 1.1 (A=2), 9 (A=5, masked)."""
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]], **F64)).requires_grad_()
    old = torch.zeros(1, 4, **F64)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 5.0]], **F64)
    mask = torch.tensor([[True, True, True, False]])
    return logprobs, old, advantages, mask


def loss_of(selected=None, **config):
    logprobs, old, advantages, mask = tokens()
    loss, stats = policy_loss(logprobs, old, advantages, mask, AlgorithmConfig(**config),
                              selected=selected)
    loss.backward()
    return loss.item(), logprobs.grad[0], stats


def test_vanilla_is_the_unclipped_surrogate():
    loss, grad, _ = loss_of(loss_mode="vanilla")
    assert loss == pytest.approx((-1.5 + 0.5 - 2.2) / 3, abs=1e-12)
    # d(-A * ratio)/d logprob = -A * ratio, over N = 3; the masked token gets nothing
    torch.testing.assert_close(grad, torch.tensor([-1.5, 0.5, -2.2, 0.0], **F64) / 3)


def test_ppo_clip_symmetric():
    loss, grad, stats = loss_of(loss_mode="ppo_clip")
    # token 0: max(-1.5, -1.2) = -1.2 (clipped high); token 1: max(0.5, 0.8) = 0.8 (clipped low)
    assert loss == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -2.2 / 3, 0.0], **F64))
    assert stats["pg_clipfrac_high"].item() == 1 and stats["pg_clipfrac_low"].item() == 1
    assert stats["num_tokens"].item() == 3
    # ppo_kl sums log pi_old - log pi over the masked tokens
    assert stats["ppo_kl"].item() == pytest.approx(-math.log(1.5 * 0.5 * 1.1), abs=1e-12)


def test_clip_higher_widens_only_the_upper_bound():
    loss, _, stats = loss_of(loss_mode="ppo_clip", eps_low=0.2, eps_high=0.6)
    assert loss == pytest.approx((-1.5 + 0.8 - 2.2) / 3, abs=1e-12)
    assert stats["pg_clipfrac_high"].item() == 0 and stats["pg_clipfrac_low"].item() == 1


def test_truncated_importance_sampling_weights_each_token():
    # pi_old / pi_rollout per token: 2.0, 0.5, 4.0 (capped at 3), masked 7.0
    logprobs, old, advantages, mask = tokens()
    rollout = -torch.log(torch.tensor([[2.0, 0.5, 4.0, 7.0]], **F64))
    loss, stats = policy_loss(logprobs, old, advantages, mask,
                              AlgorithmConfig(loss_mode="vanilla", rollout_is_cap=3.0),
                              rollout_logprobs=rollout)
    loss.backward()
    weights = torch.tensor([2.0, 0.5, 3.0, 0.0], **F64)
    assert loss.item() == pytest.approx((-1.5 * 2 + 0.5 * 0.5 - 2.2 * 3) / 3, abs=1e-12)
    # the weight is a constant: the gradient is the weighted surrogate's
    torch.testing.assert_close(logprobs.grad[0],
                               torch.tensor([-1.5, 0.5, -2.2, 0.0], **F64) * weights / 3)
    assert stats["rollout_is_weight"].item() == pytest.approx(5.5, abs=1e-12)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(logprobs, old, advantages, mask, AlgorithmConfig(rollout_is_cap=3.0))


def test_dual_clip_caps_negative_advantage_loss():
    logprobs = torch.log(torch.tensor([[4.0, 4.0]], **F64)).requires_grad_()
    advantages = torch.tensor([[-1.0, 1.0]], **F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    config = AlgorithmConfig(loss_mode="ppo_clip", dual_clip_c=3.0)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 2, **F64), advantages, mask, config)
    # A<0: PPO gives max(4, 0.8) = 4, dual clip min(4, 3) = 3; A>0: max(-4, -1.2) = -1.2
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2, abs=1e-12)
    assert stats["dual_clipfrac"].item() == 1
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2, **F64))


def test_clip_cov_selected_tokens_have_exactly_zero_gradient():
    selected = torch.tensor([[False, False, True, False]])
    loss, grad, stats = loss_of(selected, loss_mode="clip_cov")
    # token 2 drops out of the sum but stays in the denominator
    assert loss == pytest.approx((-1.2 + 0.8) / 3, abs=1e-12)
    assert grad[2].item() == 0.0
    assert stats["clip_cov_frac"].item() == 1


def test_kl_cov_adds_abs_kl_on_selected_tokens_without_clip():
    selected = torch.tensor([[False, True, False, False]])
    loss, grad, stats = loss_of(selected, loss_mode="kl_cov", beta=1.0)
    # token 1: -A * ratio + beta * |log 0.5| = 0.5 + log 2; the others unclipped
    assert loss == pytest.approx((-1.5 + 0.5 + math.log(2) - 2.2) / 3, abs=1e-12)
    # d/dlogprob: -A * ratio + beta * sign(logprob - old) = 0.5 - 1 on token 1
    torch.testing.assert_close(grad, torch.tensor([-1.5, -0.5, -2.2, 0.0], **F64) / 3)
    assert stats["kl_cov_frac"].item() == 1
    loss_beta2, _, _ = loss_of(selected, loss_mode="kl_cov", beta=2.0)
    assert loss_beta2 - loss == pytest.approx(math.log(2) / 3, abs=1e-12)


def test_selection_modes_require_the_mask():
    for mode in ("clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match="selected"):
            loss_of(None, loss_mode=mode)


def test_aggregation_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], **F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    # global normalisers replace the local counts
    assert aggregate(values, mask, "token-mean", num_global_tokens=8).item() == 10 / 8
    assert aggregate(values, mask, "seq-mean-token-sum", num_global_sequences=5).item() == 2.0
    # a sequence with no response tokens counts in no sequence mean
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert aggregate(torch.cat([values, values[:1]]), torch.cat([mask, empty]),
                     "seq-mean-token-mean").item() == pytest.approx(3.0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum"])
def test_micro_batch_sum_equals_whole_mini_batch(aggregation):
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(8, 12, generator=g, **F64) * 3).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(8, 12, generator=g, **F64)
    advantages = torch.randn(8, 1, generator=g, **F64).expand(8, 12)
    mask = torch.rand(8, 12, generator=g) > 0.3
    mask[3] = False  # a sequence with no response token
    selected = (torch.rand(8, 12, generator=g) > 0.8) & mask
    config = AlgorithmConfig(loss_mode="kl_cov", aggregation=aggregation, entropy_coef=0.01,
                             kl_ref_coef=0.1)
    extra = dict(entropy=torch.rand(8, 12, generator=g, **F64),
                 ref_logprobs=old - 0.1)

    whole, _ = policy_loss(logprobs, old, advantages, mask, config, selected=selected, **extra)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    num_tokens, num_sequences = mask.sum(), (mask.sum(-1) > 0).sum()
    pieces = 0
    for rows in torch.arange(8).split(2):
        piece, _ = policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], config,
                               selected=selected[rows], entropy=extra["entropy"][rows],
                               ref_logprobs=extra["ref_logprobs"][rows],
                               num_global_tokens=num_tokens,
                               num_global_sequences=num_sequences)
        pieces = pieces + piece
    (pieces_grad,) = torch.autograd.grad(pieces, logprobs)
    torch.testing.assert_close(pieces, whole, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(pieces_grad, whole_grad, rtol=1e-14, atol=1e-14)


def test_entropy_bonus_and_reference_kl():
    logprobs, old, advantages, mask = tokens()
    entropy = torch.tensor([[0.5, 1.0, 1.5, 100.0]], **F64)
    ref = logprobs.detach() + math.log(0.5)  # pi_ref / pi = 0.5 on every token
    base, _ = policy_loss(logprobs, old, advantages, mask, AlgorithmConfig(loss_mode="vanilla"))
    config = AlgorithmConfig(loss_mode="vanilla", entropy_coef=0.1, kl_ref_coef=0.5,
                             kl_ref_estimator="k3")
    loss, stats = policy_loss(logprobs, old, advantages, mask, config, entropy=entropy,
                              ref_logprobs=ref)
    k3 = 0.5 - math.log(0.5) - 1
    assert (loss - base).item() == pytest.approx(-0.1 * 1.0 + 0.5 * k3, abs=1e-12)
    assert stats["entropy"].item() == pytest.approx(3.0)
    assert stats["kl_ref"].item() == pytest.approx(3 * k3, abs=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logprobs, old, advantages, mask, config, ref_logprobs=ref)


def test_reference_kl_estimators():
    logprobs = torch.log(torch.tensor([0.5], **F64))
    ref = torch.log(torch.tensor([0.25], **F64))
    # d = log(pi_ref / pi) = log 0.5
    d = math.log(0.5)
    assert reference_kl(logprobs, ref, "k1").item() == pytest.approx(-d)
    assert reference_kl(logprobs, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert reference_kl(logprobs, ref, "k3").item() == pytest.approx(0.5 - d - 1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum"])
def test_reference_kl_term_against_float64_log_softmax(estimator, aggregation):
    """The KL-to-reference term as the trainer computes it (float32 logits -> the vocab-parallel
    op -> policy_loss) against a float64 reference by hand: log-probs from log_softmax in float64,
    each token's estimate and its derivative written out, aggregated with explicit loops; and the
    gradient w.r.t. the policy's logits, (onehot - softmax) / temperature per token."""
    from megatron_rl.ops import vocab_parallel_logprobs_entropy

    g = torch.Generator().manual_seed(3)
    batch, length, vocab, temperature, coef = 4, 6, 11, 0.8, 0.05
    logits = 2 * torch.randn(batch, length, vocab, generator=g, **F64)
    ref_logits = logits + 0.7 * torch.randn(batch, length, vocab, generator=g, **F64)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    # response lengths 5, 0, 2, 3 (unequal, so the three aggregations differ); a sequence
    # without response tokens counts in no normaliser
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0] * 6, [0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]],
                        dtype=torch.bool)

    def log_softmax64(x):
        return torch.log_softmax(x / temperature, dim=-1)

    lp64 = log_softmax64(logits).gather(-1, targets[..., None])[..., 0]
    ref64 = log_softmax64(ref_logits).gather(-1, targets[..., None])[..., 0]
    tokens = [[t for t in range(length) if mask[i, t]] for i in range(batch)]
    num_tokens = sum(map(len, tokens))
    num_sequences = sum(1 for ts in tokens if ts)
    want_loss, want_sum = 0.0, 0.0
    weight = torch.zeros(batch, length, **F64)  # d loss / d log pi per token
    for i, ts in enumerate(tokens):
        for t in ts:
            d = ref64[i, t].item() - lp64[i, t].item()  # log pi_ref - log pi
            k, dk = {"k1": (-d, 1.0), "k2": (d * d / 2, -d),
                     "k3": (math.exp(d) - d - 1, 1 - math.exp(d))}[estimator]
            share = {"token-mean": 1 / num_tokens, "seq-mean-token-sum": 1 / num_sequences,
                     "seq-mean-token-mean": 1 / (len(ts) * num_sequences)}[aggregation]
            want_loss += coef * k * share
            want_sum += k
            weight[i, t] = coef * dk * share
    onehot = torch.nn.functional.one_hot(targets, vocab).to(torch.float64)
    want_grad = weight[..., None] * (onehot - log_softmax64(logits).exp()) / temperature

    config = AlgorithmConfig(loss_mode="vanilla", kl_ref_coef=coef, kl_ref_estimator=estimator,
                             aggregation=aggregation)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        x = logits.to(dtype).clone().requires_grad_()
        logprobs, _ = vocab_parallel_logprobs_entropy(x, targets, temperature)
        ref, _ = vocab_parallel_logprobs_entropy(ref_logits.to(dtype), targets, temperature)
        # A = 0: the policy term and its gradient vanish, the KL term is the whole loss
        loss, stats = policy_loss(logprobs, logprobs.detach(), torch.zeros_like(logprobs), mask,
                                  config, ref_logprobs=ref)
        loss.backward()
        assert loss.item() == pytest.approx(want_loss, rel=tol, abs=tol), dtype
        assert stats["kl_ref"].item() == pytest.approx(want_sum, rel=tol, abs=tol), dtype
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=tol, atol=tol)


def test_config_defaults_are_the_papers():
    config = AlgorithmConfig()
    assert (config.r, config.omega_low, config.omega_high) == (2e-4, 1.0, 5.0)
    assert (config.k, config.beta) == (2e-3, 1.0)
    assert config.cov_policy == "current"


def test_config_aliases_follow_verl():
    verl_keys = {"clip_cov_ratio": "r", "clip_cov_lb": "omega_low", "clip_cov_ub": "omega_high",
                 "kl_cov_ratio": "k", "ppo_kl_coef": "beta"}
    for alias, name in verl_keys.items():
        assert ALIASES[alias] == name
        field = {f.name: f for f in dataclasses.fields(AlgorithmConfig)}[name]
        assert alias in field.metadata["aliases"]
    config = from_dict(AlgorithmConfig, {"clip_cov_ratio": 1e-3, "clip_cov_lb": 0.5,
                                         "kl_cov_ratio": 2e-4, "ppo_kl_coef": 0.5,
                                         "loss_agg_mode": "seq-mean-token-sum"})
    assert (config.r, config.omega_low, config.k, config.beta) == (1e-3, 0.5, 2e-4, 0.5)
    assert config.aggregation == "seq-mean-token-sum"
    with pytest.raises(ConfigError, match="set twice"):
        from_dict(AlgorithmConfig, {"r": 1e-3, "clip_cov_ratio": 1e-3})


@pytest.mark.parametrize("values, match", [
    (dict(r=0.0), r"r \(clip_cov_ratio\) must be in \(0, 1\)"),
    (dict(k=1.5), r"k \(kl_cov_ratio\) must be in \(0, 1\)"),
    (dict(omega_low=6.0), r"omega_low \(clip_cov_lb\) = 6.0 must be <= omega_high"),
    (dict(dual_clip_c=1.0), "dual_clip_c"),
    (dict(beta=-1.0), "beta"),
    (dict(n=1), "n .* must be >= 2"),
    (dict(advantage_estimator="gae"),
     r"advantage_estimator \(adv_estimator\) cannot be gae: GAE needs a critic"),
])
def test_config_validation_names_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        AlgorithmConfig(**values)
