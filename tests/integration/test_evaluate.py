"""python -m megatron_rl.evaluate: a TP=2 training checkpoint scores what its run logged at that
step; its TP=1 conversion (megatron-to-hf, then hf-to-megatron --tp 1; evaluated as two
data-parallel replicas) and the HF folder itself (loaded in memory, TP=2) score the same greedy
numbers; config, data and checkpoint errors exit 2 naming the key, file and row.

One RL step of a dataset-task job (an untrained model, a word tokenizer, a reward that an
untrained model's responses sometimes earn) makes the checkpoint; evaluation sets: a greedy
jsonl set and a sampled parquet set (T=1, k=4), both disjoint from the training prompts."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.tiny_tokenizer import save_word_tokenizer
from tests.torchrun import ROOT, run_torchrun

pytestmark = pytest.mark.distributed
WORKER = "tests/distributed/workers/evaluate_worker.py"
WORDS = "what is plus the answer 0 1 2 3 4 5 6 7 8 9 ?"
GREEDY_KEYS = ("accuracy", "pass@1", "response_tokens", "truncated")


def row(a, b):
    return {"prompt": [{"role": "user", "content": f"what is {a} plus {b} ?"}],
            "reward_model": {"ground_truth": str((a + b) % 10)}}


def run(*args, module="megatron_rl.evaluate"):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", module] if module else [sys.executable]
    proc = subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = save_word_tokenizer(root / "tokenizer", WORDS)
    (root / "train.jsonl").write_text("".join(json.dumps(row(a, b)) + "\n"
                                              for a in range(5) for b in range(5)))
    (root / "greedy.jsonl").write_text("".join(json.dumps(row(a, 1)) + "\n"
                                               for a in range(5, 10)))
    pq.write_table(pa.Table.from_pylist([{"question": f"what is {a} plus 2 ?", "sum": a + 2}
                                         for a in range(5, 9)]), root / "sampled.parquet")
    with open(os.path.join(ROOT, "tests", "configs", "tiny_addition.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"].update(vocab_size=30, make_vocab_size_divisible_by=4)  # padded to 32
    cfg["data"] = {"task": "dataset", "path": str(root / "train.jsonl"),
                   "tokenizer_dir": str(tokenizer), "eval_disjoint": True, "eval_sets": [
                       {"name": "greedy", "path": str(root / "greedy.jsonl"),
                        "max_new_tokens": 6},
                       {"name": "sampled", "path": str(root / "sampled.parquet"),
                        "prompt_key": "question", "answer_key": "sum", "temperature": 1.0,
                        "samples": 4, "weight": 3.0}]}
    cfg["rollout"].update(prompts_per_step=4)
    cfg["algorithm"].update(n=2)
    cfg["training"].update(sft_steps=0, steps=1, eval_interval=1, probe_interval=0,
                           tensorboard=False, output_dir=str(root / "run"))
    cfg["reward"] = {"fn": "tests.integration.reward_fns:answer_word", "workers": 1,
                     "allowed_modules": ["tests.integration.reward_fns"]}
    (root / "job.yaml").write_text(yaml.safe_dump(cfg))
    tp2 = ["parallel.tensor_model_parallel_size=2"]
    run_torchrun("megatron_rl/train.py", 2, ["--config", root / "job.yaml", *tp2])
    with open(root / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    checkpoint = root / "run" / "checkpoints" / "step_00000001"
    rc, log = run(os.path.join(ROOT, "tools", "convert_checkpoint.py"), "megatron-to-hf",
                  "--input", checkpoint, "--output", root / "hf", "--model-config",
                  root / "job.yaml", module=None)
    assert rc == 0, log[-3000:]
    rc, log = run(os.path.join(ROOT, "tools", "convert_checkpoint.py"), "hf-to-megatron",
                  "--input", root / "hf", "--output", root / "tp1", "--tp", 1,
                  "--make-vocab-size-divisible-by", 4, module=None)
    assert rc == 0, log[-3000:]
    config = ["--config", root / "job.yaml"]
    out = run_torchrun(WORKER, 2, [
        # the run's checkpoints/ folder stands for the checkpoint `latest` names
        *config, "--checkpoint", root / "run" / "checkpoints", *tp2, "--then",
        # the HF folder, in memory, TP=2
        *config, "--hf", root / "hf", "--out", root / "hf_eval.json", *tp2, "--then",
        # TP=1 in two data-parallel replicas: 5 greedy prompts split 3 + 2
        *config, "--checkpoint", root / "tp1"])
    reports = {name: json.loads(path.read_text()) for name, path in [
        ("tp2", checkpoint / "eval.json"), ("tp1", root / "tp1" / "eval.json"),
        ("hf", root / "hf_eval.json")]}
    return dict(root=root, logged=logged, reports=reports, out=out)


def test_a_training_checkpoint_scores_what_its_run_logged(job):
    step_1 = job["logged"][-1]
    assert step_1["step"] == 1
    report = job["reports"]["tp2"]
    assert report["step"] == 1 and report["kind"] == "megatron"
    evaluated = {k: v for k, v in step_1.items() if k.startswith("eval")}
    assert report["metrics"] == evaluated  # every set's numbers, the mean and eval_accuracy
    greedy, sampled = report["sets"]["greedy"], report["sets"]["sampled"]
    assert (greedy["prompts"], greedy["k"], greedy["samples"]) == (5, 1, 5)
    assert (sampled["prompts"], sampled["k"], sampled["samples"]) == (4, 4, 16)
    assert sampled["accuracy"] == sampled["reward_sum"] / 16
    assert sampled["pass@4"] == sampled["passed_prompts"] / 4
    assert report["metrics"]["eval/mean/accuracy"] == pytest.approx(
        (greedy["accuracy"] + 3 * sampled["accuracy"]) / 4)
    assert report["metrics"]["eval_accuracy"] == report["metrics"]["eval/mean/accuracy"]
    # not a set of zeros: the untrained model's responses do earn the reward now and then
    assert 0 < sampled["reward_sum"] < 16, sampled


def test_the_tp1_conversion_and_the_hf_folder_score_the_same_greedy_numbers(job):
    reports = job["reports"]
    for name in ("tp1", "hf"):
        assert reports[name]["step"] == 0
        for key in GREEDY_KEYS:
            assert reports[name]["sets"]["greedy"][key] == reports["tp2"]["sets"]["greedy"][key]
        assert reports[name]["sets"]["sampled"]["samples"] == 16
    assert reports["hf"]["kind"] == "hf"
    # the tables (rank 0's stdout), the TP=1 evaluation's last
    header = ["set", "prompts", "k", "temperature", "accuracy", "pass@k", "response_tokens",
              "truncated"]
    lines = job["out"].splitlines()
    starts = [i for i, line in enumerate(lines) if line.split() == header]
    assert len(starts) == 3
    lines = lines[starts[-1]:]
    greedy = reports["tp1"]["sets"]["greedy"]
    assert lines[1].split() == ["greedy", "5", "1", "0", f"{greedy['accuracy']:.4f}",
                                f"{greedy['pass@1']:.4f}", f"{greedy['response_tokens']:.1f}",
                                f"{greedy['truncated']:.4f}"]
    assert lines[2].split()[:4] == ["sampled", "4", "4", "1"]


def test_errors_exit_2_naming_the_key_file_and_row(job, capsys):
    from megatron_rl.evaluate import main

    root = job["root"]
    config = ["--config", str(root / "job.yaml"), "--checkpoint", str(root / "tp1")]
    assert main(config + ["data.eval_sets=[{name: a, path: a.jsonl, top_p: 0}]"]) == 2
    assert ("config error: override data.eval_sets=[{name: a, path: a.jsonl, top_p: 0}]: "
            "data.eval_sets[0].top_p must be in (0, 1]") in capsys.readouterr().err
    (root / "leak.jsonl").write_text(json.dumps(row(3, 4)) + "\n")
    assert main(config + [f"data.eval_sets=[{{name: leak, path: {root / 'leak.jsonl'}}}]"]) == 2
    assert (f"data error: data.eval_disjoint=true: {root / 'leak.jsonl'} line 1 "
            f"(data.eval_sets[0] (leak)) is the prompt of {root / 'train.jsonl'} line 20 "
            f"(data.path)") in capsys.readouterr().err
    assert main(["--config", str(root / "job.yaml"), "--checkpoint", str(root / "run")]) == 2
    assert "not a megatron distributed checkpoint" in capsys.readouterr().err
