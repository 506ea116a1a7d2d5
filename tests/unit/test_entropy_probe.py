"""The entropy-dynamics probe on a tabular softmax policy: its first-order prediction of the entropy
change must match the actual change up to a second-order error (relative error ~ step size), on
the whole vocabulary, with a temperature, padding columns, a mask, and split over TP=2 ranks.

Run as a script under torchrun, this file is also the TP=2 worker (test_probe_tp2_matches_tp1).
"""
import os

import numpy as np
import pytest
import torch

from megatron_rl.analysis.probe import load_probes, probe_entropy_dynamics, save_probe

STATES, VOCAB = 6, 50


def tabular_policy(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(STATES, VOCAB, generator=g, dtype=torch.float64)
    advantage = torch.randn(STATES, VOCAB, generator=g, dtype=torch.float64)
    return logits, advantage


def reference_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def reference_covariance(logits, values, temperature=1.0):
    """Cov_{a~pi}(log pi(a), values(a)), pi = softmax(logits / T), written out in float64."""
    logp = torch.log_softmax(logits / temperature, -1)
    p = logp.exp()
    return (p * logp * values).sum(-1) - (p * logp).sum(-1) * (p * values).sum(-1)


def natural_gradient_step(logits, advantage, eta):
    return eta * advantage


def vanilla_gradient_step(logits, advantage, eta):
    return eta * torch.softmax(logits, -1) * advantage


@pytest.mark.parametrize("step_rule", [natural_gradient_step, vanilla_gradient_step])
def test_prediction_error_is_second_order(step_rule):
    logits, advantage = tabular_policy()
    relative_errors = []
    for eta in (1e-1, 1e-2, 1e-3):
        dz = step_rule(logits, advantage, eta)
        probe = probe_entropy_dynamics(logits, logits + dz)
        # both sides against float64 references written out here
        torch.testing.assert_close(probe.actual,
                                   reference_entropy(logits + dz) - reference_entropy(logits),
                                   rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(probe.predicted, -reference_covariance(logits, dz),
                                   rtol=1e-9, atol=1e-13)
        relative_errors.append(((probe.actual - probe.predicted).abs()
                                / probe.predicted.abs()).max().item())
    # error / prediction shrinks linearly with eta: x10 per decade, within a loose band
    for coarse, fine in zip(relative_errors, relative_errors[1:]):
        assert 7.0 < coarse / fine < 13.0, relative_errors
    assert relative_errors[-1] < 2e-2, relative_errors


def test_metrics_against_numpy_and_mask():
    logits, advantage = tabular_policy(1)
    mask = torch.tensor([True, False, True, True, False, True])
    probe = probe_entropy_dynamics(logits, logits + 0.3 * advantage, mask=mask)
    full = probe_entropy_dynamics(logits, logits + 0.3 * advantage)
    assert probe.actual.shape == (4,)
    torch.testing.assert_close(probe.actual, full.actual[mask])
    a, p = probe.actual.numpy(), probe.predicted.numpy()
    slope, intercept = np.polyfit(p, a, 1)
    m = probe.metrics
    assert m["probe/num_tokens"] == 4
    assert m["probe/correlation"] == pytest.approx(np.corrcoef(p, a)[0, 1], abs=1e-9)
    assert m["probe/slope"] == pytest.approx(slope, rel=1e-7)
    assert m["probe/intercept"] == pytest.approx(intercept, abs=1e-9)
    assert m["probe/actual_change_mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert m["probe/predicted_change_mean"] == pytest.approx(p.mean(), rel=1e-12)
    assert m["probe/entropy_before"] == pytest.approx(reference_entropy(logits)[mask].mean().item())
    assert m["probe/entropy_after"] == pytest.approx(
        reference_entropy(logits + 0.3 * advantage)[mask].mean().item())
    # at a large step (eta = 0.3) the second-order term is visible but the sign pattern holds
    assert 0.5 < m["probe/correlation"] <= 1.0


def test_temperature_and_vocab_padding():
    """pi = softmax(z / T): the prediction uses dz / T; padding columns (global id >= vocab_size)
    with any logits count for nothing."""
    logits, advantage = tabular_policy(2)
    temperature, eta = 0.7, 1e-3
    padding = torch.full((STATES, 14), 30.0, dtype=torch.float64)  # would dominate if counted
    before = torch.cat([logits, padding], -1)
    after = torch.cat([logits + eta * advantage, padding + 5.0], -1)
    probe = probe_entropy_dynamics(before, after, temperature, vocab_size=VOCAB)
    torch.testing.assert_close(probe.predicted,
                               -reference_covariance(logits, eta * advantage / temperature,
                                                     temperature), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(probe.actual,
                               reference_entropy(logits + eta * advantage, temperature)
                               - reference_entropy(logits, temperature), rtol=1e-9, atol=1e-13)
    assert ((probe.actual - probe.predicted).abs() / probe.predicted.abs()).max() < 2e-2
    assert probe.metrics["probe/slope"] == pytest.approx(1.0, abs=2e-2)


def test_float32_and_bfloat16_logits_track_the_prediction():
    """The trainer's logits are fp32 or bf16; the probe still sees a step of size 1e-2."""
    logits, advantage = tabular_policy(3)
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 0.1)):
        before = logits.to(dtype)
        after = (logits + 0.05 * advantage).to(dtype)
        probe = probe_entropy_dynamics(before, after)
        assert probe.actual.dtype == torch.float32
        assert probe.metrics["probe/correlation"] > 0.99
        # the exact first-order term of the rounded logits
        dz = after.double() - before.double()
        torch.testing.assert_close(probe.predicted.double(),
                                   -reference_covariance(before.double(), dz),
                                   rtol=tolerance, atol=tolerance * 1e-2)


def test_save_and_load(tmp_path):
    logits, advantage = tabular_policy(4)
    probe = probe_entropy_dynamics(logits, logits + 1e-2 * advantage)
    save_probe(str(tmp_path), 20, probe)
    save_probe(str(tmp_path), 5, probe)
    loaded = load_probes(str(tmp_path))
    assert [p["step"] for p in loaded] == [5, 20]
    torch.testing.assert_close(loaded[1]["actual"], probe.actual.float())
    torch.testing.assert_close(loaded[1]["predicted"], probe.predicted.float())
    assert loaded[1]["metrics"] == probe.metrics


@pytest.mark.distributed
def test_probe_tp2_matches_tp1():
    from tests.torchrun import run_torchrun

    out = run_torchrun(os.path.abspath(__file__), 2, timeout=120)
    assert out.count("probe tp2 ok") == 2, out


def tp2_worker():
    """Each rank holds half of a padded vocabulary (2 x 28 columns, 50 real); per-token results and
    metrics must equal the single-process probe on the whole vocabulary, on every rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logits, advantage = tabular_policy(5)
    after = logits + 1e-2 * advantage
    pad = torch.zeros(STATES, 6, dtype=torch.float64)
    shard = slice(rank * 28, (rank + 1) * 28)
    mask = torch.tensor([True, True, False, True, True, True])
    tp = probe_entropy_dynamics(torch.cat([logits, pad], -1)[:, shard],
                                torch.cat([after, pad - 3.0], -1)[:, shard], 0.9,
                                dist.group.WORLD, vocab_size=VOCAB, mask=mask)
    single = probe_entropy_dynamics(logits, after, 0.9, mask=mask)
    torch.testing.assert_close(tp.actual, single.actual, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(tp.predicted, single.predicted, rtol=1e-10, atol=1e-13)
    for key, value in single.metrics.items():
        assert tp.metrics[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    # metrics over data-parallel ranks holding different tokens: rank r keeps states r::2
    mine = torch.zeros(STATES, dtype=torch.bool)
    mine[rank::2] = True
    dp = probe_entropy_dynamics(logits, after, 0.9, mask=mine, dp_group=dist.group.WORLD)
    for key, value in probe_entropy_dynamics(logits, after, 0.9).metrics.items():
        assert dp.metrics[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    print("probe tp2 ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # tests/torchrun.py puts the repository on PYTHONPATH
    tp2_worker()
