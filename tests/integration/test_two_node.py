"""A simulated two-node run on one machine: two torchrun agents on 127.0.0.1 (--nnodes 2,
--node-rank 0/1, one process each) run RL steps of the tiny config with TP=2 across the "node"
boundary, then with DP=2 across it; both give finite metrics and the same rewards as the
single-node launch of the same layout."""
import json
import os
import subprocess
import sys

import pytest

from megatron_rl.parallel.state import free_port
from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.distributed


def job(out, cache, layout):
    return ["megatron_rl/train.py", "--config", "examples/tiny_cpu.yaml",
            f"training.output_dir={out}", f"training.cache_dir={cache}", "training.sft_steps=30",
            "training.steps=2", "training.eval_interval=0", "training.probe_interval=0",
            "rollout.prompts_per_step=8", "algorithm.n=4", "model.make_vocab_size_divisible_by=4",
            *layout]


def launch_two_nodes(args):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]


def rewards(path):
    return [json.loads(line)["reward_mean"] for line in open(path) if "reward_mean" in line]


@pytest.mark.parametrize("layout", [["parallel.tensor_model_parallel_size=2"], []],
                         ids=["tp2_across_nodes", "dp2_across_nodes"])
def test_two_nodes_match_one_node(tmp_path, layout):
    launch_two_nodes(job(tmp_path / "two", tmp_path / "cache", layout))
    run_torchrun(job(tmp_path / "one", tmp_path / "cache", layout)[0], 2,
                 job(tmp_path / "one", tmp_path / "cache", layout)[1:])
    two, one = rewards(tmp_path / "two" / "metrics.jsonl"), rewards(tmp_path / "one" / "metrics.jsonl")
    assert len(two) == 2 and two == one
