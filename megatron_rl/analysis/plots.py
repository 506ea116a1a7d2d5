"""PNG figures of one run or several from their run folders (metrics.jsonl, config.json, probe/).

Each panel is drawn by one function that takes a list of runs, so a single run's figure and the
comparison of several (GRPO vs Clip-Cov vs KL-Cov) share the same code: one line per run.
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_rl.analysis.entropy_law import (  # noqa: E402
    EntropyLawFit, PrefixPrediction, entropy_accuracy_points, fit_entropy_law)
from megatron_rl.analysis.probe import load_probes  # noqa: E402

LOSS_MODE_NAMES = {"ppo_clip": "GRPO", "clip_cov": "Clip-Cov", "kl_cov": "KL-Cov"}
# The trainer's batch covariance of log-prob and advantage (algorithms/metrics.py).
COVARIANCE_KEY = "cov_mean"


@dataclass
class Run:
    name: str  # the run folder's name
    label: str  # what the legend shows
    records: List[Dict]
    config: Dict = field(default_factory=dict)
    probes: List[Dict] = field(default_factory=list)


def method_name(config: Dict) -> Optional[str]:
    """GRPO / Clip-higher / Clip-Cov / KL-Cov from a run's config.json, None when it has none.
    A regulariser names the method: GRPO with entropy_coef > 0 is "entropy bonus", with
    kl_ref_coef > 0 "ref-KL"; on another method it is added ("Clip-Cov + ref-KL")."""
    algorithm = config.get("algorithm", {})
    mode = algorithm.get("loss_mode")
    if mode == "ppo_clip" and algorithm.get("eps_high", 0) > algorithm.get("eps_low", 0):
        base = "Clip-higher"
    else:
        base = LOSS_MODE_NAMES.get(mode, mode)
    extras = [name for key, name in (("entropy_coef", "entropy bonus"), ("kl_ref_coef", "ref-KL"))
              if (algorithm.get(key) or 0) > 0]
    if not extras:
        return base
    return " + ".join(extras if base == "GRPO" else [base, *extras])


def read_metrics(path: str) -> List[Dict]:
    """metrics.jsonl records by step; a resumed run re-logs steps after its checkpoint, and the
    later line of a step wins."""
    by_step: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def read_run(run_dir: str, label: Optional[str] = None, with_probes: bool = True) -> Run:
    run_dir = os.path.abspath(run_dir)
    name = os.path.basename(run_dir.rstrip(os.sep))
    config_path = os.path.join(run_dir, "config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    return Run(name=name, label=label or method_name(config) or name,
               records=read_metrics(os.path.join(run_dir, "metrics.jsonl")), config=config,
               probes=load_probes(run_dir) if with_probes else [])


def read_runs(run_dirs: Sequence[str]) -> List[Run]:
    """Runs labelled by method; runs of the same method are told apart by their folder name."""
    runs = [read_run(d) for d in run_dirs]
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.name})"
    return runs


def series(records: Sequence[Dict], key: str):
    """(steps, values) of the records that logged a finite `key`."""
    rows = [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return (np.array([s for s, _ in rows]), np.array([v for _, v in rows])) if rows else (
        np.zeros(0), np.zeros(0))


def draw_metric(ax, runs: Sequence[Run], key: str, ylabel: str, title: str) -> None:
    for run in runs:
        steps, values = series(run.records, key)
        if len(steps):
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=run.label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _legend(ax, runs)


def draw_law(ax, runs: Sequence[Run], prefix: Optional[PrefixPrediction] = None) -> None:
    """Eval accuracy against policy entropy with each run's fitted law R = -a exp(H) + b, drawn
    down to H = 0, where its ceiling -a + b is marked. With `prefix` (one run), the points the
    fit saw and the ones it predicts are told apart."""
    for index, run in enumerate(runs):
        color = f"C{index}"
        _, entropy, accuracy = entropy_accuracy_points(run.records)
        if prefix is not None:
            k = prefix.first_k
            ax.scatter(entropy[:k], accuracy[:k], s=14, color=color, label=f"{run.label}: fitted")
            ax.scatter(entropy[k:], accuracy[k:], s=14, color=color, marker="x",
                       label=f"{run.label}: predicted, RMSE {100 * prefix.rmse:.2f} pts")
            fit = prefix.fit
        else:
            ax.scatter(entropy, accuracy, s=14, color=color)
            try:
                fit = fit_entropy_law(entropy, accuracy)
            except ValueError:  # too few evaluations to fit yet
                ax.plot([], [], color=color, label=run.label)
                continue
        draw_law_curve(ax, fit, float(entropy.max()), color, run.label)
    ax.set(xlabel="policy entropy H", ylabel="eval accuracy R", title="accuracy vs entropy (law)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_law_curve(ax, fit: EntropyLawFit, entropy_max: float, color, label: str,
                   detail: str = "") -> None:
    """A fitted law R = -a exp(H) + b from H = entropy_max * 1.05 down to H = 0, where its
    ceiling -a + b is starred and dotted across the panel. `detail` is added to the curve's
    legend entry."""
    grid = np.linspace(0.0, max(entropy_max, 1e-3) * 1.05, 200)
    ax.plot(grid, fit.predict(grid), color=color,
            label=f"{label}: R = {-fit.a:.3g} e^H {'-' if fit.b < 0 else '+'} {abs(fit.b):.3g}"
                  + detail)
    ax.axhline(fit.ceiling, color=color, linestyle=":", linewidth=1)
    ax.plot([0.0], [fit.ceiling], marker="*", markersize=10, color=color,
            label=f"{label}: ceiling {fit.ceiling:.3f}")


def draw_probe(ax, probes: Sequence[Dict]) -> None:
    """Per-token actual vs first-order predicted entropy change of every saved probe (one colour
    per step) and the y = x line the first-order theory predicts."""
    if not probes:
        ax.text(0.5, 0.5, "no probe saved\n(RUN_DIR/probe/step_*.pt)", ha="center", va="center",
                transform=ax.transAxes)
    cmap = plt.get_cmap("viridis")
    for index, probe in enumerate(probes):
        metrics = probe.get("metrics", {})
        ax.scatter(probe["predicted"].numpy(), probe["actual"].numpy(), s=4, alpha=0.5,
                   color=cmap(index / max(len(probes) - 1, 1)),
                   label=f"step {probe['step']}: "
                         f"corr {metrics.get('probe/correlation', float('nan')):.3f}, "
                         f"slope {metrics.get('probe/slope', float('nan')):.3f}")
    values = np.concatenate([np.zeros(0)] + [
        np.concatenate([p["predicted"].numpy(), p["actual"].numpy()]) for p in probes])
    values = values[np.isfinite(values)]  # a probe of a step whose groups were all filtered
    if values.size:  # has no token; a diverged one may hold NaN
        lo, hi = float(values.min()), float(values.max())
        ax.plot([lo, hi], [lo, hi], color="k", linewidth=1, linestyle="--", label="y = x")
    if probes:
        ax.legend(fontsize=6)
    ax.set(xlabel="predicted dH = -Cov(log pi, dz)", ylabel="actual dH",
           title="entropy change per token")
    ax.grid(alpha=0.3)


def _legend(ax, runs):
    if len(runs) > 1 or any(ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=7)


def _panels(runs: Sequence[Run]):
    """(file stem, draw function) of every panel of a run figure."""
    return [
        ("entropy", lambda ax: draw_metric(ax, runs, "entropy", "policy entropy",
                                           "entropy vs step")),
        ("accuracy", lambda ax: draw_metric(ax, runs, "eval_accuracy", "eval accuracy",
                                            "eval accuracy vs step")),
        ("entropy_law", lambda ax: draw_law(ax, runs)),
        ("covariance", lambda ax: draw_metric(ax, runs, COVARIANCE_KEY, "mean Cov(log pi, A)",
                                              "covariance of log-prob and advantage")),
        ("probe", lambda ax: draw_probe(ax, [p for run in runs for p in run.probes])),
    ]


def save_figure(fig, out_path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_runs(runs: Sequence[Run], out_path: str) -> str:
    """One figure: entropy, accuracy, accuracy-vs-entropy law and covariance panels, one line per
    run; with a single run also its probe scatter."""
    panels = _panels(runs)
    if len(runs) > 1:  # probe scatters of several runs on one axis would be unreadable
        panels = [p for p in panels if p[0] != "probe"]
    columns = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax, (_, draw) in zip(axes.flat, panels):
        draw(ax)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if len(runs) == 1:
        fig.suptitle(f"{runs[0].label}: {runs[0].name}")
    return save_figure(fig, out_path)


def write_run_plots(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
    """Every panel of a run as its own PNG, plus summary.png with all of them, in RUN_DIR/plots
    (or out_dir). What the trainer calls at the end of a run."""
    run = read_run(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    paths = []
    for stem, draw in _panels([run]):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw(ax)
        paths.append(save_figure(fig, os.path.join(out_dir, f"{stem}.png")))
    paths.append(plot_runs([run], os.path.join(out_dir, "summary.png")))
    return paths


def plot_prefix_prediction(run: Run, prefix: PrefixPrediction, out_path: str) -> str:
    """The law fitted on a run's first K evaluations against the rest, and accuracy vs step with
    the fit's prediction of the held-out evaluations."""
    fig, (law_ax, step_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    draw_law(law_ax, [run], prefix)
    steps, _, accuracy = entropy_accuracy_points(run.records)
    k = prefix.first_k
    step_ax.plot(steps, accuracy, marker="o", markersize=3, label="eval accuracy")
    step_ax.plot(steps[k:], prefix.predicted, marker="x", linestyle="--",
                 label=f"law fitted on first {k} points")
    step_ax.axvline(steps[k - 1], color="grey", linestyle=":", linewidth=1)
    step_ax.set(xlabel="step", ylabel="eval accuracy", title="prediction of later accuracy")
    step_ax.grid(alpha=0.3)
    step_ax.legend(fontsize=7)
    return save_figure(fig, out_path)
