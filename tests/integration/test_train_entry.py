"""The job entry point runs under torchrun with TP=2 and rejects bad configs before starting."""
import json
import math
import subprocess
import sys

import pytest

from tests.torchrun import ROOT, run_torchrun


@pytest.mark.distributed
def test_tiny_job_tp2_under_torchrun(tmp_path):
    out = run_torchrun("megatron_rl/train.py", 2, [
        "--config", "examples/tiny_cpu.yaml", "training.steps=30", "training.log_interval=10",
        "parallel.tensor_model_parallel_size=2", "model.make_vocab_size_divisible_by=4",
        f"training.output_dir={tmp_path}"])
    assert "step   30/30" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) and r["update_ok"] for r in records)
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first, f"the tiny model did not learn: loss {first:.3f} -> {last:.3f}"
    assert json.loads((tmp_path / "config.json").read_text())["parallel"]["data_parallel_size"] == 1


def test_bad_config_fails_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.train", "--config", "examples/tiny_cpu.yaml",
         "model.hidden_sise=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'model.hidden_sise' (did you mean 'hidden_size'?)" in proc.stderr
