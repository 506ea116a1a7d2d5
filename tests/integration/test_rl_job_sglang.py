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

from megatron_rl.parallel.state import free_port
from tests.torchrun import ROOT, run_torchrun, sglang_python

pytestmark = pytest.mark.distributed


def job_args(out_dir, cache_dir, python, extra=()):
    return ["--config", "examples/tiny_cpu.yaml", f"training.output_dir={out_dir}",
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
def test_rl_job_with_sglang_engine(tmp_path, sync):
    python = sglang_python()
    run_torchrun("megatron_rl/train.py", 2, job_args(
        tmp_path / "run", tmp_path / "cache", python, [f"rollout.sglang.weight_sync={sync}"]))
    steps = read_steps(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["weight_version"] == r["step"]
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        # The engine sampled from exactly the weights the trainer holds (float32 on both sides).
        assert r["rollout_train_logprob_diff"] < 1e-4, r
    assert "eval_accuracy" in steps[-1]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])]  # no orphaned server
