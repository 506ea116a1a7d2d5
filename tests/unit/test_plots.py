"""PNG figures from synthetic run folders: one run's panels, the comparison of three methods, and
the two command-line tools."""
import json
import os
import runpy
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from megatron_rl.analysis.entropy_law import fit_entropy_law
from megatron_rl.analysis.plots import (draw_law, plot_runs, read_metrics, read_run, read_runs,
                                        write_run_plots)
from megatron_rl.analysis.probe import EntropyProbe, save_probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, loss_mode, entropy_floor, steps=60, seed=0, probe=False):
    """A run folder shaped like the trainer's: config.json, metrics.jsonl (step-0 eval line, then
    one record per step, eval every 3 steps) and optionally one saved probe."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"algorithm": {"loss_mode": loss_mode, "eps_low": 0.2, "eps_high": 0.2}}, f)
    rng = np.random.default_rng(seed)
    records = [{"step": 0, "eval_accuracy": 0.2}]
    for step in range(1, steps + 1):
        entropy = entropy_floor + 1.5 * np.exp(-step / 15)
        record = {"step": step, "entropy": entropy, "reward_mean": 0.5,
                  "cov_mean": 0.02 * np.exp(-step / 20) + rng.normal(0, 1e-3)}
        if step % 3 == 0:
            record["eval_accuracy"] = -0.1 * np.exp(entropy) + 0.9 + rng.normal(0, 0.01)
        records.append(record)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if probe:
        predicted = torch.tensor(rng.normal(0, 1e-3, 300))
        actual = predicted * 0.9 + torch.tensor(rng.normal(0, 1e-4, 300))
        save_probe(run_dir, 10, EntropyProbe(actual=actual, predicted=predicted,
                                             entropy_before=torch.ones(300),
                                             metrics={"probe/correlation": 0.99,
                                                      "probe/slope": 0.9}))
    return run_dir


def assert_png(path, min_bytes=8000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    image = plt.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_single_run_panels(tmp_path):
    run_dir = make_run(str(tmp_path), "grpo", "ppo_clip", 0.2, probe=True)
    paths = write_run_plots(run_dir)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["accuracy.png", "covariance.png", "entropy.png", "entropy_law.png",
                     "probe.png", "summary.png"]
    for path in paths:
        assert os.path.dirname(path) == os.path.join(run_dir, "plots")
        assert_png(path)


def test_a_diverged_run_still_plots(tmp_path):
    """A probe of a step whose groups were all filtered has no token; a diverged run's entropy
    is NaN. Plotting them is no reason to fail the job at its end (it did: rc 1)."""
    run_dir = make_run(str(tmp_path), "diverged", "ppo_clip", 0.2, probe=True)
    empty = torch.zeros(0)
    save_probe(run_dir, 20, EntropyProbe(actual=empty, predicted=empty, entropy_before=empty,
                                         metrics={}))
    nan = torch.full((5,), float("nan"))
    save_probe(run_dir, 30, EntropyProbe(actual=nan, predicted=nan, entropy_before=nan,
                                         metrics={}))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 61, "entropy": float("nan"), "reward_mean": 0.0}) + "\n")
    for path in write_run_plots(run_dir):
        assert_png(path)


def test_law_panel_draws_the_fit_and_its_ceiling(tmp_path):
    run = read_run(make_run(str(tmp_path), "grpo", "ppo_clip", 0.2))
    fig, ax = plt.subplots()
    draw_law(ax, [run])
    entropy = np.array([r["entropy"] for r in run.records
                        if "entropy" in r and "eval_accuracy" in r])
    accuracy = np.array([r["eval_accuracy"] for r in run.records
                         if "entropy" in r and "eval_accuracy" in r])
    fit = fit_entropy_law(entropy, accuracy)
    lines = {line.get_label(): line for line in ax.get_lines()}
    curve = next(line for label, line in lines.items() if label.startswith("GRPO: R ="))
    assert curve.get_xdata()[0] == 0.0  # drawn down to H = 0
    assert curve.get_ydata()[0] == pytest.approx(fit.ceiling)
    star = lines[f"GRPO: ceiling {fit.ceiling:.3f}"]
    assert star.get_ydata()[0] == pytest.approx(fit.ceiling)
    assert fit.ceiling == pytest.approx(0.8, abs=0.03)
    plt.close(fig)


def test_comparison_of_three_methods(tmp_path):
    dirs = [make_run(str(tmp_path), name, mode, floor, seed=i)
            for i, (name, mode, floor) in enumerate(
                [("grpo", "ppo_clip", 0.1), ("clipcov", "clip_cov", 0.5),
                 ("klcov", "kl_cov", 0.6)])]
    runs = read_runs(dirs)
    assert [r.label for r in runs] == ["GRPO", "Clip-Cov", "KL-Cov"]
    out = plot_runs(runs, str(tmp_path / "compare.png"))
    assert_png(out, min_bytes=20000)


def test_resumed_metrics_and_duplicate_labels(tmp_path):
    first = make_run(str(tmp_path), "a", "ppo_clip", 0.2)
    with open(os.path.join(first, "metrics.jsonl"), "a") as f:  # resumed from a step-50 checkpoint
        f.write(json.dumps({"step": 51, "entropy": 9.0}) + "\n")
    records = read_metrics(os.path.join(first, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(61))
    assert records[51] == {"step": 51, "entropy": 9.0}
    second = make_run(str(tmp_path), "b", "ppo_clip", 0.3)
    assert [r.label for r in read_runs([first, second])] == ["GRPO (a)", "GRPO (b)"]


def run_tool(name, args, capsys):
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(ROOT, "tools", name), run_name="__main__")
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().out


def test_tools(tmp_path, capsys):
    grpo = make_run(str(tmp_path), "grpo", "ppo_clip", 0.2, probe=True)
    klcov = make_run(str(tmp_path), "klcov", "kl_cov", 0.5, seed=3)

    code, out = run_tool("fit_entropy_law.py", [grpo, "--first-k", "8"], capsys)
    assert code == 0, out
    assert "first   8 pts" in out and "predicting the other 12" in out
    rmse = float(out.split("RMSE = ")[1].split()[0])
    assert 0.3 < rmse < 3.0  # points; the synthetic noise is 1 point
    assert_png(os.path.join(grpo, "plots", "entropy_law.png"))

    code, out = run_tool("plot_runs.py", [grpo, klcov, "--out", str(tmp_path / "cmp.png")], capsys)
    assert code == 0, out
    assert_png(str(tmp_path / "cmp.png"), min_bytes=20000)
    code, _ = run_tool("plot_runs.py", [grpo, "--out", str(tmp_path / "one.png"),
                                        "--panels-dir", str(tmp_path / "panels")], capsys)
    assert code == 0
    assert_png(str(tmp_path / "one.png"))
    assert_png(str(tmp_path / "panels" / "probe.png"))
