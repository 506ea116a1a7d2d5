"""Seed aggregation (analysis/compare.py, tools/compare_runs.py) on synthetic run folders with
known curves: 2 methods x 3 seeds laid out as ROOT/<method>/seed_<s>/."""
import json
import math
import os
import runpy
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from megatron_rl.analysis.compare import band, compare_root, format_table, load_methods
from megatron_rl.analysis.plots import method_name, read_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = (0, 1, 2)
STEPS = 30
EVAL_EVERY = 3  # 10 law points per run: the prefix fit uses the first 3
GRPO_A, GRPO_B = 0.1, 0.9  # every GRPO seed lies exactly on R = -0.1 e^H + 0.9
CC_A, CC_B, CC_SHIFT = 0.2, 1.1, 0.05  # Clip-Cov: on its law for 3 evals, then 0.05 above it


def entropy(step, floor, seed):
    return floor + (1.0 + 0.1 * seed) * math.exp(-step / 8.0)


def write_run(run_dir, algorithm, records):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"algorithm": algorithm, "rollout": {"seed": records[0]["seed"]},
                   "training": {"output_dir": run_dir, "lr": 1e-3}}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "seed"}) + "\n"
                     for r in records)


def grpo_records(seed, steps=STEPS):
    records = [{"step": 0, "eval_accuracy": 0.3 + 0.01 * seed, "seed": seed}]
    for step in range(1, steps + 1):
        h = entropy(step, 0.1, seed)
        record = {"step": step, "entropy": h, "cov_mean": 0.01 * (seed + 1) / step}
        if step % EVAL_EVERY == 0:
            record["eval_accuracy"] = -GRPO_A * math.exp(h) + GRPO_B
        records.append(record)
    return records


def clip_cov_records(seed, floor=0.5):
    records = [{"step": 0, "eval_accuracy": 0.3 + 0.01 * seed, "seed": seed}]
    for step in range(1, STEPS + 1):
        h = entropy(step, floor, seed)
        record = {"step": step, "entropy": h, "cov_mean": -0.01}
        if step % EVAL_EVERY == 0:
            record["eval_accuracy"] = (-CC_A * math.exp(h) + CC_B
                                       + (CC_SHIFT if step > 3 * EVAL_EVERY else 0.0))
        records.append(record)
    return records


def make_root(root, clip_cov_floor=0.5):
    for seed in SEEDS:
        write_run(os.path.join(root, "grpo", f"seed_{seed}"),
                  {"loss_mode": "ppo_clip", "eps_low": 0.2, "eps_high": 0.2, "seed": seed},
                  grpo_records(seed))
        write_run(os.path.join(root, "clip_cov", f"seed_{seed}"),
                  {"loss_mode": "clip_cov", "eps_low": 0.2, "eps_high": 0.2, "seed": seed},
                  clip_cov_records(seed, clip_cov_floor))
    return root


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    image = plt.imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # something drawn


def expected_spread(values):
    values = np.array(values)
    return dict(mean=values.mean(), std=values.std(ddof=1), min=values.min(), max=values.max(),
                n=len(values))


def assert_spread(got, values):
    want = expected_spread(values)
    assert got["n"] == want["n"]
    for key in ("mean", "std", "min", "max"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_aggregates_laws_prefix_and_checks(tmp_path):
    root = make_root(str(tmp_path))
    summary = compare_root(root)
    assert list(summary["methods"]) == ["GRPO", "Clip-Cov"]  # named from config.json, ordered
    assert summary["warnings"] == [] and summary["skipped"] == []
    grpo, cc = summary["methods"]["GRPO"], summary["methods"]["Clip-Cov"]
    assert grpo["seeds"] == [0, 1, 2] and grpo["folder"] == "grpo"

    # entropy: the first and the last logged value of each seed, aggregated over seeds
    assert_spread(grpo["aggregate"]["initial_entropy"], [entropy(1, 0.1, s) for s in SEEDS])
    assert_spread(grpo["aggregate"]["final_entropy"], [entropy(STEPS, 0.1, s) for s in SEEDS])
    assert_spread(cc["aggregate"]["final_entropy"], [entropy(STEPS, 0.5, s) for s in SEEDS])
    assert_spread(grpo["aggregate"]["warm_start_accuracy"], [0.3 + 0.01 * s for s in SEEDS])
    grpo_final_acc = [-GRPO_A * math.exp(entropy(STEPS, 0.1, s)) + GRPO_B for s in SEEDS]
    assert_spread(grpo["aggregate"]["final_accuracy"], grpo_final_acc)

    # GRPO lies exactly on its law: every per-seed fit and the pooled fit recover it, R^2 = 1,
    # and the prefix fit predicts the rest without error
    for key, value in (("law_a", GRPO_A), ("law_b", GRPO_B), ("law_ceiling", GRPO_B - GRPO_A),
                       ("law_r2", 1.0)):
        agg = grpo["aggregate"][key]
        assert agg["mean"] == pytest.approx(value, abs=1e-9), key
        assert agg["max"] - agg["min"] < 1e-9
    assert grpo["aggregate"]["prefix_rmse"]["max"] < 1e-9
    pooled = grpo["pooled_law"]
    assert ((pooled["a"], pooled["b"], pooled["r2"])
            == pytest.approx((GRPO_A, GRPO_B, 1.0), abs=1e-9))
    assert pooled["num_points"] == 3 * STEPS // EVAL_EVERY
    # Clip-Cov: its first third (3 evals) is exactly on R = -0.2 e^H + 1.1 and the other 7 sit
    # 0.05 above, so the prefix fit's RMSE on them is 0.05
    for seed in SEEDS:
        stats = cc["per_seed"][str(seed)]
        assert stats["law_points"] == 10 and stats["prefix_first_k"] == 3
        assert stats["prefix_rmse"] == pytest.approx(CC_SHIFT, rel=1e-6)
        assert stats["law_r2"] < 1.0  # the shift is not on any one law curve

    checks = summary["checks"]
    assert checks["grpo_entropy_falls"]["pass"] is True
    assert checks["grpo_entropy_falls"]["ratio"] == pytest.approx(
        np.mean([entropy(STEPS, 0.1, s) for s in SEEDS])
        / np.mean([entropy(1, 0.1, s) for s in SEEDS]))
    assert checks["clip_cov_holds_entropy"]["pass"] is True
    assert checks["kl_cov_holds_entropy"]["pass"] is None  # no KL-Cov runs
    assert checks["kl_cov_holds_entropy"]["missing"] == ["KL-Cov"]
    assert checks["grpo_law"]["pass"] is True
    diff = checks["clip_cov_minus_grpo_final_accuracy"]
    cc_final_acc = [-CC_A * math.exp(entropy(STEPS, 0.5, s)) + CC_B + CC_SHIFT for s in SEEDS]
    assert diff["difference_of_means"] == pytest.approx(np.mean(cc_final_acc)
                                                        - np.mean(grpo_final_acc))
    assert_spread(diff["paired_difference"], np.subtract(cc_final_acc, grpo_final_acc))
    assert diff["paired_seeds"] == [0, 1, 2]

    # the files: the figure, and summary.json as valid JSON (no NaN) with the same numbers
    assert_png(os.path.join(root, "comparison.png"))
    with open(os.path.join(root, "summary.json")) as f:
        on_disk = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["methods"]["GRPO"]["aggregate"]["final_entropy"]["mean"] == pytest.approx(
        grpo["aggregate"]["final_entropy"]["mean"])
    assert on_disk["checks"]["grpo_law"]["pass"] is True

    table = format_table(summary)
    assert "GRPO" in table.splitlines()[0] and "Clip-Cov" in table.splitlines()[0]
    final_row = next(line for line in table.splitlines() if line.startswith("final entropy"))
    assert f"{np.mean([entropy(STEPS, 0.1, s) for s in SEEDS]):.3f} ±" in final_row
    assert "PASS GRPO final entropy" in table and "n/a  KL-Cov final entropy" in table


def test_checks_fail_when_clip_cov_does_not_hold_entropy(tmp_path):
    # Clip-Cov's floor 0.15 ends at ~1.4x GRPO's final entropy, short of the 2x target
    summary = compare_root(make_root(str(tmp_path), clip_cov_floor=0.15))
    check = summary["checks"]["clip_cov_holds_entropy"]
    assert check["pass"] is False
    assert 1.2 < check["ratio"] < 2.0
    assert "FAIL Clip-Cov final entropy" in format_table(summary)


def test_bands_skipped_runs_and_config_warnings(tmp_path):
    root = str(tmp_path)
    write_run(os.path.join(root, "grpo", "seed_0"), {"loss_mode": "ppo_clip"}, grpo_records(0))
    write_run(os.path.join(root, "grpo", "seed_1"), {"loss_mode": "ppo_clip"},
              grpo_records(1, steps=12))  # stopped early
    write_run(os.path.join(root, "grpo", "seed_2"), {"loss_mode": "ppo_clip"}, grpo_records(2))
    open(os.path.join(root, "grpo", "seed_2", "FAILED"), "w").close()
    os.makedirs(os.path.join(root, "grpo", "seed_3"))  # never started
    for seed in (0, 1):
        write_run(os.path.join(root, "ent", f"seed_{seed}"),
                  {"loss_mode": "ppo_clip", "entropy_coef": 5e-3}, grpo_records(seed))
    config_path = os.path.join(root, "ent", "seed_0", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["training"]["lr"] = 2e-3  # a stale run of other settings
    with open(config_path, "w") as f:
        json.dump(config, f)

    methods, skipped, warnings = load_methods(root)
    assert [m.label for m in methods] == ["GRPO", "entropy bonus"]
    assert [s.seed for s in methods[0].seeds] == [0, 1]
    assert sorted(skipped) == [os.path.join("grpo", "seed_2") + ": marked FAILED",
                               os.path.join("grpo", "seed_3") + ": no metrics.jsonl"]
    assert warnings == ["ent: the seeds' configs differ in training.lr",  # not a seed key
                        "the methods' configs differ outside algorithm.*: training.lr"]

    b = band([s.run for s in methods[0].seeds], "entropy")
    assert list(b.steps) == list(range(1, STEPS + 1))
    assert list(b.count) == [2] * 12 + [1] * (STEPS - 12)
    assert (b.low[0] == pytest.approx(entropy(1, 0.1, 0))
            and b.high[0] == pytest.approx(entropy(1, 0.1, 1)))
    assert b.mean[20] == pytest.approx(entropy(21, 0.1, 0))  # seed 1 stopped at step 12


def test_one_seed_has_no_std(tmp_path):
    root = str(tmp_path)
    write_run(os.path.join(root, "grpo", "seed_4"), {"loss_mode": "ppo_clip"}, grpo_records(4))
    summary = compare_root(root)
    agg = summary["methods"]["GRPO"]["aggregate"]["final_entropy"]
    assert agg["n"] == 1 and math.isnan(agg["std"]) and agg["min"] == agg["max"] == agg["mean"]
    with open(os.path.join(root, "summary.json")) as f:
        assert json.load(f)["methods"]["GRPO"]["aggregate"]["final_entropy"]["std"] is None
    assert "(1 seed)" in format_table(summary)


@pytest.mark.parametrize("algorithm, name", [
    ({"loss_mode": "ppo_clip", "eps_low": 0.2, "eps_high": 0.2}, "GRPO"),
    ({"loss_mode": "ppo_clip", "eps_low": 0.2, "eps_high": 0.28}, "Clip-higher"),
    ({"loss_mode": "ppo_clip", "entropy_coef": 5e-3}, "entropy bonus"),
    ({"loss_mode": "ppo_clip", "kl_ref_coef": 0.01, "entropy_coef": 0.0}, "ref-KL"),
    ({"loss_mode": "kl_cov", "kl_ref_coef": 0.01}, "KL-Cov + ref-KL"),
    ({"loss_mode": "clip_cov"}, "Clip-Cov"),
])
def test_method_names(algorithm, name):
    assert method_name({"algorithm": algorithm}) == name


def test_tool(tmp_path, capsys):
    root = make_root(str(tmp_path / "runs"))
    argv = sys.argv
    sys.argv = ["compare_runs.py", root, "--out", str(tmp_path / "c.png")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(ROOT, "tools", "compare_runs.py"), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert_png(str(tmp_path / "c.png"))
    assert os.path.exists(os.path.join(root, "summary.json"))
    assert "law R^2" in out and "PASS GRPO law" in out
    # an empty root is an error (exit 1), not an empty table
    sys.argv = ["compare_runs.py", str(tmp_path / "runs" / "grpo" / "seed_0")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(ROOT, "tools", "compare_runs.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 1
    assert read_run(os.path.join(root, "grpo", "seed_0")).label == "GRPO"


def test_too_few_evaluations_leave_the_law_undefined(tmp_path):
    # 3 (entropy, accuracy) points: below MIN_LAW_POINTS, so no fit (2 points would give R^2 = 1)
    root = str(tmp_path)
    for seed in SEEDS:
        write_run(os.path.join(root, "grpo", f"seed_{seed}"), {"loss_mode": "ppo_clip"},
                  grpo_records(seed, steps=3 * EVAL_EVERY))
    summary = compare_root(root)
    grpo = summary["methods"]["GRPO"]
    assert all(grpo["per_seed"][str(s)]["law_points"] == 3 for s in SEEDS)
    for key in ("law_a", "law_r2", "prefix_rmse"):
        assert grpo["aggregate"][key]["n"] == 0
    assert grpo["pooled_law"]["num_points"] == 9  # pooled over the seeds: enough
    assert summary["checks"]["grpo_law"]["pass"] is None
    assert summary["checks"]["grpo_entropy_falls"]["pass"] is not None
    table = format_table(summary)
    assert "law points/seed      3" in table
