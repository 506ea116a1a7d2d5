"""A simulated two-node run on one machine: two torchrun agents on 127.0.0.1 (--nnodes 2,
--node-rank 0/1, one process each) run RL steps of the tiny config with TP=2 across the "node"
boundary, then with DP=2 across it; both give finite metrics and the same rewards as the
single-node launch of the same layout."""
import json
import os
import subprocess
import sys

import pytest

from megatron_rl.ports import free_port
from tests.torchrun import ROOT, run_torchrun, sglang_python

pytestmark = pytest.mark.distributed


def job(out, cache, layout):
    return ["megatron_rl/train.py", "--config", "tests/configs/tiny_addition.yaml",
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
    two, one = (rewards(tmp_path / "two" / "metrics.jsonl"),
                rewards(tmp_path / "one" / "metrics.jsonl"))
    assert len(two) == 2 and two == one


def test_two_nodes_with_an_sglang_engine_on_each(tmp_path):
    """DP=2 across the two "nodes"; each node's first rank starts its engine, rank 0 spreads
    requests over both and syncs weights into both (gloo groups across the node boundary)."""
    python = sglang_python()
    run = tmp_path / "two"
    launch_two_nodes(job(run, tmp_path / "cache", [
        "rollout.engine=sglang", f"rollout.sglang.python={python}", "rollout.sglang.dtype=float32",
        "rollout.sglang.max_total_tokens=4096", "rollout.sglang.startup_timeout_s=300"]))
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if "reward_mean" in line]
    assert [r["step"] for r in steps] == [1, 2]
    # both engines served the trained weights: the trainer's log-probs equal the engines'
    assert all(r["rollout_train_logprob_diff"] < 1e-4 for r in steps)
    for node in (0, 1):
        log = open(run / "engines" / f"node{node}_sglang_0.log").read()
        assert "POST /generate" in log and "POST /update_weights_from_distributed" in log, node
