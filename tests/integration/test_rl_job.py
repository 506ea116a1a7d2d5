"""The RL job end to end under torchrun with TP=2 on CPU: rewards are computed, metrics are
finite, the policy moves, the KL to the reference policy and the entropy bonus run, and a run
resumed from a checkpoint reproduces the uninterrupted run's metrics exactly (so its rebuilt
reference policy is the initial one)."""
import json
import math
import os
import shutil

import pytest

from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed
TIMING = {"rollout_time_s", "train_time_s", "step_time_s", "rollout_tokens_per_s",
          "train_tokens_per_s"}


def job_args(out_dir, cache_dir, extra=()):
    return ["--config", "tests/configs/tiny_addition.yaml", f"training.output_dir={out_dir}",
            f"training.cache_dir={cache_dir}", "training.sft_steps=150", "data.digits=1",
            "training.steps=4",
            "training.checkpoint_interval=2", "training.keep_checkpoints=3",
            "training.eval_interval=2", "rollout.prompts_per_step=8", "algorithm.n=4",
            "parallel.tensor_model_parallel_size=2", "model.make_vocab_size_divisible_by=4",
            "algorithm.loss_mode=clip_cov", "algorithm.r=0.05", "algorithm.omega_low=0.0",
            *extra]


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


# Regularisers on in the TP=2 job: a KL to the frozen reference policy (the warm-started
# initial weights) and the entropy bonus.
REGULARISERS = ["algorithm.kl_ref_coef=0.05", "algorithm.entropy_coef=0.001"]


def test_rl_job_tp2_and_exact_resume(tmp_path, warm_start_cache):
    full, resumed, cache = tmp_path / "full", tmp_path / "resumed", warm_start_cache
    run_torchrun("megatron_rl/train.py", 2, job_args(full, cache, REGULARISERS))
    records = read_metrics(full / "metrics.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0.0 <= r["reward_mean"] <= 1.0 and "rollout/reward_std" in r
        assert r["weight_version"] == r["step"]
    # The second mini-batch of a step is trained on a policy the first one moved.
    updated = [r for r in steps if r.get("update_ok")]
    assert updated and all(r["ppo_kl"] != 0.0 for r in updated)
    assert any(r.get("clip_cov_frac", 0) > 0 for r in steps)  # Clip-Cov selected tokens
    # The policy starts as the reference (KL 0 on the first mini-batch) and moves from it.
    first_update = min(r["step"] for r in updated)
    assert all(r["kl_ref"] >= 0 for r in steps if "kl_ref" in r)
    later = [r["kl_ref"] for r in steps if r["step"] > first_update and "kl_ref" in r]
    assert later and all(kl > 0 for kl in later)
    assert all(r["entropy"] > 0 for r in updated)
    assert sorted(os.listdir(full / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]

    # Resume: only the step-2 checkpoint, then continue to step 4.
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_00000002",
                    resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    out = run_torchrun("megatron_rl/train.py", 2,
                       ["--resume", "auto"] + job_args(resumed, cache, REGULARISERS))
    assert "resumed from" in out
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in again] == [3, 4]
    for want, got in zip(steps[2:], again):
        assert {k: v for k, v in got.items() if k not in TIMING} == \
               {k: v for k, v in want.items() if k not in TIMING}

    # A new run initialised from the final weights evaluates (greedily) exactly as they did.
    fresh = tmp_path / "fresh"
    run_torchrun("megatron_rl/train.py", 2, job_args(fresh, cache, REGULARISERS + [
        "training.sft_steps=0", "training.steps=1",
        f"training.init_checkpoint={full / 'checkpoints' / 'step_00000004'}"]))
    first = read_metrics(fresh / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["eval_accuracy"] == steps[-1]["eval_accuracy"]


def test_rl_job_pp2(tmp_path, warm_start_cache):
    args = job_args(tmp_path / "pp2", warm_start_cache, [
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
        "training.steps=2", "algorithm.loss_mode=kl_cov", "algorithm.k=0.05"])
    run_torchrun("megatron_rl/train.py", 2, args)
    steps = [r for r in read_metrics(tmp_path / "pp2" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    assert any(r.get("kl_cov_frac", 0) > 0 for r in steps)
