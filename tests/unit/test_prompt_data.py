"""Prompt datasets: verl-format jsonl/parquet, chat templates, bad-row errors and skips,
sampling."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron_rl.data.prompts import DataError, load_prompt_dataset, load_tokenizer
from tests.tiny_tokenizer import CHAT_TEMPLATE, save_word_tokenizer

WORDS = "what is one plus two three four five six seven eight nine ten ? you are a calculator"


def verl_row(question, answer="3"):
    return {"data_source": "toy", "prompt": [{"role": "user", "content": question}],
            "reward_model": {"style": "rule", "ground_truth": answer}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # Nothing can be downloaded: a word-level tokenizer trained in memory, saved as an HF folder.
    return save_word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_tokenizer_keeps_chat_template(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.encode("one plus two") == [tokenizer.convert_tokens_to_ids(w)
                                                for w in ("one", "plus", "two")]


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_jsonl_verl_format_applies_chat_template(tmp_path, tokenizer):
    system_and_user = [{"role": "system", "content": "you are a calculator"},
                       {"role": "user", "content": "what is two plus two ?"}]
    rows = [verl_row("what is one plus two ?", "3"),
            {"prompt": system_and_user, "reward_model": {"ground_truth": 4}}]
    dataset = load_prompt_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer,
                                  max_prompt_tokens=64)
    expected_first = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    expected_second = tokenizer.apply_chat_template(system_and_user, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
    assert dataset.examples == [(expected_first, "3"), (expected_second, "4")]
    # generation prompt added
    assert expected_first[-1] == tokenizer.convert_tokens_to_ids("<assistant>")
    assert not dataset.skipped


def test_plain_text_prompt_with_and_without_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "plain.jsonl",
                       [{"question": "what is one plus two ?", "answer": "3"}])
    templated = load_prompt_dataset(path, tokenizer, prompt_key="question", answer_key="answer",
                                    max_prompt_tokens=64)
    assert templated.examples[0][0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is one plus two ?"}], add_generation_prompt=True,
        tokenize=True, return_dict=False)
    raw = load_prompt_dataset(path, tokenizer, prompt_key="question", answer_key="answer",
                              max_prompt_tokens=64, apply_chat_template=False)
    assert raw.examples == [(tokenizer.encode("what is one plus two ?"), "3")]


def test_chat_messages_without_template_is_a_config_error_even_when_skipping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [verl_row("what is one plus two ?")])
    with pytest.raises(DataError, match=r"train.jsonl line 1: field 'prompt' holds chat messages"):
        load_prompt_dataset(path, tokenizer, max_prompt_tokens=64, apply_chat_template=False,
                            on_invalid="skip")


def test_parquet_verl_format(tmp_path, tokenizer):
    rows = [verl_row("what is one plus two ?", "3"), verl_row("what is two plus two ?", "4")]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    dataset = load_prompt_dataset(path, tokenizer, max_prompt_tokens=64)
    assert [answer for _, answer in dataset.examples] == ["3", "4"]
    assert dataset.examples[1][0] == tokenizer.apply_chat_template(
        rows[1]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)


BAD_JSONL_ROWS = [
    # (row as written on line 2, expected message after "<path> line 2: ", skip reason)
    ('{"prompt": [{"role": "user", "content": "one"}', "malformed JSON", "malformed"),
    ('[1, 2]', "row must be a JSON object, got list", "malformed"),
    ({"reward_model": {"ground_truth": "3"}}, "field 'prompt' missing", "missing_field"),
    ({"prompt": "what is one ?"}, "field 'reward_model.ground_truth' missing", "missing_field"),
    ({"prompt": "what is one ?", "reward_model": {"ground_truth": None}},
     "field 'reward_model.ground_truth' missing", "missing_field"),
    ({"prompt": "what is one ?", "reward_model": {"ground_truth": ["3"]}},
     "field 'reward_model.ground_truth' must be a string or number, got list", "invalid_field"),
    ({"prompt": "what is one ?", "reward_model": {"ground_truth": " "}},
     "field 'reward_model.ground_truth' is empty", "invalid_field"),
    ({"prompt": "   ", "reward_model": {"ground_truth": "3"}},
     "field 'prompt' is empty", "empty_prompt"),
    (verl_row(""), "field 'prompt' is empty", "empty_prompt"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "3"}},
     "field 'prompt' message 0 must have string 'role' and 'content'", "invalid_field"),
    ({"prompt": 7, "reward_model": {"ground_truth": "3"}},
     "field 'prompt' must be a string or a list of chat messages, got int", "invalid_field"),
    (verl_row("one two three four five six seven eight nine ten"),
     "field 'prompt' is 12 tokens, over max_prompt_tokens=11", "too_long"),
]


@pytest.mark.parametrize("bad_row,message,reason", BAD_JSONL_ROWS)
def test_bad_jsonl_row_error_names_file_line_and_field(tmp_path, tokenizer, bad_row, message,
                                                       reason):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [verl_row("what is one ?"), bad_row, verl_row("what is two ?")])
    with pytest.raises(DataError) as error:
        load_prompt_dataset(path, tokenizer, max_prompt_tokens=11)
    assert str(error.value).startswith(f"{path} line 2: {message}")


def test_skip_counts_every_bad_row_by_reason(tmp_path, tokenizer):
    rows = ([verl_row("what is one ?")] + [bad for bad, _, _ in BAD_JSONL_ROWS]
            + ["", verl_row("what is two ?")])
    dataset = load_prompt_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer,
                                  max_prompt_tokens=11, on_invalid="skip")
    expected = {}
    for _, _, reason in BAD_JSONL_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(dataset.skipped) == expected  # the blank line is not a row
    assert [answer for _, answer in dataset.examples] == ["3", "3"]


def test_non_utf8_line_names_file_and_line_and_is_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    good = json.dumps(verl_row("what is one ?")).encode()
    # a Latin-1 byte (0xe9) where UTF-8 wants a continuation: the line's row cannot be read
    latin1 = b'{"prompt": "caf\xe9 ?", "reward_model": {"ground_truth": "3"}}'
    path.write_bytes(b"\n".join([good, latin1, good, b""]))
    with pytest.raises(DataError) as error:
        load_prompt_dataset(path, tokenizer, max_prompt_tokens=64)
    assert str(error.value) == f"{path} line 2: not valid UTF-8 (byte 0xe9 at column 16)"
    dataset = load_prompt_dataset(path, tokenizer, max_prompt_tokens=64, on_invalid="skip")
    assert dataset.skipped == {"malformed": 1} and len(dataset) == 2


def test_prompt_beyond_the_models_positions_names_file_and_line(tmp_path, tokenizer):
    # 12 tokens: under max_prompt_tokens, but with 8 new tokens over 16 positions
    rows = [verl_row("what is one ?"), verl_row("one two three four five six seven eight nine ten"),
            verl_row("what is two ?")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    limits = dict(max_prompt_tokens=64, max_positions=16, max_new_tokens=8)
    with pytest.raises(DataError) as error:
        load_prompt_dataset(path, tokenizer, **limits)
    assert str(error.value) == (f"{path} line 2: field 'prompt' is 12 tokens + "
                                "rollout.max_new_tokens=8 = 20 positions, over "
                                "model.max_position_embeddings=16")
    dataset = load_prompt_dataset(path, tokenizer, on_invalid="skip", **limits)
    assert dataset.skipped == {"too_long": 1} and [a for _, a in dataset.examples] == ["3", "3"]
    assert len(load_prompt_dataset(path, tokenizer, **dict(limits, max_positions=20))) == 3


def test_dataset_task_checks_prompts_against_the_models_positions_at_load(tmp_path,
                                                                          tokenizer_dir):
    from megatron_rl.config import load_config
    from megatron_rl.data.task import build_task

    rows = [verl_row("what is one ?"), verl_row("one two three four five six seven eight nine ten")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    overrides = ["data.task=dataset", f"data.path={path}", f"data.tokenizer_dir={tokenizer_dir}",
                 "training.sft_steps=0", "model.max_position_embeddings=16",
                 "rollout.max_new_tokens=8", "data.max_prompt_tokens=64"]
    with pytest.raises(DataError, match=r"train.jsonl line 2: field 'prompt' is 12 tokens \+ "
                                        r"rollout.max_new_tokens=8 = 20 positions, over model"):
        build_task(load_config(None, overrides, world_size=1, on_this_host=True))
    task = build_task(load_config(None, overrides + ["data.on_invalid=skip"], world_size=1))
    assert task.skipped_rows == {"too_long": 1}
    assert {len(ids) for ids, _ in task.eval_prompts} == {6}


def test_bad_parquet_row_names_row_index(tmp_path, tokenizer):
    rows = [verl_row("what is one ?"), verl_row("what is two ?", answer=None)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError,
                       match=r"train.parquet row 1: field 'reward_model.ground_truth' missing$"):
        load_prompt_dataset(path, tokenizer, max_prompt_tokens=64)
    skipped = load_prompt_dataset(path, tokenizer, max_prompt_tokens=64, on_invalid="skip")
    assert len(skipped) == 1 and skipped.skipped == {"missing_field": 1}


def test_unreadable_files(tmp_path, tokenizer):
    corrupt = tmp_path / "train.parquet"
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="train.parquet: not a readable parquet file"):
        load_prompt_dataset(corrupt, tokenizer, max_prompt_tokens=64)
    with pytest.raises(DataError, match="unsupported prompt file type"):
        load_prompt_dataset(tmp_path / "train.csv", tokenizer, max_prompt_tokens=64)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(DataError, match="bad.jsonl: no usable prompts"):
        load_prompt_dataset(all_bad, tokenizer, max_prompt_tokens=64, on_invalid="skip")


def test_batches_are_deterministic_epoch_shuffles_that_wrap(tmp_path, tokenizer):
    numbers = "one two three four five six seven".split()
    rows = [verl_row(f"what is {w} ?", answer=str(i)) for i, w in enumerate(numbers)]
    dataset = load_prompt_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer,
                                  max_prompt_tokens=64)
    steps = [[answer for _, answer in dataset.batch(step, 3, seed=5)] for step in range(5)]
    stream = [a for step in steps for a in step]
    # Each epoch of 7 is a permutation of all prompts; step 2 straddles epochs 0 and 1.
    assert sorted(stream[:7]) == sorted(map(str, range(7))) == sorted(stream[7:14])
    assert stream[:7] != stream[7:14]  # a fresh shuffle per epoch
    # A resumed run (fresh dataset object, no cached state) sees the same prompts at the same step.
    resumed = load_prompt_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer,
                                  max_prompt_tokens=64)
    assert [answer for _, answer in resumed.batch(3, 3, seed=5)] == steps[3]
    assert [answer for _, answer in resumed.batch(3, 3, seed=6)] != steps[3]


def eval_task(tmp_path, tokenizer_dir, *overrides, training_prompts=True):
    from megatron_rl.config import load_config
    from megatron_rl.data.task import build_task

    train = write_jsonl(tmp_path / "train.jsonl", [verl_row("what is one ?"),
                                                   verl_row("what is two ?")])
    cfg = load_config(None, ["data.task=dataset", f"data.path={train}",
                             f"data.tokenizer_dir={tokenizer_dir}", "training.sft_steps=0",
                             "model.max_position_embeddings=16", "rollout.max_new_tokens=8",
                             *overrides], world_size=1, on_this_host=True)
    return build_task(cfg, training_prompts=training_prompts)


def test_eval_sets_load_like_data_path_with_their_own_keys_and_limits(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [verl_row("what is three ?", "3"),
                                       verl_row("what is four ?", "4"),
                                       verl_row("what is five ?", "5")])
    pq.write_table(pa.Table.from_pylist([{"question": "one two three four five six seven",
                                          "gt": 7},
                                         {"question": "what is six ?", "gt": 6}]),
                   tmp_path / "b.parquet")
    sets = (f"data.eval_sets=[{{name: a, path: {tmp_path}/a.jsonl, max_prompts: 2}}, "
            f"{{name: b, path: {tmp_path}/b.parquet, prompt_key: question, answer_key: gt, "
            f"max_new_tokens: 6}}]")
    # b's row 0 is 9 tokens: over the positions with 8 new tokens, not with its own 6
    task = eval_task(tmp_path, tokenizer_dir, sets)
    a, b = task.eval_sets
    assert (a.name, [answer for _, answer in a.prompts], a.skipped) == ("a", ["3", "4"], {})
    assert (b.name, [answer for _, answer in b.prompts]) == ("b", ["7", "6"])
    assert task.eval_prompts == [] and len(task.prompts_for_step(0, 2)) == 2
    with pytest.raises(DataError, match=r"b.parquet row 0: field 'question' is 9 tokens \+ "
                                        r"data.eval_sets\[1\].max_new_tokens=8 = 17 positions"):
        eval_task(tmp_path, tokenizer_dir, sets.replace("max_new_tokens: 6", "max_new_tokens: 8"))
    skipped = eval_task(tmp_path, tokenizer_dir, "data.on_invalid=skip",
                        sets.replace("max_new_tokens: 6", "max_new_tokens: 8"))
    assert skipped.eval_sets[1].skipped == {"too_long": 1}
    # the evaluator's task: data.path is not read when no check needs it
    (tmp_path / "train.jsonl").write_text("not json\n")
    task = eval_task(tmp_path, tokenizer_dir, sets, training_prompts=False)
    assert [len(s.prompts) for s in task.eval_sets] == [2, 2]
    with pytest.raises(RuntimeError, match="without its training prompts"):
        task.prompts_for_step(0, 2)


def test_eval_disjoint_refuses_a_training_prompt_naming_both_rows(tmp_path, tokenizer_dir):
    # the same prompt as chat messages and as plain text: the same tokens after the template
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "what is three ?", "answer": "3"},
                                       {"prompt": "what is two ?", "answer": "2"}])
    sets = (f"data.eval_sets=[{{name: held, path: {tmp_path}/a.jsonl, "
            f"answer_key: answer}}]")
    with pytest.raises(DataError) as error:
        eval_task(tmp_path, tokenizer_dir, sets, "data.eval_disjoint=true")
    assert str(error.value) == (
        f"data.eval_disjoint=true: {tmp_path}/a.jsonl line 2 (data.eval_sets[0] (held)) is the "
        f"prompt of {tmp_path}/train.jsonl line 2 (data.path)")
    # not checked without eval_disjoint, nor beyond max_prompts
    eval_task(tmp_path, tokenizer_dir, sets)
    eval_task(tmp_path, tokenizer_dir, sets.replace("}]", ", max_prompts: 1}]"),
              "data.eval_disjoint=true", training_prompts=False)
