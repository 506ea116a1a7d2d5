"""tools/make_example_data.py: the verl/DAPO files and the tokenizer folder it writes from the
built-in clock_walk task load through the dataset path, hold no bad row, keep the eval sets
apart from training, come out byte-identical on every run, and are scored by
megatron_rl.rewards.clock_walk (a right walk 1, a wrong one 0)."""
import importlib.util
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rl.data.prompts import load_prompt_dataset, load_tokenizer
from megatron_rl.data.synthetic import CharTokenizer, clock_walk_problems
from megatron_rl.rewards.clock_walk import reward
from megatron_rl.rewards.pool import load_reward_fn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_example_data.py")
FILES = {"train.parquet": 760, "eval_heldout.parquet": 500, "eval_wide.jsonl": 200}
# verl's examples/data_preprocess layout (DAPO-Math-17k's has the same five columns)
VERL_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
])


def make(out_dir, hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, TOOL, str(out_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Two runs in fresh processes with different hash seeds."""
    return (make(tmp_path_factory.mktemp("first") / "data", 1),
            make(tmp_path_factory.mktemp("second") / "data", 2))


def read_rows(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prompt_texts(path):
    return [row["prompt"][0]["content"] for row in read_rows(path)]


def right_walk(ground_truth):
    """A right response for "allowed start steps", computed here (not by the module under
    test): always add the largest allowed digit."""
    allowed, start, steps = ground_truth.split()
    total, parts = int(start), []
    for _ in range(int(steps)):
        digit = int(max(allowed))
        parts.append(f"{total}+{digit}={(total + digit) % 10}")
        total = (total + digit) % 10
    return " ".join(parts)


def test_help_names_what_it_writes():
    spec = importlib.util.spec_from_file_location("make_example_data", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    usage = tool.__doc__
    for name in ["OUT_DIR", "tokenizer/", *FILES, "ground_truth", "megatron_rl.rewards.clock_walk"]:
        assert name in usage, name
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0


def test_every_run_writes_the_same_bytes(outputs):
    first, second = outputs

    def tree(root):
        return {os.path.relpath(os.path.join(folder, name), root):
                open(os.path.join(folder, name), "rb").read()
                for folder, _, names in os.walk(root) for name in names}

    files = tree(first)
    assert sorted(files) == sorted(["tokenizer/chat_template.jinja", "tokenizer/tokenizer.json",
                                    "tokenizer/tokenizer_config.json", *FILES])
    assert files == tree(second)


def test_parquet_files_have_exactly_the_verl_columns_and_types(outputs):
    for name in FILES:
        path = outputs[0] / name
        if name.endswith(".parquet"):
            schema = pq.read_schema(path)
            assert schema.names == VERL_SCHEMA.names
            assert [f.type for f in schema] == [f.type for f in VERL_SCHEMA], schema
        rows = read_rows(path)
        assert len(rows) == FILES[name]
        split = "train" if name.startswith("train") else "test"
        for index, row in enumerate(rows):
            assert list(row) == VERL_SCHEMA.names
            assert row["data_source"] == "megatron_rl/clock_walk"
            assert row["ability"] == "arithmetic"
            assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
            assert row["reward_model"]["style"] == "rule"
            assert isinstance(row["reward_model"]["ground_truth"], str)
            assert row["extra_info"] == {"split": split, "index": index}


def test_files_load_through_the_dataset_path_without_bad_rows(outputs):
    tokenizer = load_tokenizer(outputs[0] / "tokenizer")
    for name, count in FILES.items():
        # as examples/dataset_cpu.yaml loads them: max_position_embeddings 64, 34 new tokens
        dataset = load_prompt_dataset(outputs[0] / name, tokenizer, max_prompt_tokens=16,
                                      max_positions=64, max_new_tokens=34)
        assert len(dataset) == count and not dataset.skipped
        ids, answer = dataset.examples[0]
        assert tokenizer.decode(ids) == ("<bos><user>" + prompt_texts(outputs[0] / name)[0]
                                         + "<assistant>")
        assert answer == read_rows(outputs[0] / name)[0]["reward_model"]["ground_truth"]


def test_tokenizer_is_the_task_characters_with_chat_tokens(outputs):
    tokenizer = load_tokenizer(outputs[0] / "tokenizer")
    chars = CharTokenizer()
    assert len(tokenizer) == 24 and tokenizer.eos_token_id == chars.eos_id
    walk = "3+5=8 8+7=5"
    ids = tokenizer.encode(walk, add_special_tokens=False)
    assert ids == chars.encode(walk)  # the built-in tokenizer's ids for the characters
    # what the trainer does with a response: decode without specials, spaces kept
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == walk


def test_eval_sets_are_disjoint_from_training_and_each_other(outputs):
    train, heldout, wide = (set(prompt_texts(outputs[0] / name)) for name in FILES)
    assert len(train) == 760 and len(heldout) == 500 and len(wide) == 200  # no duplicates
    assert not train & heldout and not train & wide and not heldout & wide
    # train and heldout are the two halves of the task's 4-digit problems
    assert train | heldout == {f"{allowed} {start}=" for allowed, start
                               in clock_walk_problems(4)}
    assert all(len(text.split()[0]) == 5 for text in wide)


def test_verifier_scores_the_ground_truth_one_and_a_wrong_walk_zero(outputs):
    fn = load_reward_fn("megatron_rl.rewards.clock_walk:reward",
                        ["megatron_rl.rewards.clock_walk"])
    assert fn is reward
    for name in FILES:
        for row in read_rows(outputs[0] / name)[:50]:
            truth = row["reward_model"]["ground_truth"]
            walk = right_walk(truth)
            assert reward(walk, truth) == 1.0, (walk, truth)
            wrong_total = walk[:-1] + str((int(walk[-1]) + 1) % 10)
            assert reward(wrong_total, truth) == 0.0
            assert reward(walk.rsplit(" ", 1)[0], truth) == 0.0  # a step short
            start = int(truth.split()[1])
            assert reward(walk.replace(f"{start}+", f"{(start + 1) % 10}+", 1), truth) == 0.0
    assert reward("1+2=3 3+2=5", "12 1 2") == 1.0
    assert reward("1+3=4 4+2=6", "12 1 2") == 0.0  # 3 is not allowed
    with pytest.raises(ValueError, match="allowed start steps"):
        reward("1+2=3", "12 1")


def test_example_config_reads_what_the_script_writes(outputs):
    from megatron_rl.config import load_config

    path = os.path.join(ROOT, "examples", "dataset_cpu.yaml")
    cfg = load_config(path, [], world_size=1)  # loads as committed, before any data exists
    assert cfg.data.path == "runs/example_data/train.parquet"
    assert cfg.data.tokenizer_dir == "runs/example_data/tokenizer"
    assert cfg.reward.fn == "megatron_rl.rewards.clock_walk:reward"
    assert cfg.training.sft_steps == 0
    # with the script's output: the model's vocabulary covers the tokenizer (checked on host)
    load_config(path, [f"data.path={outputs[0] / 'train.parquet'}",
                       f"data.tokenizer_dir={outputs[0] / 'tokenizer'}"],
                world_size=1, on_this_host=True)
    # the eval sets name the script's files and score with the task's verifier
    assert [os.path.basename(s.path) for s in cfg.data.eval_sets] == [
        "eval_heldout.parquet", "eval_wide.jsonl"]
    assert all(s.reward == cfg.reward.fn for s in cfg.data.eval_sets)
    assert cfg.data.eval_disjoint
