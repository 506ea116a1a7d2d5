r"""Turn the public math data sets, downloaded into one local folder, into the verl / DAPO prompt
files that data.path and data.eval_sets read (docs/data_and_rewards.md); nothing is downloaded:

    python tools/prepare_math_data.py --input INPUT --output OUTPUT [--sets aime24,amc,...]
                                      [--on-invalid skip]

INPUT holds one subfolder per set, as `huggingface-cli download --repo-type dataset REPO
--local-dir INPUT/SUBFOLDER` leaves it. Every .parquet, .jsonl and .json file (a JSON array or
JSON lines) under a subfolder is read, in path order (hidden folders and HF metadata such as
dataset_info.json skipped); the fields read, the first spelling a row has where uploads differ:

  dapo-math-17k/  BytedTsinghua-SIA/DAPO-Math-17k (data/dapo-math-17k.parquet): prompt (chat
                  messages that already carry the instruction below: kept as they are),
                  reward_model.ground_truth, extra_info.index (its id). The published file
                  repeats each prompt many times; the first of each is kept.
                  -> dapo_math_17k.parquet (training: data.path)
  aime24/         HuggingFaceH4/aime_2024 (id, problem, answer) or Maxwell-Jia/AIME_2024 (ID,
                  Problem, Answer)                                           -> aime24.jsonl
  aime25/         opencompass/AIME2025 (aime2025-I.jsonl, aime2025-II.jsonl: question, answer) or
                  yentinglin/aime_2025 (id, problem, answer)                 -> aime25.jsonl
  amc/            AI-MO/aimo-validation-amc (id, problem, answer: a float, 142.0 is written
                  "142")                                                     -> amc.jsonl
  math500/        HuggingFaceH4/MATH-500 test.jsonl (unique_id, problem, answer)
                                                                             -> math500.jsonl
  omni_math/      KbsdJames/Omni-MATH test.jsonl (problem, answer)           -> omni_math.jsonl
  olympiadbench/  Hothan/OlympiadBench, its English text-only maths competition subset
                  OE_TO_maths_en_COMP (files whose path names another subset, OE_... or TP_...,
                  are not read): id, question, final_answer (a list: one answer loses its $
                  delimiters, several are joined with ", " as a set), unit (when set, removed from
                  the end of the answer and kept in extra_info.unit)   -> olympiadbench.jsonl
  minerva/        math-ai/minervamath (question, answer)                     -> minerva.jsonl

OUTPUT gets one file per set, one row per problem in verl's / DAPO's layout:
  {"data_source": "aime24",
   "prompt": [{"role": "user", "content": "Solve the following math problem step by step. ..."}],
   "ability": "math",
   "reward_model": {"style": "rule", "ground_truth": "204"},
   "extra_info": {"index": 3, "split": "test", "id": "62"}}
The prompt is DAPO-Math-17k's own instruction around the problem (DAPO_PROMPT), so evaluation
prompts look like training prompts: "Solve the following math problem step by step. The last line
of your response should be of the form Answer: $Answer (without quotes) where $Answer is the
answer to the problem.\n\nPROBLEM\n\nRemember to put your answer on its own line after
\"Answer:\"."; the ground truth is the bare answer the `math` reward
(megatron_rl/rewards/math.py) compares with. extra_info.index is the row's position in the
set's files (0-based, counting every row read), split is "train" for dapo_math_17k and "test"
for the evaluation sets, id is the source's own id as a string (when it has one).

Default --sets: every set whose subfolder exists; a named set without one is an error. A bad row
(a missing field, an empty problem, an answer that is empty or not a string or number) raises
DataError naming file, line (jsonl, 1-based) or row (parquet, json array; 0-based) and field;
--on-invalid skip drops and counts it. Rows whose prompt repeats an earlier one of the same set
are dropped and counted. Every set is read before any file is written, and each file is written
under a staging name, read back with the prompt loader's own row checks and then renamed, so a
failed run leaves no partial output. Existing files of these names are replaced, nothing else in
OUTPUT is touched.
"""
import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.data.config import DataConfig  # noqa: E402
from megatron_rl.data.prompts import (DataError, _answer_text, _chat_messages,  # noqa: E402
                                      _iter_jsonl, _iter_parquet, _lookup, _RowError,
                                      verl_parquet_schema)
from megatron_rl.files import replace_file  # noqa: E402

# DAPO-Math-17k's instruction, verbatim: its training prompts carry it already, the evaluation
# sets are wrapped in it.
DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.\n\n{problem}\n\nRemember to put your answer on its own "
               "line after \"Answer:\".")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
# JSON files an HF download or save may put beside the data, which hold no rows
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
# an OlympiadBench subset name in a path: OE/TP (open-ended, theorem proving), TO/MM (text only,
# multimodal)
OLYMPIAD_SUBSET = re.compile(r"(?:OE|TP)_(?:TO|MM)_")
DEFAULTS = DataConfig()  # the keys data.path and data.eval_sets read when a recipe sets none


def field_value(row: dict, keys: tuple) -> tuple[str, Any]:
    """(key, value) of the first of `keys` the row holds (uploads of one set spell their fields
    differently); none of them, or null, is a missing_field row naming every spelling."""
    for key in keys:
        try:
            return key, _lookup(row, key)
        except _RowError:
            continue
    raise _RowError("missing_field", f"field {' or '.join(repr(k) for k in keys)} missing")


def answer_text(value: Any, key: str) -> str:
    """An answer as a ground-truth string: text stripped, a whole number without ".0" (AMC's
    142.0 -> "142"), another number as str()."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError("invalid_field", f"field '{key}' must be a string or number, "
                                         f"got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError("invalid_field", f"field '{key}' is {value}")
        text = str(int(value)) if value.is_integer() else str(value)
    else:
        text = str(value).strip()
    if not text:
        raise _RowError("invalid_field", f"field '{key}' is empty")
    return text


def without_dollars(text: str) -> str:
    r"""`text` without its $ math delimiters (an escaped \$ stays)."""
    return re.sub(r"(?<!\\)\$", "", text).strip()


def without_unit(answer: str, unit: str) -> str:
    r"""`answer` less a trailing `unit`, bare or in \mathrm{} / \text{} ("12 \mathrm{~cm}" with
    unit "cm" -> "12"): the verifier compares numbers. An answer that does not end with the
    unit, or would be left empty, is returned as it is."""
    bare = re.sub(r"^\\(?:mathrm|text)\{\s*~?\s*(.*?)\s*\}$", r"\1", without_dollars(unit))
    if not bare:
        return answer
    unit_at_end = (r"(?:\\(?:mathrm|text|mbox)\{\s*~?\s*" + re.escape(bare) + r"\s*\}|"
                   + re.escape(bare) + r")\s*\Z")
    number = re.sub(unit_at_end, "", answer)
    number = re.sub(r"(?:\s|~|\\[,;: ])+\Z", "", number)  # the space before the unit
    return number or answer


def problem_prompt(row: dict, keys: tuple) -> list[dict]:
    """The problem text inside DAPO_PROMPT, as one user message."""
    key, problem = field_value(row, keys)
    if not isinstance(problem, str):
        raise _RowError("invalid_field", f"field '{key}' must be a string, "
                                         f"got {type(problem).__name__}")
    if not problem.strip():
        raise _RowError("empty_prompt", f"field '{key}' is empty")
    return [{"role": "user", "content": DAPO_PROMPT.format(problem=problem.strip())}]


def chat_prompt(row: dict, keys: tuple) -> list[dict]:
    """DAPO-Math-17k's chat messages as they are (role and content only)."""
    key, prompt = field_value(row, keys)
    messages = _chat_messages(prompt, key)
    if messages is None:
        raise _RowError("invalid_field", f"field '{key}' must be a list of chat messages, "
                                         "got a string")
    return messages


def plain_ground_truth(row: dict, keys: tuple) -> tuple[str, dict]:
    key, answer = field_value(row, keys)
    return answer_text(answer, key), {}


def olympiad_ground_truth(row: dict, keys: tuple) -> tuple[str, dict]:
    """OlympiadBench's final_answer list: one answer without its $ delimiters, several joined
    with ", " (math-verify reads that as a set, in any order); a unit is removed from each and
    kept in extra_info."""
    key, final_answer = field_value(row, keys)
    if isinstance(final_answer, list):
        if not final_answer:
            raise _RowError("invalid_field", f"field '{key}' is empty")
        named = [(f"{key}[{i}]", answer) for i, answer in enumerate(final_answer)]
    else:
        named = [(key, final_answer)]
    answers = []
    for name, answer in named:
        text = without_dollars(answer_text(answer, name))
        if not text:
            raise _RowError("invalid_field", f"field '{name}' is empty")
        answers.append(text)
    unit = row.get("unit")
    if not (isinstance(unit, str) and unit.strip()):
        return ", ".join(answers), {}
    return ", ".join(without_unit(a, unit) for a in answers), {"unit": unit.strip()}


@dataclass(frozen=True)
class SourceSet:
    folder: str  # the subfolder of --input
    output: str  # the file written under --output
    split: str  # extra_info.split: what the set is for here
    problem_keys: tuple  # spellings of the problem (DAPO: the chat prompt) field, first found
    answer_keys: tuple
    id_keys: tuple = ()
    prompt: Callable[[dict, tuple], list] = problem_prompt
    ground_truth: Callable[[dict, tuple], tuple] = plain_ground_truth
    subset: str | None = None  # an OlympiadBench subset: files naming another are not read


SETS = {
    "dapo_math_17k": SourceSet("dapo-math-17k", "dapo_math_17k.parquet", "train", ("prompt",),
                               ("reward_model.ground_truth",), ("extra_info.index",),
                               prompt=chat_prompt),
    "aime24": SourceSet("aime24", "aime24.jsonl", "test", ("problem", "Problem"),
                        ("answer", "Answer"), ("id", "ID")),
    "aime25": SourceSet("aime25", "aime25.jsonl", "test", ("problem", "question"), ("answer",),
                        ("id",)),
    "amc": SourceSet("amc", "amc.jsonl", "test", ("problem",), ("answer",), ("id",)),
    "math500": SourceSet("math500", "math500.jsonl", "test", ("problem",), ("answer",),
                         ("unique_id",)),
    "omni_math": SourceSet("omni_math", "omni_math.jsonl", "test", ("problem",), ("answer",)),
    "olympiadbench": SourceSet("olympiadbench", "olympiadbench.jsonl", "test", ("question",),
                               ("final_answer",), ("id",), ground_truth=olympiad_ground_truth,
                               subset="OE_TO_maths_en_COMP"),
    "minerva": SourceSet("minerva", "minerva.jsonl", "test", ("question", "problem"),
                         ("answer",), ("id",)),
}


@dataclass
class SetReport:
    name: str
    path: str  # the output file
    read: int = 0
    written: int = 0
    duplicates: int = 0  # rows whose prompt an earlier row of the set has
    rejected: Counter = field(default_factory=Counter)  # reason -> rows (--on-invalid skip)

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
        rejected = sum(self.rejected.values())
        return (f"{self.name}: read {self.read} rows, wrote {self.written} to {self.path}, "
                f"dropped {self.duplicates} duplicates, rejected {rejected}"
                + (f" ({reasons})" if reasons else ""))


def source_files(folder: str, subset: str | None) -> list[str]:
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, name) for name in sorted(files)
                  if name.endswith(DATA_SUFFIXES) and not name.startswith(".")
                  and name not in METADATA_FILES]
    if subset is not None:
        paths = [p for p in paths if subset in os.path.relpath(p, folder)
                 or not OLYMPIAD_SUBSET.search(os.path.relpath(p, folder))]
    if not paths:
        raise DataError(f"{folder}: no .parquet, .jsonl or .json file"
                        + (f" of subset {subset}" if subset else ""))
    return sorted(paths)


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(location, row) of a source file: the prompt loader's readers for .jsonl and .parquet; a
    .json file is a JSON array ("row N", 0-based) or JSON lines."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    if path.endswith(".jsonl"):
        yield from _iter_jsonl(path)
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        yield from _iter_jsonl(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})"
                        ) from None
    for index, row in enumerate(rows):
        yield f"row {index}", row


def row_count(path: str) -> int | None:
    if not path.endswith(".parquet"):
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def source_id(row: dict, keys: tuple) -> str | None:
    for key in keys:
        try:
            value = _lookup(row, key)
        except _RowError:
            continue
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def convert_set(name: str, source: SourceSet, folder: str, path: str,
                on_invalid: str) -> tuple[list[dict], SetReport]:
    """The verl rows of one set, its first row of each prompt only, and what was read."""
    report = SetReport(name, path)
    rows, seen = [], set()
    for file_path in source_files(folder, source.subset):
        # a bar on a terminal only (disable=None): the DAPO file has ~1.8M rows
        for location, row in tqdm(read_rows(file_path), total=row_count(file_path),
                                  desc=os.path.relpath(file_path, folder), unit=" rows",
                                  leave=False, disable=None):
            index = report.read
            report.read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                if not isinstance(row, dict):
                    raise _RowError("malformed", f"row must be a JSON object, "
                                                 f"got {type(row).__name__}")
                messages = source.prompt(row, source.problem_keys)
                ground_truth, extra = source.ground_truth(row, source.answer_keys)
            except _RowError as e:
                if on_invalid == "error":
                    raise DataError(f"{file_path} {location}: {e}") from None
                report.rejected[e.reason] += 1
                continue
            prompt_text = tuple((m["role"], m["content"]) for m in messages)
            if prompt_text in seen:
                report.duplicates += 1
                continue
            seen.add(prompt_text)
            extra_info = {"index": index, "split": source.split}
            row_id = source_id(row, source.id_keys)
            if row_id is not None:
                extra_info["id"] = row_id
            rows.append({"data_source": name, "prompt": messages, "ability": "math",
                         "reward_model": {"style": "rule", "ground_truth": ground_truth},
                         "extra_info": {**extra_info, **extra}})
    if not rows:
        raise DataError(f"{folder}: no usable rows (read {report.read}, rejected "
                        f"{sum(report.rejected.values())})")
    report.written = len(rows)
    return rows, report


def check_written(path: str, rows_read_back: Iterator[tuple[str, Any]], expected: int) -> None:
    """The written file read back with the prompt loader's own row checks (load_prompt_dataset
    also tokenizes, which needs the model's tokenizer folder)."""
    count = 0
    for location, row in rows_read_back:
        try:
            if isinstance(row, _RowError):
                raise row
            _chat_messages(_lookup(row, DEFAULTS.prompt_key), DEFAULTS.prompt_key)
            _answer_text(row, DEFAULTS.answer_key)
        except _RowError as e:
            raise DataError(f"{path} {location}: {e} (as written)") from None
        count += 1
    if count != expected:
        raise DataError(f"{path}: {count} rows read back, {expected} written")


def write_checked(path: str, rows: list[dict]) -> None:
    def write(tmp):
        if path.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = verl_parquet_schema([("index", pa.int64()), ("split", pa.string()),
                                          ("id", pa.string())])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            check_written(path, _iter_parquet(tmp), len(rows))
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            check_written(path, _iter_jsonl(tmp), len(rows))
    replace_file(path, write)


def prepare_math_data(input_dir: str, output_dir: str, sets: list[str] | None = None,
                      on_invalid: str = "error") -> list[SetReport]:
    """Convert `sets` (None: every set whose subfolder of input_dir exists) and write one file
    per set into output_dir; every set is read before any file is written."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if not os.path.isdir(input_dir):
        raise DataError(f"{input_dir}: no such folder")
    if sets is None:
        sets = [name for name, source in SETS.items()
                if os.path.isdir(os.path.join(input_dir, source.folder))]
        if not sets:
            raise DataError(f"{input_dir}: holds none of the set folders "
                            f"{', '.join(s.folder + '/' for s in SETS.values())}")
    for name in sets:
        if name not in SETS:
            raise ValueError(f"unknown set {name!r} (sets: {', '.join(SETS)})")
        folder = os.path.join(input_dir, SETS[name].folder)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: no such folder (set {name})")
    converted = [convert_set(name, SETS[name], os.path.join(input_dir, SETS[name].folder),
                             os.path.join(output_dir, SETS[name].output), on_invalid)
                 for name in sets]
    os.makedirs(output_dir, exist_ok=True)
    for rows, report in converted:
        write_checked(report.path, rows)
    return [report for _, report in converted]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="INPUT",
                        help="folder with one subfolder per set (above)")
    parser.add_argument("--output", required=True, metavar="OUTPUT",
                        help="folder to write (created if absent)")
    parser.add_argument("--sets", help=f"comma-separated, of: {','.join(SETS)} "
                                       "(default: every set whose subfolder exists)")
    parser.add_argument("--on-invalid", choices=("error", "skip"), default="error",
                        help="a bad row stops the run naming it (error), or is dropped and "
                             "counted (skip)")
    args = parser.parse_args(argv)
    sets = None
    if args.sets is not None:
        sets = [name.strip() for name in args.sets.split(",") if name.strip()]
        unknown = [name for name in sets if name not in SETS]
        if unknown or not sets:
            parser.error(f"--sets: unknown set(s) {', '.join(unknown) or '(none given)'}; "
                         f"sets: {', '.join(SETS)}")
    try:
        reports = prepare_math_data(args.input, args.output, sets, args.on_invalid)
    except DataError as e:
        print(f"prepare_math_data: error: {e}", file=sys.stderr)
        return 1
    for report in reports:
        print(report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
