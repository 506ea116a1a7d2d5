"""Several seeds of several methods, aggregated: the paper's comparison in miniature.

The input is a root folder laid out as ROOT/<method>/seed_<s>/, each run folder as the trainer
writes it (config.json, metrics.jsonl). `compare_root(ROOT)` writes

- ROOT/comparison.png: per method, the mean over seeds and the min-max band of entropy, held-out
  accuracy and the batch covariance vs step, and accuracy vs entropy with every seed's points and
  the law R = -a exp(H) + b fitted on all of the method's points;
- ROOT/summary.json: per seed and aggregated over seeds (mean, sample std, min, max) the numbers
  of SEED_QUANTITIES, the pooled law fit, and the issue's targets as plain facts under "checks";

and `format_table(summary)` prints it. Methods are named from config.json (plots.method_name), so
the folder names do not matter. Nothing here depends on the task: everything comes from the
metrics the trainer logs. docs/analysis.md defines each number.
"""
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_rl.analysis.entropy_law import (EntropyLawFit, entropy_accuracy_points,
                                              fit_entropy_law, predict_from_prefix)
from megatron_rl.analysis.plots import (COVARIANCE_KEY, Run, draw_law_curve, plt, read_run,
                                        save_figure, series)

SEED_DIR = re.compile(r"^seed_(\d+)$")
# A run folder holding this file is left out (the launcher writes it for a run that failed).
FAILED_MARKER = "FAILED"
# Config keys the seeds of one method differ in by design; any other difference is reported.
SEED_KEYS = ("rollout.seed", "algorithm.seed", "data.seed", "training.output_dir")
METHOD_ORDER = ("GRPO", "Clip-Cov", "KL-Cov", "Clip-higher", "entropy bonus", "ref-KL")
ACCURACY_KEY = "eval_accuracy"
# A run's law is fitted from this many (entropy, accuracy) points on (as the trainer's online fit):
# two parameters through 2-3 points say nothing (R^2 = 1 at 2).
MIN_LAW_POINTS = 4
# (key, table row) of the per-seed numbers, in table order.
SEED_QUANTITIES = (
    ("initial_entropy", "initial entropy"),
    ("final_entropy", "final entropy"),
    ("warm_start_accuracy", "warm-start acc"),
    ("final_accuracy", "final acc"),
    ("law_a", "law a"),
    ("law_b", "law b"),
    ("law_ceiling", "law ceiling b-a"),
    ("law_r2", "law R^2"),
    ("prefix_rmse", "prefix RMSE"),
)
NOTES = {
    "initial_entropy": "the first logged training entropy (step 1's batch)",
    "final_entropy": "the last logged training entropy (the last step's batch), no averaging",
    "warm_start_accuracy": "eval_accuracy at step 0, before any RL update",
    "final_accuracy": "the last eval_accuracy after step 0",
    "law_*": "R = -a exp(H) + b fitted (Huber IRLS) on the run's (entropy, eval_accuracy) pairs "
             f"(at least {MIN_LAW_POINTS}, step 0 has no entropy); ceiling = b - a; "
             "R^2 = 1 - SS_res/SS_tot with every point weighted 1",
    "prefix_rmse": "the law fitted on the first third of the run's evaluations (at least 2), "
                   "RMSE of its prediction of the rest, accuracy units (x100 for points)",
    "aggregate": "mean, sample std (ddof=1; null below 2 seeds), min, max over seeds",
    "pooled_law": "the law fitted on all seeds' points of the method together (drawn in "
                  "comparison.png)",
    "checks": "the issue's targets on the means over seeds; reported, never enforced",
}


@dataclass
class SeedRun:
    seed: int
    run: Run
    stats: Dict[str, float] = field(default_factory=dict)


@dataclass
class Method:
    label: str
    folder: str
    seeds: List[SeedRun]
    pooled_fit: Optional[EntropyLawFit] = None
    pooled_r2: float = float("nan")


def seed_stats(records: Sequence[Dict]) -> Dict[str, float]:
    """The per-seed numbers of SEED_QUANTITIES (NaN where the run has too little to tell), plus
    how many law points it has and the prefix fit's size."""
    nan = float("nan")
    _, entropy = series(records, "entropy")
    eval_steps, accuracy = series(records, ACCURACY_KEY)
    after_start = accuracy[eval_steps > 0]
    stats = dict(
        initial_entropy=float(entropy[0]) if len(entropy) else nan,
        final_entropy=float(entropy[-1]) if len(entropy) else nan,
        warm_start_accuracy=float(accuracy[0]) if len(accuracy) and eval_steps[0] == 0 else nan,
        final_accuracy=float(after_start[-1]) if len(after_start) else nan,
        law_a=nan, law_b=nan, law_ceiling=nan, law_r2=nan, prefix_rmse=nan,
        law_points=0, prefix_first_k=0,
        last_step=int(records[-1]["step"]) if records else 0)
    _, law_entropy, law_accuracy = entropy_accuracy_points(records, ACCURACY_KEY)
    stats["law_points"] = len(law_entropy)
    if len(law_entropy) < MIN_LAW_POINTS:
        return stats
    try:
        fit = fit_entropy_law(law_entropy, law_accuracy)
    except ValueError:  # the entropies are all equal
        return stats
    stats.update(law_a=fit.a, law_b=fit.b, law_ceiling=fit.ceiling,
                 law_r2=fit.r_squared(law_entropy, law_accuracy))
    first_k = max(2, len(law_entropy) // 3)
    if first_k < len(law_entropy):
        try:
            stats["prefix_rmse"] = predict_from_prefix(law_entropy, law_accuracy, first_k).rmse
            stats["prefix_first_k"] = first_k
        except ValueError:  # the prefix's entropies are all equal
            pass
    return stats


def spread(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean, sample std (ddof=1), min and max of the finite values, and how many there were;
    NaN where undefined (no values; std of one)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    nan = float("nan")
    if not len(x):
        return dict(mean=nan, std=nan, min=nan, max=nan, n=0)
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else nan,
                min=float(x.min()), max=float(x.max()), n=int(len(x)))


@dataclass
class Band:
    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray  # seeds that logged the step


def band(runs: Sequence[Run], key: str) -> Band:
    """Mean and min-max of `key` over runs at every step any of them logged it (a run that
    stopped early leaves the later steps to the others; `count` says how many)."""
    by_step = defaultdict(list)
    for run in runs:
        for step, value in zip(*series(run.records, key)):
            by_step[int(step)].append(float(value))
    steps = sorted(by_step)
    columns = [np.array([f(by_step[s]) for s in steps], dtype=np.float64)
               for f in (np.mean, np.min, np.max, len)]
    return Band(np.array(steps, dtype=np.float64), *columns)


def _flatten(config: Dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_differences(runs: Sequence[Run], ignore_prefix: Optional[str] = None) -> List[str]:
    """Config keys (other than SEED_KEYS and those under `ignore_prefix`) whose values differ
    between the runs."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in SEED_KEYS
            and not (ignore_prefix and k.startswith(ignore_prefix))
            and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _method_rank(label: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def load_methods(root: str) -> Tuple[List[Method], List[str], List[str]]:
    """(methods, skipped run folders with the reason, warnings) of ROOT/<method>/seed_<s>/.
    Folders without seed_<s> runs are ignored; runs marked FAILED or without metrics are
    skipped."""
    methods, skipped, warnings = [], [], []
    for folder in sorted(os.listdir(root)):
        method_dir = os.path.join(root, folder)
        if not os.path.isdir(method_dir):
            continue
        seed_dirs = sorted(((int(m.group(1)), os.path.join(method_dir, name))
                            for name in os.listdir(method_dir)
                            if (m := SEED_DIR.match(name)) and
                            os.path.isdir(os.path.join(method_dir, name))))
        seeds = []
        for seed, run_dir in seed_dirs:
            relative = os.path.relpath(run_dir, root)
            if os.path.exists(os.path.join(run_dir, FAILED_MARKER)):
                skipped.append(f"{relative}: marked {FAILED_MARKER}")
                continue
            if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                skipped.append(f"{relative}: no metrics.jsonl")
                continue
            run = read_run(run_dir, with_probes=False)
            if not run.records:
                skipped.append(f"{relative}: empty metrics.jsonl")
                continue
            seeds.append(SeedRun(seed=seed, run=run, stats=seed_stats(run.records)))
        if not seeds:
            continue
        labels = sorted({s.run.label for s in seeds})
        if len(labels) > 1:
            warnings.append(f"{folder}: the seeds' configs name different methods {labels}; "
                            f"labelled {seeds[0].run.label}")
        differences = _config_differences([s.run for s in seeds])
        if differences:
            warnings.append(f"{folder}: the seeds' configs differ in {', '.join(differences)}")
        method = Method(label=seeds[0].run.label, folder=folder, seeds=seeds)
        _, entropy, accuracy = (np.concatenate(c) for c in zip(
            *(entropy_accuracy_points(s.run.records, ACCURACY_KEY) for s in seeds)))
        if len(entropy) >= MIN_LAW_POINTS:
            try:
                method.pooled_fit = fit_entropy_law(entropy, accuracy)
                method.pooled_r2 = method.pooled_fit.r_squared(entropy, accuracy)
            except ValueError:  # the entropies are all equal
                pass
        methods.append(method)
    differences = _config_differences([m.seeds[0].run for m in methods], "algorithm.")
    if differences:  # e.g. a method left from an earlier invocation with other settings
        warnings.append("the methods' configs differ outside algorithm.*: "
                        f"{', '.join(differences)}")
    labels = [m.label for m in methods]
    for method in methods:  # two folders of one method: tell them apart by folder
        if labels.count(method.label) > 1:
            method.label = f"{method.label} ({method.folder})"
    methods.sort(key=lambda m: _method_rank(m.label))
    return methods, skipped, warnings


def method_summary(method: Method) -> Dict:
    fit = method.pooled_fit
    return {
        "folder": method.folder,
        "seeds": [s.seed for s in method.seeds],
        "per_seed": {str(s.seed): s.stats for s in method.seeds},
        "aggregate": {key: spread([s.stats[key] for s in method.seeds])
                      for key, _ in SEED_QUANTITIES},
        "pooled_law": None if fit is None else dict(
            a=fit.a, b=fit.b, ceiling=fit.ceiling, r2=method.pooled_r2,
            num_points=fit.num_points),
    }


def _mean(summary: Dict, label: str, key: str) -> float:
    return summary[label]["aggregate"][key]["mean"]


def _ok(condition_values: Sequence[float], condition: bool) -> Optional[bool]:
    """None when a number the check needs is undefined, else the condition."""
    return None if any(not math.isfinite(v) for v in condition_values) else bool(condition)


def checks(by_label: Dict[str, Dict]) -> Dict[str, Dict]:
    """The issue's targets on the means over seeds, as facts: each entry has `target`, the
    numbers, `pass` (true / false / null when a method or number is missing) and a one-line
    `text`; the accuracy differences have no target and no `pass`, only the numbers."""
    out = {}

    def missing(name, target, labels):
        absent = [l for l in labels if l not in by_label]
        if absent:
            out[name] = {"target": target, "pass": None, "missing": absent,
                         "text": f"{target}: n/a (no {', '.join(absent)} runs)"}
        return bool(absent)

    target = "GRPO final entropy < 0.4 x its initial entropy"
    if not missing("grpo_entropy_falls", target, ["GRPO"]):
        initial = _mean(by_label, "GRPO", "initial_entropy")
        final = _mean(by_label, "GRPO", "final_entropy")
        ratio = final / initial if initial else float("nan")
        out["grpo_entropy_falls"] = {
            "target": target, "initial": initial, "final": final, "ratio": ratio,
            "pass": _ok([initial, final], final < 0.4 * initial),
            "text": f"{target}: {final:.4g} / {initial:.4g} = {ratio:.3f}"}
    for label in ("Clip-Cov", "KL-Cov"):
        name = f"{label.lower().replace('-', '_')}_holds_entropy"
        target = f"{label} final entropy >= 2 x GRPO's"
        if missing(name, target, [label, "GRPO"]):
            continue
        value = _mean(by_label, label, "final_entropy")
        grpo = _mean(by_label, "GRPO", "final_entropy")
        ratio = value / grpo if grpo else float("nan")
        out[name] = {"target": target, "value": value, "grpo": grpo, "ratio": ratio,
                     "pass": _ok([value, grpo], value >= 2.0 * grpo),
                     "text": f"{target}: {value:.4g} / {grpo:.4g} = {ratio:.3f}"}
    target = "GRPO law: a > 0, ceiling b - a in [0, 1], R^2 >= 0.8 (means of per-seed fits)"
    if not missing("grpo_law", target, ["GRPO"]):
        a, ceiling, r2 = (_mean(by_label, "GRPO", k) for k in ("law_a", "law_ceiling", "law_r2"))
        parts = {"a_positive": _ok([a], a > 0),
                 "ceiling_in_0_1": _ok([ceiling], 0.0 <= ceiling <= 1.0),
                 "r2_at_least_0.8": _ok([r2], r2 >= 0.8)}
        out["grpo_law"] = {
            "target": target, "a": a, "ceiling": ceiling, "r2": r2, **parts,
            "pass": None if None in parts.values() else all(parts.values()),
            "text": f"{target}: a = {a:.4g}, ceiling = {ceiling:.4g}, R^2 = {r2:.3f}"}
    for label in ("Clip-Cov", "KL-Cov"):
        name = f"{label.lower().replace('-', '_')}_minus_grpo_final_accuracy"
        target = f"{label} final held-out accuracy - GRPO's"
        if missing(name, target, [label, "GRPO"]):
            continue
        mine = by_label[label]["per_seed"]
        grpo = by_label["GRPO"]["per_seed"]
        common = sorted(set(mine) & set(grpo), key=int)
        paired = spread([mine[s]["final_accuracy"] - grpo[s]["final_accuracy"] for s in common])
        diff = (_mean(by_label, label, "final_accuracy")
                - _mean(by_label, "GRPO", "final_accuracy"))
        out[name] = {
            "target": target, "difference_of_means": diff,
            label: by_label[label]["aggregate"]["final_accuracy"],
            "GRPO": by_label["GRPO"]["aggregate"]["final_accuracy"],
            "paired_seeds": [int(s) for s in common], "paired_difference": paired,
            "text": f"{target}: {diff:+.4f} (per seed {_cell(paired)} over seeds "
                    f"{','.join(common) or '-'})"}
    return out


def _num(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def _cell(s: Dict) -> str:
    """mean ±std [min, max] of a spread (the mean alone for one seed)."""
    if not s["n"]:
        return "-"
    if s["n"] == 1:
        return f"{_num(s['mean'])} (1 seed)"
    return f"{_num(s['mean'])} ±{_num(s['std'])} [{_num(s['min'])}, {_num(s['max'])}]"


def format_table(summary: Dict, methods_per_table: int = 3) -> str:
    """The summary as text: one column per method (at most `methods_per_table` side by side),
    one row per quantity, each cell "mean ±std [min, max]" over seeds; then the pooled law, the
    checks, skipped runs and warnings."""
    labels = list(summary["methods"])
    def law_points(m):
        counts = sorted(stats["law_points"] for stats in m["per_seed"].values())
        return str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"

    rows = [("seeds", lambda m: ",".join(str(s) for s in m["seeds"])),
            ("law points/seed", law_points)]
    rows += [(name, lambda m, key=key: _cell(m["aggregate"][key])) for key, name in SEED_QUANTITIES]
    pooled = lambda m, k: _num(m["pooled_law"][k]) if m["pooled_law"] else "-"  # noqa: E731
    rows += [("pooled law a, b", lambda m: f"{pooled(m, 'a')}, {pooled(m, 'b')}"),
             ("pooled ceiling, R^2", lambda m: f"{pooled(m, 'ceiling')}, {pooled(m, 'r2')}")]
    lines = []
    name_width = max(len(name) for name, _ in rows)
    for start in range(0, len(labels), methods_per_table):
        chunk = labels[start:start + methods_per_table]
        cells = [[cell(summary["methods"][label]) for label in chunk] for _, cell in rows]
        widths = [max(len(label), *(len(row[i]) for row in cells)) for i, label in enumerate(chunk)]
        header = " " * name_width + "  " + "  ".join(l.ljust(w) for l, w in zip(chunk, widths))
        if start:
            lines.append("")
        lines += [header.rstrip(), "-" * len(header.rstrip())]
        for (name, _), row in zip(rows, cells):
            lines.append(name.ljust(name_width) + "  "
                         + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append("cells: mean ±std [min, max] over seeds; final entropy = last logged value; "
                 "prefix RMSE: law fitted on the first third of the evaluations")
    lines.append("checks (on the means over seeds; reported, not enforced):")
    for check in summary["checks"].values():
        verdict = {True: "PASS", False: "FAIL", None: "n/a ", "fact": "    "}[
            check.get("pass", "fact")]
        lines.append(f"  {verdict} {check['text']}")
    lines += [f"skipped: {s}" for s in summary["skipped"]]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def draw_band(ax, b: Band, color, label: str) -> None:
    if not len(b.steps):
        return
    ax.fill_between(b.steps, b.low, b.high, color=color, alpha=0.15, linewidth=0)
    ax.plot(b.steps, b.mean, color=color, marker="o" if len(b.steps) < 30 else None,
            markersize=3, label=label)


def plot_comparison(methods: Sequence[Method], out_path: str) -> str:
    """comparison.png: entropy, held-out accuracy and covariance vs step as mean over seeds with
    the min-max band, and accuracy vs entropy with each seed's points (faint) and the method's
    pooled law down to H = 0 (its ceiling starred)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (entropy_ax, accuracy_ax), (law_ax, cov_ax) = axes
    for index, method in enumerate(methods):
        color = f"C{index}"
        runs = [s.run for s in method.seeds]
        label = f"{method.label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        draw_band(entropy_ax, band(runs, "entropy"), color, label)
        draw_band(accuracy_ax, band(runs, ACCURACY_KEY), color, label)
        draw_band(cov_ax, band(runs, COVARIANCE_KEY), color, label)
        entropy_max = 0.0
        for seed_index, run in enumerate(runs):
            _, entropy, accuracy = entropy_accuracy_points(run.records, ACCURACY_KEY)
            if len(entropy):
                law_ax.scatter(entropy, accuracy, s=12, alpha=0.4, color=color, linewidths=0,
                               label=f"{method.label}: seeds' points" if seed_index == 0 else None)
                entropy_max = max(entropy_max, float(entropy.max()))
        if method.pooled_fit is not None:
            draw_law_curve(law_ax, method.pooled_fit, entropy_max, color, method.label,
                           detail=f" (R^2 {method.pooled_r2:.2f})")
    for ax, ylabel, title in (
            (entropy_ax, "policy entropy", "entropy vs step"),
            (accuracy_ax, "held-out accuracy", "held-out accuracy (eval_accuracy) vs step"),
            (cov_ax, "mean Cov(log pi, A)", "covariance of log-prob and advantage")):
        ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: mean, min-max over seeds")
    cov_ax.axhline(0.0, color="k", linewidth=0.8)
    law_ax.set(xlabel="policy entropy H", ylabel="held-out accuracy R",
               title="accuracy vs entropy: law fitted on all seeds")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    return save_figure(fig, out_path)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def compare_root(root: str, png_path: Optional[str] = None,
                 json_path: Optional[str] = None) -> Dict:
    """Aggregate ROOT/<method>/seed_<s>/ runs: write the figure (ROOT/comparison.png) and
    summary.json (ROOT/summary.json, NaN written as null) and return the summary (with NaN).
    Raises FileNotFoundError when ROOT holds no run."""
    methods, skipped, warnings = load_methods(root)
    if not methods:
        raise FileNotFoundError(f"{root}: no runs in <method>/seed_<s>/ folders"
                                + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    by_label = {m.label: method_summary(m) for m in methods}
    summary = {"root": os.path.abspath(root), "notes": NOTES, "methods": by_label,
               "checks": checks(by_label), "skipped": skipped, "warnings": warnings}
    summary["figure"] = plot_comparison(methods, png_path or os.path.join(root, "comparison.png"))
    json_path = json_path or os.path.join(root, "summary.json")
    with open(json_path, "w") as f:
        json.dump(_finite_or_none(summary), f, indent=1)
    summary["summary_json"] = json_path
    return summary
