"""The RL job with SGLang engines (a real CPU server) under torchrun, TP=2: after every step's
weight sync the engine samples from the trained weights (the trainer's recomputed log-probs equal
the engine's rollout log-probs), the version follows the step; and when the engine keeps dying the
job stops with a clear message and a checkpoint that resumes."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_rl.ports import free_port
from tests.torchrun import ROOT, run_torchrun, sglang_python

pytestmark = pytest.mark.distributed


def job_args(out_dir, cache_dir, python, extra=()):
    return ["--config", "tests/configs/tiny_addition.yaml", f"training.output_dir={out_dir}",
            f"training.cache_dir={cache_dir}", "training.sft_steps=100", "data.digits=1",
            "training.steps=3", "training.checkpoint_interval=1", "training.eval_interval=3",
            "rollout.prompts_per_step=8", "algorithm.n=4",
            "parallel.tensor_model_parallel_size=2", "model.make_vocab_size_divisible_by=4",
            "rollout.engine=sglang", f"rollout.sglang.python={python}",
            "rollout.sglang.dtype=float32", "rollout.sglang.max_total_tokens=4096",
            "rollout.sglang.startup_timeout_s=300", *extra]


def read_steps(path):
    return [r for r in map(json.loads, open(path)) if "reward_mean" in r]


@pytest.mark.parametrize("sync", ["distributed", "tensor"])
def test_rl_job_with_sglang_engine(tmp_path, sync, warm_start_cache):
    python = sglang_python()
    run_torchrun("megatron_rl/train.py", 2, job_args(
        tmp_path / "run", warm_start_cache, python, [f"rollout.sglang.weight_sync={sync}"]))
    steps = read_steps(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["weight_version"] == r["step"]
        assert r["rollout_weight_version"] == r["step"] - 1  # sampled by the current weights
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        # The engine sampled from exactly the weights the trainer holds (float32 on both sides).
        assert r["rollout_train_logprob_diff"] < 1e-4, r
    assert "eval_accuracy" in steps[-1]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])]  # no orphaned server


def test_async_rollout_is_one_version_behind_and_corrected(tmp_path, warm_start_cache):
    run_torchrun("megatron_rl/train.py", 2, job_args(
        tmp_path / "run", warm_start_cache, sglang_python(),
        ["training.steps=4", "rollout.async_rollout=true", "algorithm.rollout_is_cap=2.0"]))
    steps = read_steps(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Step 1 samples synchronously; step t >= 2 trains on samples generated during step t-1
    # by the weights before its update, version t-2.
    assert [r["rollout_weight_version"] for r in steps] == [0, 0, 1, 2]
    assert [r["weight_version"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["rollout_train_logprob_diff"] < 1e-4
    # one version behind: the trainer's log-probs differ from the engine's, and TIS weighs them
    assert all(r["rollout_train_logprob_diff"] > 1e-4 for r in steps[1:])
    assert all(0 < r["rollout_is_weight"] <= 2.0 for r in steps if "rollout_is_weight" in r)
    assert any("rollout_is_weight" in r for r in steps)


def test_engine_that_keeps_dying_stops_the_job_with_a_checkpoint(tmp_path, warm_start_cache):
    python = sglang_python()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "megatron_rl/train.py",
           *map(str, job_args(run_dir, warm_start_cache, python, [
               "training.steps=50", "training.eval_interval=0", "rollout.sglang.max_restarts=0"]))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and job.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(read_steps(metrics)) >= 2:
                break
            time.sleep(1)
        servers = [p for p in psutil.process_iter(["cmdline"])
                   if "sglang.launch_server" in " ".join(p.info["cmdline"] or [])
                   and str(run_dir) in " ".join(p.info["cmdline"] or [])]
        assert servers and job.poll() is None, open(tmp_path / "job.log").read()[-5000:]
        for p in servers:
            os.killpg(p.pid, signal.SIGKILL)
        rc = job.wait(300)
    out = open(tmp_path / "job.log").read()
    assert rc != 0 and "rollout engines failed" in out and "max_restarts=0" in out, out[-5000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    done = int(latest.split("_")[1])
    assert done >= 2
    # The checkpoint resumes (with the built-in engine: nothing of the dead engine is needed).
    out = run_torchrun("megatron_rl/train.py", 2, ["--resume", "auto"] + job_args(
        run_dir, warm_start_cache, python, [f"training.steps={done + 1}",
                                              "training.eval_interval=0",
                                              "rollout.engine=builtin"]))
    assert "resumed from" in out
    assert read_steps(run_dir / "metrics.jsonl")[-1]["step"] == done + 1
