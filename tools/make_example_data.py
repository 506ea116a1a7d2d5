"""Write example prompt data for the dataset path (data.task=dataset), made from the built-in
clock_walk task, nothing downloaded:

    python tools/make_example_data.py runs/example_data
    python -m megatron_rl.train --config examples/dataset_cpu.yaml    # trains on that folder

OUT_DIR gets
  tokenizer/           an HF tokenizer folder (save_pretrained; load_tokenizer / AutoTokenizer
                       read it): character-level WordLevel over the clock_walk characters, with
                       <pad> <bos> <eos> <unk> <system> <user> <assistant> (24 tokens; the
                       characters keep the built-in tokenizer's ids) and a chat template
                       "<bos><user>CONTENT<assistant>"
  train.parquet        the training problems of the task's own split (4 allowed digits; the
                       problems examples/tiny_cpu.yaml trains on), 760 rows
  eval_heldout.parquet the held-out problems of that split (the 500 that examples/tiny_cpu.yaml
                       evaluates on), never in train.parquet
  eval_wide.jsonl      200 held-out problems with 5 allowed digits: prompts one digit wider than
                       any training prompt
in verl's / DAPO's layout, one row per problem:
  {"data_source": "megatron_rl/clock_walk",
   "prompt": [{"role": "user", "content": "2579 3="}],
   "ability": "arithmetic",
   "reward_model": {"style": "rule", "ground_truth": "2579 3 5"},
   "extra_info": {"split": "train", "index": 0}}
The ground truth is "allowed start steps" (5 steps: 30-token responses); reward.fn
megatron_rl.rewards.clock_walk:reward scores it with the task's own check. Every run writes the
same bytes (the split is seeded); existing files of these names are replaced, nothing else in
OUT_DIR is touched.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.data.config import DataConfig  # noqa: E402
from megatron_rl.data.prompts import verl_parquet_schema  # noqa: E402
from megatron_rl.data.synthetic import (VOCAB, clock_walk_prompt,  # noqa: E402
                                        clock_walk_split)
from megatron_rl.files import publish_folder, replace_file  # noqa: E402
from megatron_rl.rewards.clock_walk import ground_truth  # noqa: E402

DEFAULTS = DataConfig()
STEPS = DEFAULTS.walk_steps  # 5: the built-in task's default
DIGITS = DEFAULTS.walk_digits  # 4
SPLIT_SEED = DEFAULTS.eval_seed  # the built-in task's held-out cut
HELD_OUT = 500  # examples/tiny_cpu.yaml's data.eval_prompts
WIDE_DIGITS, WIDE_COUNT = DIGITS + 1, 200
DATA_SOURCE = "megatron_rl/clock_walk"
CHAT_TOKENS = ["<unk>", "<system>", "<user>", "<assistant>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<{{ message['role'] }}>"
                 "{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def rows(problems, split: str, steps: int = STEPS) -> list:
    """verl / DAPO rows for (allowed, start) problems, in the order given."""
    return [{"data_source": DATA_SOURCE,
             "prompt": [{"role": "user", "content": clock_walk_prompt(allowed, start)}],
             "ability": "arithmetic",
             "reward_model": {"style": "rule",
                              "ground_truth": ground_truth(allowed, start, steps)},
             "extra_info": {"split": split, "index": index}}
            for index, (allowed, start) in enumerate(problems)]


def save_tokenizer(path: str) -> None:
    """The character-level WordLevel tokenizer with its chat template, save_pretrained(path)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB + CHAT_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # characters
    backend.decoder = decoders.Fuse()  # decode joins characters without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
        eos_token="<eos>", additional_special_tokens=CHAT_TOKENS[1:],
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


def write_parquet(path: str, table_rows: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = verl_parquet_schema([("split", pa.string()), ("index", pa.int64())])
    table = pa.Table.from_pylist(table_rows, schema=schema)
    replace_file(path, lambda tmp: pq.write_table(table, tmp))


def write_jsonl(path: str, table_rows: list) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row) + "\n" for row in table_rows)
    replace_file(path, write)


def make_example_data(out_dir: str) -> dict:
    """Write the tokenizer folder and the three prompt files; {name: (path, rows)}."""
    os.makedirs(out_dir, exist_ok=True)
    train, held_out = clock_walk_split(DIGITS, HELD_OUT, SPLIT_SEED)
    _, wide = clock_walk_split(WIDE_DIGITS, WIDE_COUNT, SPLIT_SEED)
    staging = os.path.join(out_dir, f".tokenizer.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_tokenizer(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_folder(staging, os.path.join(out_dir, "tokenizer"))
    written = {"tokenizer": (os.path.join(out_dir, "tokenizer"), len(VOCAB + CHAT_TOKENS))}
    for name, problems, split, writer in (
            ("train.parquet", train, "train", write_parquet),
            ("eval_heldout.parquet", held_out, "test", write_parquet),
            ("eval_wide.jsonl", wide, "test", write_jsonl)):
        path = os.path.join(out_dir, name)
        writer(path, rows(problems, split))
        written[name] = (path, len(problems))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if absent)")
    args = parser.parse_args(argv)
    for name, (path, count) in make_example_data(args.out_dir).items():
        what = f"{count} tokens" if name == "tokenizer" else f"{count} rows"
        print(f"wrote {path} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
