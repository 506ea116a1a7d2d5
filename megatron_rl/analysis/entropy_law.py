"""The entropy law of arXiv 2505.22617: validation accuracy R against policy entropy H follows

    R = -a * exp(H) + b,

so as entropy collapses to 0 the accuracy saturates at the ceiling R(0) = b - a. The model is
linear in (a, b), so a robust fit is iteratively reweighted least squares with Huber weights on
the design [-exp(H), 1]: a few outlier evaluations (a noisy eval, a spike) cannot drag the curve.
"""
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np

HUBER_K = 1.345  # 95% efficiency under Gaussian noise
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation for Gaussian noise


@dataclass(frozen=True)
class EntropyLawFit:
    a: float
    b: float
    residual_rms: float  # RMS of (R - fit) over the fitted points, outliers included
    num_points: int

    @property
    def ceiling(self) -> float:
        """The accuracy the law predicts once entropy is exhausted (H = 0)."""
        return self.b - self.a

    def predict(self, entropy) -> np.ndarray:
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b

    def r_squared(self, entropy: Sequence[float], accuracy: Sequence[float]) -> float:
        """1 - SS_res / SS_tot of the fit on (entropy, accuracy), every point weighted 1 (the
        Huber weights only shape the fit). NaN when the accuracies are all equal."""
        accuracy = np.asarray(accuracy, dtype=np.float64)
        ss_tot = float(np.sum((accuracy - accuracy.mean()) ** 2))
        ss_res = float(np.sum((accuracy - self.predict(entropy)) ** 2))
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_entropy_law(entropy: Sequence[float], accuracy: Sequence[float], *,
                    huber_k: float = HUBER_K, max_iter: int = 100,
                    tol: float = 1e-12) -> EntropyLawFit:
    """Robust (Huber IRLS) least-squares fit of accuracy = -a exp(entropy) + b.

    The residual scale is re-estimated from the median absolute deviation at every iteration, so
    the Huber threshold adapts to the noise of the run. Needs two distinct entropies.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if entropy.shape != accuracy.shape or entropy.ndim != 1:
        raise ValueError(f"entropy {entropy.shape} and accuracy {accuracy.shape} must be equal 1-D")
    if not (np.isfinite(entropy).all() and np.isfinite(accuracy).all()):
        raise ValueError("entropy and accuracy must be finite")
    design = np.stack([-np.exp(entropy), np.ones_like(entropy)], axis=1)
    if len(entropy) < 2 or np.ptp(design[:, 0]) <= 1e-12 * np.abs(design[:, 0]).max():
        raise ValueError("the entropy law needs at least two points with different entropies")
    weights = np.ones_like(entropy)
    params = np.zeros(2)
    for _ in range(max_iter):
        sqrt_w = np.sqrt(weights)[:, None]
        new_params = np.linalg.lstsq(design * sqrt_w, accuracy * sqrt_w[:, 0], rcond=None)[0]
        converged = np.all(np.abs(new_params - params) <= tol * (1.0 + np.abs(new_params)))
        params = new_params
        if converged:
            break
        residual = accuracy - design @ params
        scale = MAD_TO_SIGMA * np.median(np.abs(residual - np.median(residual)))
        if scale <= 1e-12 * (1.0 + np.abs(accuracy).max()):
            break  # (near) exact fit of the majority: nothing left to down-weight
        weights = np.minimum(1.0, huber_k * scale / np.maximum(np.abs(residual), 1e-300))
    residual = accuracy - design @ params
    return EntropyLawFit(a=float(params[0]), b=float(params[1]),
                         residual_rms=float(np.sqrt(np.mean(residual ** 2))),
                         num_points=len(entropy))


def entropy_accuracy_points(records: Iterable[Mapping], accuracy_key: str = "eval_accuracy"
                            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, entropy, accuracy) of the metrics records that carry both a policy entropy and an
    accuracy (the step-0 evaluation has no training entropy yet and is left out)."""
    rows = [(r["step"], r["entropy"], r[accuracy_key]) for r in records
            if isinstance(r.get("entropy"), (int, float))
            and isinstance(r.get(accuracy_key), (int, float))
            and math.isfinite(r["entropy"]) and math.isfinite(r[accuracy_key])]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    steps, entropy, accuracy = (np.array(column, dtype=np.float64) for column in zip(*rows))
    return steps, entropy, accuracy


def entropy_law_metrics(points: Sequence[Tuple[float, float]],
                        min_points: int = 4) -> Dict[str, float]:
    """The online fit for the trainer's log: `points` are the (entropy, eval accuracy) pairs so far,
    in step order. Empty until `min_points` pairs with distinct entropies exist.

    law/predicted_final is the law at the latest entropy (what the run should score now, from all
    evaluations, less noisy than one evaluation); law/headroom = law/ceiling - law/predicted_final
    is the accuracy left for the remaining entropy to buy.
    """
    if len(points) < min_points:
        return {}
    entropy, accuracy = zip(*points)
    try:
        fit = fit_entropy_law(entropy, accuracy)
    except ValueError:
        return {}
    predicted_final = float(fit.predict(entropy[-1]))
    return {"law/a": fit.a, "law/b": fit.b, "law/ceiling": fit.ceiling,
            "law/predicted_final": predicted_final, "law/headroom": fit.ceiling - predicted_final,
            "law/residual_rms": fit.residual_rms, "law/num_points": float(fit.num_points)}


@dataclass(frozen=True)
class PrefixPrediction:
    """The law fitted on the first `first_k` points and evaluated on the rest (the paper's check:
    fit on 36 steps, predict the next 200, RMSE 0.9% on math)."""
    fit: EntropyLawFit
    first_k: int
    predicted: np.ndarray  # the fit at the held-out points' entropies
    actual: np.ndarray
    rmse: float  # over the held-out points, in accuracy units (x100 for points)


def predict_from_prefix(entropy: Sequence[float], accuracy: Sequence[float],
                        first_k: int) -> PrefixPrediction:
    entropy = np.asarray(entropy, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if not 2 <= first_k < len(entropy):
        raise ValueError(f"first_k={first_k} must leave at least 2 points to fit and 1 to predict "
                         f"out of {len(entropy)}")
    fit = fit_entropy_law(entropy[:first_k], accuracy[:first_k])
    predicted = fit.predict(entropy[first_k:])
    actual = accuracy[first_k:]
    return PrefixPrediction(fit=fit, first_k=first_k, predicted=predicted, actual=actual,
                            rmse=float(np.sqrt(np.mean((predicted - actual) ** 2))))
