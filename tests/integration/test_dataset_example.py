"""The README's "Your data" commands: tools/make_example_data.py, then the RL job on
examples/dataset_cpu.yaml (data.task=dataset, the example tokenizer, the clock_walk verifier in
reward workers) runs 2 steps and evaluates, with no verifier fault."""
import json
import math
import os
import subprocess
import sys

from tests.torchrun import ROOT


def run(args, timeout=300, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_dataset_example_runs_two_steps(tmp_path):
    # the config's relative paths (runs/example_data/...) resolve in the job's folder
    data, out = tmp_path / "runs" / "example_data", tmp_path / "run"
    run(["tools/make_example_data.py", str(data)])
    run(["-m", "megatron_rl.train", "--config", os.path.join(ROOT, "examples/dataset_cpu.yaml"),
         "training.steps=2", "training.eval_interval=2", f"training.output_dir={out}"],
        cwd=tmp_path)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["update_ok"] == 1.0 and r["num_tokens"] > 0 for r in steps)
    assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    last = steps[-1]
    assert last["reward/error_total"] == 0 and last["reward/timeout_total"] == 0
    assert last["reward/invalid_total"] == 0
    assert "eval_accuracy" in records[-1]
    # both held-out sets are evaluated; the law's accuracy is their weighted mean (wide: 0)
    assert records[-1]["eval_accuracy"] == records[-1]["eval/heldout/accuracy"]
    assert {"eval/wide/accuracy", "eval/wide/pass@2", "eval/heldout/truncated"} <= set(records[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["reward"]["fn"] == "megatron_rl.rewards.clock_walk:reward"
