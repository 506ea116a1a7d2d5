"""The RL job on a verl-format jsonl dataset with an HF tokenizer and chat template, scored by
math-verify in worker processes: rows are read, bad rows skipped and counted, rewards computed."""
import json
import math

import pytest

from tests.tiny_tokenizer import save_word_tokenizer
from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed
WORDS = "what is plus minus the answer 0 1 2 3 4 5 6 7 8 9 ?"


def test_rl_job_on_jsonl_with_math_reward(tmp_path):
    tokenizer_dir = save_word_tokenizer(tmp_path / "tokenizer", WORDS)
    rows = [{"prompt": [{"role": "user", "content": f"what is {a} plus {b} ?"}],
             "reward_model": {"ground_truth": str(a + b)}} for a in range(5) for b in range(5)]
    rows[3] = {"prompt": [{"role": "user", "content": "what is 1 plus 1 ?"}]}  # no answer field
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_torchrun("megatron_rl/train.py", 2, [
        "--config", "tests/configs/tiny_addition.yaml", "data.task=dataset", f"data.path={data}",
        f"data.tokenizer_dir={tokenizer_dir}", "data.on_invalid=skip", "data.eval_prompts=8",
        "model.vocab_size=64", "model.make_vocab_size_divisible_by=4",
        "parallel.tensor_model_parallel_size=2", "training.sft_steps=0", "training.steps=2",
        "training.eval_interval=2", "training.probe_interval=0", "rollout.prompts_per_step=4",
        "algorithm.n=4", "reward.fn=math", "reward.workers=1", f"training.output_dir={out}"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(v) for r in steps for v in r.values() if isinstance(v, float))
    assert steps[0]["data/skipped_missing_field"] == 1
    assert steps[-1]["reward/timeout_total"] == 0 and steps[-1]["reward/error_total"] == 0
    assert "eval_accuracy" in records[-1]
