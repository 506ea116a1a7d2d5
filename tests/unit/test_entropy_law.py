"""The entropy-law fit R = -a exp(H) + b: recovery of a and b from noisy data with outliers, the
K-prefix prediction check, and the online metrics the trainer logs."""
import numpy as np
import pytest

from megatron_rl.analysis.entropy_law import (entropy_accuracy_points, entropy_law_metrics,
                                              fit_entropy_law, predict_from_prefix)

A_TRUE, B_TRUE = 0.08, 0.95  # ceiling 0.87


def law(entropy):
    return -A_TRUE * np.exp(entropy) + B_TRUE


def entropy_trajectory(steps):
    """Entropy falling fast and then slowly, as in the paper's runs."""
    return 0.15 + 1.6 * np.exp(-np.arange(steps) / 40.0)


def test_exact_data_recovers_the_law():
    entropy = np.linspace(0.1, 2.0, 12)
    fit = fit_entropy_law(entropy, law(entropy))
    assert fit.a == pytest.approx(A_TRUE, rel=1e-10)
    assert fit.b == pytest.approx(B_TRUE, rel=1e-10)
    assert fit.ceiling == pytest.approx(B_TRUE - A_TRUE, rel=1e-10)
    assert fit.residual_rms < 1e-12
    np.testing.assert_allclose(fit.predict([0.0, 1.0]), law(np.array([0.0, 1.0])), rtol=1e-10)


def test_noisy_data_with_outliers():
    rng = np.random.default_rng(0)
    entropy = entropy_trajectory(80)
    accuracy = law(entropy) + rng.normal(0.0, 0.01, entropy.shape)
    accuracy[[5, 23, 47, 70, 76]] -= 0.5  # broken evaluations
    fit = fit_entropy_law(entropy, accuracy)
    assert fit.a == pytest.approx(A_TRUE, abs=0.004)
    assert fit.b == pytest.approx(B_TRUE, abs=0.008)
    assert fit.ceiling == pytest.approx(B_TRUE - A_TRUE, abs=0.006)
    # plain least squares (no down-weighting) is pulled far off by the same five points
    plain = fit_entropy_law(entropy, accuracy, huber_k=np.inf)
    assert abs(plain.ceiling - (B_TRUE - A_TRUE)) > 0.02


def test_prefix_predicts_the_rest():
    """The paper's check in miniature: fit on the first 36 points, predict the next 200."""
    rng = np.random.default_rng(1)
    noise = 0.01
    entropy = entropy_trajectory(236)
    accuracy = law(entropy) + rng.normal(0.0, noise, entropy.shape)
    prediction = predict_from_prefix(entropy, accuracy, 36)
    assert prediction.first_k == 36 and len(prediction.actual) == 200
    np.testing.assert_array_equal(prediction.actual, accuracy[36:])
    # held-out RMSE is the noise plus a small extrapolation error
    assert noise * 0.8 < prediction.rmse < noise * 1.5
    # a law that is not exponential in H is not predicted that well (the check can fail)
    linear = 0.9 - 0.3 * entropy + rng.normal(0.0, noise, entropy.shape)
    assert predict_from_prefix(entropy, linear, 36).rmse > 2 * noise
    with pytest.raises(ValueError):
        predict_from_prefix(entropy[:10], accuracy[:10], 10)


def test_degenerate_inputs():
    with pytest.raises(ValueError):
        fit_entropy_law([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        fit_entropy_law([0.5], [0.1])
    with pytest.raises(ValueError):
        fit_entropy_law([0.5, float("nan")], [0.1, 0.2])


def test_online_metrics():
    entropy = entropy_trajectory(10)
    points = list(zip(entropy, law(entropy)))
    assert entropy_law_metrics(points[:3]) == {}
    assert entropy_law_metrics([(0.7, 0.2)] * 5) == {}  # no entropy spread yet
    metrics = entropy_law_metrics(points)
    assert metrics["law/a"] == pytest.approx(A_TRUE, rel=1e-8)
    assert metrics["law/b"] == pytest.approx(B_TRUE, rel=1e-8)
    assert metrics["law/ceiling"] == pytest.approx(B_TRUE - A_TRUE, rel=1e-8)
    assert metrics["law/predicted_final"] == pytest.approx(law(entropy[-1]), rel=1e-8)
    assert metrics["law/headroom"] == pytest.approx(A_TRUE * (np.exp(entropy[-1]) - 1), rel=1e-6)
    assert metrics["law/num_points"] == 10


def test_points_from_metrics_records():
    records = [{"step": 0, "eval_accuracy": 0.1},  # before training: no entropy
               {"step": 1, "entropy": 1.5, "reward_mean": 0.2},
               {"step": 5, "entropy": 1.2, "eval_accuracy": 0.3, "eval_avg@4": 0.25},
               {"step": 10, "entropy": float("nan"), "eval_accuracy": 0.4},
               {"step": 15, "entropy": 0.9, "eval_accuracy": 0.5}]
    steps, entropy, accuracy = entropy_accuracy_points(records)
    np.testing.assert_array_equal(steps, [5, 15])
    np.testing.assert_array_equal(entropy, [1.2, 0.9])
    np.testing.assert_array_equal(accuracy, [0.3, 0.5])
    assert entropy_accuracy_points(records, "eval_avg@4")[2].tolist() == [0.25]
    assert len(entropy_accuracy_points([])[0]) == 0
