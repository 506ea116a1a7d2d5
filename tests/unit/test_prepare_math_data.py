"""tools/prepare_math_data.py: small files in each published layout (DAPO-Math-17k's repeated
prompts, AMC's float answers, OlympiadBench's $-delimited answer lists and units, Maxwell-Jia's
capitalised AIME fields, parquet, jsonl and json inputs) become the verl rows the trainer reads:
the exact rows, the dedup counts, rows that load with the prompt loader and ground truths the
`math` reward scores; bad rows are named or skipped and counted, and a failed run writes
nothing."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rl.data.prompts import DataError, load_prompt_dataset, load_tokenizer
from megatron_rl.rewards.math import math_reward
from tests.tiny_tokenizer import save_word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "prepare_math_data.py")
# DAPO-Math-17k's instruction, written out here rather than taken from the tool
INSTRUCTION = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.\n\n{}\n\nRemember to put your answer on its own line "
               "after \"Answer:\".")
OUTPUTS = {"dapo_math_17k": "dapo_math_17k.parquet", "aime24": "aime24.jsonl",
           "aime25": "aime25.jsonl", "amc": "amc.jsonl", "math500": "math500.jsonl",
           "omni_math": "omni_math.jsonl", "olympiadbench": "olympiadbench.jsonl",
           "minerva": "minerva.jsonl"}


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_math_data", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


tool = load_tool()


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_json(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def dapo_row(problem, answer, uuid):
    return {"data_source": "math_dapo",
            "prompt": [{"content": INSTRUCTION.format(problem), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": uuid}}


def write_sources(root):
    """Every set in its published layout, 1-4 rows each."""
    write_parquet(root / "dapo-math-17k" / "data" / "dapo-math-17k.parquet", [
        dapo_row("What is $2+3$?", "5", "uuid-a"),
        dapo_row("Compute $\\frac{1}{4}+\\frac{1}{4}$.", "\\frac{1}{2}", "uuid-b"),
        dapo_row("What is $2+3$?", "5", "uuid-c"),  # published repeats: dropped
        dapo_row("How many primes are below 10?", "4", "uuid-d")])
    write_parquet(root / "aime24" / "data" / "train-00000-of-00001.parquet", [
        {"id": 60, "problem": "Find $2^{10}$ mod 1000.", "solution": "1024.", "answer": "24",
         "url": "https://example.org/60", "year": "2024"},
        {"id": 61, "problem": "  Find 204.\n", "solution": "It is.", "answer": "204",
         "url": "https://example.org/61", "year": "2024"}])
    write_jsonl(root / "aime25" / "aime2025-I.jsonl",
                [{"question": "Find the sum of all bases.", "answer": "70"}])
    write_jsonl(root / "aime25" / "aime2025-II.jsonl",
                [{"question": "Find the area.", "answer": "588"}])
    write_parquet(root / "amc" / "data" / "train-00000-of-00001.parquet", [
        {"id": 0, "problem": "How many?", "answer": 142.0, "url": "u0"},
        {"id": 1, "problem": "How far?", "answer": 2.5, "url": "u1"}])
    write_jsonl(root / "math500" / "test.jsonl", [
        {"problem": "Solve $3x = 14$.", "solution": "...", "answer": "\\frac{14}{3}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2584.json"},
        {"problem": "What is $5+5$?", "solution": "...", "answer": "10",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}])
    write_jsonl(root / "omni_math" / "test.jsonl", [
        {"domain": ["Mathematics -> Algebra"], "difficulty": 3.5, "problem": "Find n.",
         "solution": "...", "answer": "6", "source": "imo"}])
    subset = root / "olympiadbench" / "OE_TO_maths_en_COMP" / "train-00000-of-00001.parquet"
    write_parquet(subset, [
        {"id": 1606, "question": "Find the ratio.", "solution": ["..."],
         "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False, "unit": None,
         "answer_type": "Numerical"},
        {"id": 1607, "question": "Find all n.", "solution": ["..."],
         "final_answer": ["$3$", "$4$"], "is_multiple_answer": True, "unit": None,
         "answer_type": "Numerical"},
        {"id": 1608, "question": "Find the length.", "solution": ["..."],
         "final_answer": ["$12 \\mathrm{~cm}$"], "is_multiple_answer": False, "unit": "cm",
         "answer_type": "Numerical"},
        {"id": 1609, "question": "Find the area.", "solution": ["..."],
         "final_answer": ["$25$"], "is_multiple_answer": False,
         "unit": "$\\mathrm{~cm}^{2}$", "answer_type": "Numerical"}])
    # another subset of the same download: never read
    write_parquet(root / "olympiadbench" / "OE_MM_maths_en_COMP" / "train-00000-of-00001.parquet",
                  [{"id": 1, "question": "See the figure.", "final_answer": ["$1$"]}])
    write_jsonl(root / "minerva" / "test.jsonl", [
        {"question": "Compute the speed.", "answer": "7.5"},
        {"question": "Compute the ratio.", "answer": "0.2"}])
    return root


def expected(name, problem, ground_truth, index, row_id=None, split="test", **extra):
    extra_info = {"index": index, "split": split}
    if row_id is not None:
        extra_info["id"] = row_id
    return {"data_source": name,
            "prompt": [{"role": "user", "content": INSTRUCTION.format(problem)}],
            "ability": "math", "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": {**extra_info, **extra}}


EXPECTED = {
    "dapo_math_17k": [
        expected("dapo_math_17k", "What is $2+3$?", "5", 0, "uuid-a", "train"),
        expected("dapo_math_17k", "Compute $\\frac{1}{4}+\\frac{1}{4}$.", "\\frac{1}{2}", 1,
                 "uuid-b", "train"),
        expected("dapo_math_17k", "How many primes are below 10?", "4", 3, "uuid-d", "train")],
    "aime24": [expected("aime24", "Find $2^{10}$ mod 1000.", "24", 0, "60"),
               expected("aime24", "Find 204.", "204", 1, "61")],
    "aime25": [expected("aime25", "Find the sum of all bases.", "70", 0),
               expected("aime25", "Find the area.", "588", 1)],
    "amc": [expected("amc", "How many?", "142", 0, "0"),
            expected("amc", "How far?", "2.5", 1, "1")],
    "math500": [expected("math500", "Solve $3x = 14$.", "\\frac{14}{3}", 0,
                         "test/algebra/2584.json"),
                expected("math500", "What is $5+5$?", "10", 1, "test/prealgebra/1.json")],
    "omni_math": [expected("omni_math", "Find n.", "6", 0)],
    "olympiadbench": [
        expected("olympiadbench", "Find the ratio.", "\\frac{1}{2}", 0, "1606"),
        expected("olympiadbench", "Find all n.", "3, 4", 1, "1607"),
        expected("olympiadbench", "Find the length.", "12", 2, "1608", unit="cm"),
        expected("olympiadbench", "Find the area.", "25", 3, "1609",
                 unit="$\\mathrm{~cm}^{2}$")],
    "minerva": [expected("minerva", "Compute the speed.", "7.5", 0),
                expected("minerva", "Compute the ratio.", "0.2", 1)],
}


def read_rows(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    sources = write_sources(tmp_path_factory.mktemp("sources"))
    out = tmp_path_factory.mktemp("prepared")
    reports = tool.prepare_math_data(str(sources), str(out))
    return sources, out, {report.name: report for report in reports}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(save_word_tokenizer(tmp_path_factory.mktemp("tokenizer"),
                                              "Solve the following math problem step by step"))


def test_every_layout_becomes_the_expected_rows(prepared):
    _, out, reports = prepared
    assert sorted(os.listdir(out)) == sorted(OUTPUTS.values())  # no staging file left
    for name, rows in EXPECTED.items():
        assert read_rows(out / OUTPUTS[name]) == rows, name
        assert reports[name].path == str(out / OUTPUTS[name])
    assert [(r.name, r.read, r.written, r.duplicates, sum(r.rejected.values()))
            for r in reports.values()] == [
        ("dapo_math_17k", 4, 3, 1, 0), ("aime24", 2, 2, 0, 0), ("aime25", 2, 2, 0, 0),
        ("amc", 2, 2, 0, 0), ("math500", 2, 2, 0, 0), ("omni_math", 1, 1, 0, 0),
        ("olympiadbench", 4, 4, 0, 0), ("minerva", 2, 2, 0, 0)]
    assert reports["dapo_math_17k"].line() == (
        f"dapo_math_17k: read 4 rows, wrote 3 to {out / 'dapo_math_17k.parquet'}, "
        "dropped 1 duplicates, rejected 0")


def test_dapo_prompts_are_left_as_published(prepared):
    sources, out, _ = prepared
    published = pq.read_table(sources / "dapo-math-17k" / "data" / "dapo-math-17k.parquet")
    first_of_each = [row["prompt"] for i, row in enumerate(published.to_pylist()) if i != 2]
    written = [row["prompt"] for row in read_rows(out / "dapo_math_17k.parquet")]
    assert [[{"role": m["role"], "content": m["content"]} for m in prompt]
            for prompt in first_of_each] == written
    assert tool.DAPO_PROMPT == INSTRUCTION.replace("{}", "{problem}")
    # the parquet layout of verl's examples, with the source's id beside the index
    assert pq.read_schema(out / "dapo_math_17k.parquet").field("extra_info").type == pa.struct(
        [("index", pa.int64()), ("split", pa.string()), ("id", pa.string())])


def test_outputs_load_with_the_prompt_loader(prepared, tokenizer):
    _, out, _ = prepared
    for name, rows in EXPECTED.items():
        dataset = load_prompt_dataset(out / OUTPUTS[name], tokenizer, max_prompt_tokens=512)
        assert [answer for _, answer in dataset.examples] == [
            row["reward_model"]["ground_truth"] for row in rows], name
        assert not dataset.skipped


def test_math_reward_scores_each_ground_truth(prepared):
    _, out, _ = prepared
    for name in OUTPUTS:
        for row in read_rows(out / OUTPUTS[name]):
            truth = row["reward_model"]["ground_truth"]
            # the form the prompt asks for, as written (OlympiadBench's "3, 4" included)
            assert math_reward(f"We add the two.\nAnswer: {truth}", truth) == 1.0, (name, truth)
            assert math_reward(f"So it is \\boxed{{{truth}}}.", truth) == 1.0, (name, truth)
            assert math_reward("So it is \\boxed{99991}.", truth) == 0.0, (name, truth)


def test_maxwell_jia_fields_and_olympiadbench_json_arrays(tmp_path):
    write_parquet(tmp_path / "in" / "aime24" / "aime_2024_problems.parquet", [
        {"ID": "2024-I-1", "Problem": "Find the time.", "Solution": "...", "Answer": 204}])
    write_json(tmp_path / "in" / "olympiadbench" / "OE_TO_maths_en_COMP.json", [
        {"id": 2231, "question": "Find all x.", "solution": ["..."],
         "final_answer": ["$x=1$, $x=2$"], "is_multiple_answer": True, "unit": None}])
    write_json(tmp_path / "in" / "olympiadbench" / "OE_TO_physics_en_COMP.json",
               [{"id": 1, "question": "Find the speed.", "final_answer": ["$3$"]}])
    reports = tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"))
    assert [(r.name, r.read, r.written) for r in reports] == [("aime24", 1, 1),
                                                              ("olympiadbench", 1, 1)]
    assert read_rows(tmp_path / "out" / "aime24.jsonl") == [
        expected("aime24", "Find the time.", "204", 0, "2024-I-1")]
    assert read_rows(tmp_path / "out" / "olympiadbench.jsonl") == [
        expected("olympiadbench", "Find all x.", "x=1, x=2", 0, "2231")]


BAD_ROWS = [
    ("math500", "test.jsonl", [{"problem": "What is 1?", "answer": "1"}, {"problem": "What?"}],
     "line 2: field 'answer' missing"),
    ("amc", "data/train.parquet", [{"id": 0, "problem": "A?", "answer": 1.0},
                                   {"id": 1, "problem": "B?", "answer": None}],
     "row 1: field 'answer' missing"),
    ("omni_math", "test.jsonl", [{"problem": "  ", "answer": "6"}],
     "line 1: field 'problem' is empty"),
    ("minerva", "test.jsonl", [{"question": "Q?", "answer": ["1"]}],
     "line 1: field 'answer' must be a string or number, got list"),
    ("aime24", "data/train.parquet", [{"id": 1, "answer": "3"}],
     "row 0: field 'problem' or 'Problem' missing"),
    ("aime25", "aime2025-I.jsonl", [{"question": "Q?", "answer": " "}],
     "line 1: field 'answer' is empty"),
    ("olympiadbench", "OE_TO_maths_en_COMP.json",
     [{"id": 1, "question": "Q?", "final_answer": ["$2$", "$$"]}],
     "row 0: field 'final_answer[1]' is empty"),
    ("dapo_math_17k", "data/dapo-math-17k.parquet", [dapo_row("Q?", "", "u")],
     "row 0: field 'reward_model.ground_truth' is empty"),
]


def write_source(root, name, file_name, rows):
    path = root / tool.SETS[name].folder / file_name
    {".parquet": write_parquet, ".jsonl": write_jsonl, ".json": write_json}[
        os.path.splitext(file_name)[1]](path, rows)
    return path


@pytest.mark.parametrize("name,file_name,rows,message", BAD_ROWS,
                         ids=[case[0] for case in BAD_ROWS])
def test_bad_row_is_named_and_nothing_is_written(tmp_path, name, file_name, rows, message):
    good_set = "aime25" if name == "minerva" else "minerva"
    write_source(tmp_path / "in", good_set, "good.jsonl", [{"question": "Q?", "answer": "1"}])
    path = write_source(tmp_path / "in", name, file_name, rows)
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"))
    # the good set is not written either, and no staging file is left
    assert not (tmp_path / "out").exists()


def test_skip_drops_and_counts_bad_rows(tmp_path):
    write_source(tmp_path / "in", "math500", "test.jsonl", [
        {"problem": "What is 1?", "answer": "1"}, {"problem": "What?"},
        {"problem": "", "answer": "2"}, {"problem": "What is 3?", "answer": {"value": 3}},
        {"problem": "What is 1?", "answer": "1"}])
    (report,) = tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"),
                                       on_invalid="skip")
    assert (report.read, report.written, report.duplicates) == (5, 1, 1)
    assert report.rejected == {"missing_field": 1, "empty_prompt": 1, "invalid_field": 1}
    assert report.line().endswith(
        "dropped 1 duplicates, rejected 3 (empty_prompt=1, invalid_field=1, missing_field=1)")
    assert read_rows(tmp_path / "out" / "math500.jsonl") == [
        expected("math500", "What is 1?", "1", 0)]


def test_a_set_with_no_usable_row_is_an_error(tmp_path):
    write_source(tmp_path / "in", "minerva", "test.jsonl", [{"question": "Q?"}])
    with pytest.raises(DataError, match="minerva: no usable rows"):
        tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"), on_invalid="skip")


def test_set_folders(tmp_path):
    write_source(tmp_path / "in", "amc", "data/train.parquet",
                 [{"id": 0, "problem": "A?", "answer": 1.0}])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'in' / 'aime24'}: no such "
                                                  "folder (set aime24)")):
        tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"), ["amc", "aime24"])
    with pytest.raises(DataError, match="holds none of the set folders"):
        tool.prepare_math_data(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "in" / "math500").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'in' / 'math500'}: no .parquet")):
        tool.prepare_math_data(str(tmp_path / "in"), str(tmp_path / "out"))


def test_command_line(tmp_path):
    sources = write_sources(tmp_path / "in")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, TOOL, "--input", str(sources),
         "--output", str(tmp_path / "out"), "--sets", "dapo_math_17k,amc"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        f"dapo_math_17k: read 4 rows, wrote 3 to {tmp_path / 'out' / 'dapo_math_17k.parquet'}, "
        "dropped 1 duplicates, rejected 0",
        f"amc: read 2 rows, wrote 2 to {tmp_path / 'out' / 'amc.jsonl'}, dropped 0 duplicates, "
        "rejected 0"]
    assert sorted(os.listdir(tmp_path / "out")) == ["amc.jsonl", "dapo_math_17k.parquet"]
    assert read_rows(tmp_path / "out" / "amc.jsonl") == EXPECTED["amc"]


def test_main_reports_a_bad_row_and_a_bad_set_name(tmp_path, capsys):
    path = write_source(tmp_path / "in", "amc", "data/train.parquet",
                        [{"id": 0, "problem": "A?", "answer": True}])
    assert tool.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"prepare_math_data: error: {path} row 0: field 'answer' "
                                       "must be a string or number, got bool\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", "x", "--output", "y", "--sets", "aime24,aime26"])
    assert exit_info.value.code == 2
    assert "unknown set(s) aime26" in capsys.readouterr().err


def test_help_describes_each_layout():
    for name, source in tool.SETS.items():
        assert f"  {source.folder}/ " in tool.__doc__, name
        assert source.output in tool.__doc__, name
        assert OUTPUTS[name] == source.output
    for published in ["BytedTsinghua-SIA/DAPO-Math-17k", "HuggingFaceH4/aime_2024",
                      "Maxwell-Jia/AIME_2024", "opencompass/AIME2025", "yentinglin/aime_2025",
                      "AI-MO/aimo-validation-amc", "HuggingFaceH4/MATH-500", "KbsdJames/Omni-MATH",
                      "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "math-ai/minervamath"]:
        assert published in tool.__doc__, published
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
