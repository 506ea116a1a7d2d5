"""The built-in clock_walk task: its verifier, its disjoint held-out set, its demonstrations, and
the task object the trainer builds from a config."""
import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data.synthetic import (CharTokenizer, clock_walk_demonstrations,
                                        clock_walk_problems, clock_walk_reward, clock_walk_slip,
                                        clock_walk_split)
from megatron_rl.data.task import build_task


@pytest.mark.parametrize("response, expected", [
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=2", 1.0),    # "3569 9=": any allowed path is right
    ("9+3=2 2+3=5 5+3=8 8+3=1 1+3=4", 1.0),
    (" 9+9=8 8+9=7 7+3=0 0+6=6 6+6=2 ", 1.0),  # surrounding blanks are not the answer's
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=3", 0.0),    # a wrong total
    ("9+9=8 8+9=7 7+3=1 1+6=7 7+6=3", 0.0),    # a wrong total, the walk consistent after it
    ("9+9=8 8+9=7 7+3=0 0+4=4 4+8=2", 0.0),    # 4 and 8 are not allowed digits
    ("9+9=8 8+9=7 8+3=1 1+5=6 6+6=2", 0.0),    # a step that does not start from the total
    ("8+9=7 7+9=6 6+3=9 9+6=5 5+6=1", 0.0),    # does not start from the start
    ("9+9=8 8+9=7 7+3=0 0+6=6", 0.0),          # one step short
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=2 2+9=1", 0.0),  # one step too many
    ("9+9=8  8+9=7 7+3=0 0+6=6 6+6=2", 0.0),   # two blanks: not the format
    ("9+0=9 9+9=8 8+9=7 7+3=0 0+6=6", 0.0),    # 0 is never a digit to add
    ("9+9=18 8+9=7 7+3=0 0+6=6 6+6=2", 0.0),   # totals are mod 10
    ("", 0.0),
])
def test_reward_checks_every_step(response, expected):
    assert clock_walk_reward(response, "3569 9", steps=5) == expected


def test_held_out_set_is_disjoint_and_fixed():
    train, held_out = clock_walk_split(4, 500, eval_seed=999_983)
    assert len(held_out) == 500 and len(train) == 126 * 10 - 500
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(clock_walk_problems(4))
    assert clock_walk_split(4, 500, eval_seed=999_983) == (train, held_out)
    assert clock_walk_split(4, 500, eval_seed=1)[1] != held_out
    with pytest.raises(ValueError, match="data.eval_prompts"):
        clock_walk_split(4, len(clock_walk_problems(4)), eval_seed=0)


@pytest.mark.parametrize("digits", [2, 4, 8])
def test_config_refuses_a_held_out_set_that_leaves_no_training_problem(digits):
    count = len(clock_walk_problems(digits))
    base = ["data.task=clock_walk", f"data.walk_digits={digits}"]
    cfg = load_config(None, base + [f"data.eval_prompts={count - 1}"])
    assert cfg.data.eval_prompts == count - 1
    with pytest.raises(ConfigError, match=f"data.eval_prompts={count} must be below the {count}"):
        load_config(None, base + [f"data.eval_prompts={count}"])


def test_demonstrations_are_diverse_training_problems_that_slip_as_configured():
    train, _ = clock_walk_split(4, 500, eval_seed=999_983)
    train_prompts = {f"{a} {s}=" for a, s in train}
    exact = clock_walk_demonstrations(train, 300, steps=5, seed=3)
    for prompt, response in exact:
        assert prompt in train_prompts
        assert clock_walk_reward(response, prompt[:-1], steps=5) == 1.0
        assert len(response) + 1 >= 20  # + <eos>: the 20-token floor
    assert len({r for _, r in exact}) == len(exact)  # paths drawn, not one per problem

    sloppy = clock_walk_demonstrations(train, 4000, steps=5, seed=3, slip=0.5)
    slips, adds = {d: 0 for d in range(1, 10)}, {d: 0 for d in range(1, 10)}
    for prompt, response in sloppy:
        total = int(prompt[:-1].split()[1])
        for step in response.split(" "):
            written, digit, new = int(step[0]), int(step[2]), int(step[4])
            assert written == total  # the walk goes on from what was written
            adds[digit] += 1
            slips[digit] += new != (total + digit) % 10
            total = new
    assert slips[1] == 0
    for d in range(2, 10):  # each digit's slip rate, within 4 binomial standard deviations
        p = clock_walk_slip(d, 0.5)
        assert abs(slips[d] / adds[d] - p) < 4 * (p * (1 - p) / adds[d]) ** 0.5 + 1e-9


def test_task_from_config_scores_with_its_verifier():
    cfg = load_config(None, ["data.task=clock_walk", "data.eval_prompts=500",
                             "model.vocab_size=20"])
    task = build_task(cfg)
    tok = CharTokenizer()
    assert len(task.eval_prompts) == 500
    eval_texts = {tok.decode(ids) for ids, _ in task.eval_prompts}
    for step in range(1, 40):
        for ids, answer in task.prompts_for_step(step, 16):
            assert tok.decode(ids) not in eval_texts
            assert tok.decode(ids) == answer + "="
    (demo_prompt, demo_response), = task.demonstrations(1, 0)
    assert task.score([demo_response, "0+1=1"], [demo_prompt[:-1], task.eval_prompts[0][1]]) == [
        1.0, 0.0]
