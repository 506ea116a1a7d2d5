"""`python -m megatron_rl.training.sft` builds the cached warm start once and prints its folder;
an RL run started from that folder (training.init_checkpoint, sft_steps=0, what
examples/run_tiny_cpu.sh does for every seed) starts exactly where a run with its own warm start
does."""
import json
import os
import subprocess
import sys

from tests.torchrun import ROOT

TINY = ["training.sft_steps=5", "training.eval_interval=1", "training.probe_interval=0",
        "training.steps=1", "training.tensorboard=false"]


def run(module, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", module, "--config",
                           "tests/configs/tiny_addition.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cached_warm_start_entry(tmp_path):
    cache = f"training.cache_dir={tmp_path / 'cache'}"
    first = run("megatron_rl.training.sft", *TINY, cache)
    path = first.stdout.strip().splitlines()[-1]
    assert os.path.exists(os.path.join(path, "done")), first.stdout
    assert os.path.dirname(path) == str(tmp_path / "cache")
    again = run("megatron_rl.training.sft", *TINY, cache)
    assert again.stdout.strip().splitlines()[-1] == path
    assert "loaded cached SFT weights" in again.stderr
    none = run("megatron_rl.training.sft", "training.sft_steps=0")
    assert none.stdout.strip() == ""

    own, shared = str(tmp_path / "own"), str(tmp_path / "shared")
    run("megatron_rl.train", *TINY, cache, f"training.output_dir={own}")
    run("megatron_rl.train", *TINY, f"training.output_dir={shared}",
        f"training.init_checkpoint={path}", "training.sft_steps=0")
    a, b = records(own), records(shared)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1]
    for key in ("eval_accuracy", "entropy", "cov_mean", "reward_mean"):
        assert a[-1][key] == b[-1][key], key  # bitwise: the same weights, the same draws
    assert a[0]["eval_accuracy"] == b[0]["eval_accuracy"]
