"""The built-in clock_walk task: its verifier, its disjoint held-out set, its demonstrations, and
the task object the trainer builds from a config."""
import itertools

import pytest

from megatron_rl.config import load_config
from megatron_rl.data.synthetic import (CharTokenizer, clock_walk_demonstrations,
                                        clock_walk_problems, clock_walk_reward, clock_walk_split)
from megatron_rl.data.task import build_task


def brute_force_solvable(allowed: str, start: int, target: int, steps: int) -> bool:
    digits = [int(c) for c in allowed]
    return any((start + sum(p)) % 10 == target for p in itertools.product(digits, repeat=steps))


@pytest.mark.parametrize("response, expected", [
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=2", 1.0),    # "3569 9 2=": from 9 to 2
    ("9+9=8 8+9=7 7+3=0 0+9=9 9+3=2", 1.0),    # another path is just as right
    (" 9+9=8 8+9=7 7+3=0 0+6=6 6+6=2 ", 1.0),  # surrounding blanks are not the answer's
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+5=1", 0.0),    # does not end on the target
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=3", 0.0),    # wrong total written
    ("9+9=8 8+9=7 7+3=0 0+4=4 4+8=2", 0.0),    # 4 and 8 are not allowed digits
    ("9+9=8 8+9=7 8+3=1 1+5=6 6+6=2", 0.0),    # a step that does not start from the total
    ("8+9=7 7+9=6 6+3=9 9+6=5 5+7=2", 0.0),    # does not start from the start
    ("9+9=8 8+9=7 7+3=0 0+2=2", 0.0),          # one step short
    ("9+9=8 8+9=7 7+3=0 0+6=6 6+6=2 2+9=1", 0.0),  # one step too many
    ("9+9=8  8+9=7 7+3=0 0+6=6 6+6=2", 0.0),   # two blanks: not the format
    ("9+0=9 9+9=8 8+9=7 7+3=0 0+2=2", 0.0),    # 0 is never a digit to add
    ("", 0.0),
])
def test_reward_checks_every_step(response, expected):
    assert clock_walk_reward(response, "3569 9 2", steps=5) == expected


def test_every_problem_is_solvable_and_listed():
    problems = clock_walk_problems(steps=3, num_allowed=2)
    every = [("".join(map(str, a)), s, t) for a in itertools.combinations(range(1, 10), 2)
             for s in range(10) for t in range(10)]
    assert problems == [p for p in every if brute_force_solvable(*p, steps=3)]
    assert len(problems) < len(every)  # some targets are out of reach, e.g. 1 + {2, 4, 6} * 3


def test_held_out_set_is_disjoint_and_fixed():
    train, held_out = clock_walk_split(5, 4, 500, eval_seed=999_983)
    assert len(held_out) == 500
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(clock_walk_problems(5, 4))
    assert clock_walk_split(5, 4, 500, eval_seed=999_983) == (train, held_out)
    assert clock_walk_split(5, 4, 500, eval_seed=1)[1] != held_out
    with pytest.raises(ValueError, match="data.eval_prompts"):
        clock_walk_split(5, 4, len(clock_walk_problems(5, 4)), eval_seed=0)


def test_demonstrations_are_right_diverse_and_from_training_problems():
    train, held_out = clock_walk_split(5, 4, 500, eval_seed=999_983)
    pairs = clock_walk_demonstrations(train, 400, steps=5, seed=3)
    train_prompts = {f"{a} {s} {t}=" for a, s, t in train}
    for prompt, response in pairs:
        assert prompt in train_prompts
        assert clock_walk_reward(response, prompt[:-1], steps=5) == 1.0
        assert len(response) + 1 >= 20  # + <eos>: the 20-token floor
    # A problem drawn twice is mostly solved two ways: the warm start sees diverse paths.
    by_prompt = {}
    for prompt, response in pairs:
        by_prompt.setdefault(prompt, set()).add(response)
    repeated = [p for p in by_prompt if sum(q == p for q, _ in pairs) > 1]
    assert repeated and sum(len(by_prompt[p]) > 1 for p in repeated) > len(repeated) / 2
    assert clock_walk_demonstrations(train, 400, steps=5, seed=3) == pairs


def test_task_from_config_scores_with_its_verifier():
    cfg = load_config(None, ["data.task=clock_walk", "data.eval_prompts=500", "model.vocab_size=20"])
    task = build_task(cfg, lambda *parts: sum(parts))
    tok = CharTokenizer()
    assert len(task.eval_prompts) == 500
    eval_texts = {tok.decode(ids) for ids, _ in task.eval_prompts}
    for step in range(1, 40):
        for ids, answer in task.prompts_for_step(step, 16):
            assert tok.decode(ids) not in eval_texts
            assert tok.decode(ids) == answer + "="
    prompt, answer = task.eval_prompts[0]
    (demo_prompt, demo_response), = task.demonstrations(1, 0)
    assert task.score([demo_response, "0+1=1"], [demo_prompt[:-1], answer]) == [1.0, 0.0]


def test_demonstrations_below_full_aim_are_honest_about_where_they_end():
    train, _ = clock_walk_split(5, 4, 500, eval_seed=999_983)
    pairs = clock_walk_demonstrations(train, 600, steps=5, seed=5, aim=0.5)
    landed = 0
    for prompt, response in pairs:
        allowed, start, target = prompt[:-1].split()
        end = response.split(" ")[-1][-1]
        # every step's arithmetic is right, and the written end is where the path ends ...
        assert clock_walk_reward(response, f"{allowed} {start} {end}", steps=5) == 1.0
        landed += clock_walk_reward(response, prompt[:-1], steps=5)
    # ... which is the target for about half (the aimed ones) plus the random paths that hit
    assert 0.45 < landed / len(pairs) < 0.7
    assert all(clock_walk_reward(r, p[:-1], steps=5) == 1.0
               for p, r in clock_walk_demonstrations(train, 100, steps=5, seed=5, aim=1.0))
