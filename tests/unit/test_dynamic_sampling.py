"""Dynamic sampling (algorithm.filter_equal_groups: resample): extra rounds fill the step with
informative groups, stop at algorithm.resample_max_rounds and top up with masked groups; the
extra prompts are deterministic, never eval prompts, and leave the steps' prompt stream alone;
the metrics count what was drawn. One process (a 1-rank group); the DP=2 case, where ranks need
different numbers of rounds, is tests/distributed/test_dynamic_sampling_dp.py."""
import json
import logging
import warnings

import pytest
import torch

from megatron_rl.algorithms import keep_groups
from megatron_rl.config import load_config
from megatron_rl.data.task import build_task
from megatron_rl.errors import ConfigError
from megatron_rl.training.trainer import RLTrainer

warnings.filterwarnings("ignore")

N, PROMPTS = 4, 4  # algorithm.n, rollout.prompts_per_step


def tiny_config(tmp_path, *overrides):
    return load_config("tests/configs/tiny_addition.yaml", [
        "training.sft_steps=0", "training.steps=2", "training.eval_interval=0",
        "training.probe_interval=0", f"rollout.prompts_per_step={PROMPTS}", f"algorithm.n={N}",
        "training.mini_batches=2", "training.micro_batch_size=2",
        "algorithm.filter_equal_groups=resample", "algorithm.resample_max_rounds=3",
        f"training.output_dir={tmp_path / 'run'}", f"training.cache_dir={tmp_path / 'cache'}",
        *overrides], world_size=1, on_this_host=True)


def scripted(good):
    """A reward rule that says in advance which groups are informative: a group whose answer
    `good` accepts gets rewards [1, 0, ..., 0], every other group all 0. (The trainer scores one
    generate call's samples at a time; their groups are contiguous from index 0.)"""
    def score(responses, answers):
        return [1.0 if good(a) and i % N == 0 else 0.0 for i, a in enumerate(answers)]
    return score


def draws(task, step, rounds):
    """The answers of the step's regular prompts, then of each extra round's, in draw order."""
    return ([a for _, a in task.prompts_for_step(step, PROMPTS)]
            + [a for r in range(1, rounds + 1) for _, a in task.prompts_for_resample(step, r,
                                                                                      PROMPTS)])


def group_answers(batch):
    return [batch.answers[g * N] for g in range(len(batch.samples) // N)]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    trainer = RLTrainer(tiny_config(tmp_path_factory.mktemp("dyn")))
    yield trainer
    trainer.close()


def test_keep_groups_takes_the_first_informative_then_the_first_others_in_draw_order():
    informative, flat = [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]
    rewards = torch.tensor([flat, informative, flat, informative, informative]).view(-1)
    assert keep_groups(rewards, 4, 2) == [1, 3]
    assert keep_groups(rewards, 4, 3) == [1, 3, 4]
    assert keep_groups(rewards, 4, 4) == [0, 1, 3, 4]  # topped up with the first flat group
    with pytest.raises(ValueError):
        keep_groups(rewards, 4, 6)


def test_resampling_fills_the_batch_with_informative_groups(trainer):
    """Odd answers are informative: the regular prompts have some flat groups, the extra
    rounds supply informative ones until the step holds PROMPTS of them, the first found."""
    trainer.task.score = scripted(lambda answer: int(answer) % 2 == 1)
    step = 1
    drawn = draws(trainer.task, step, 3)
    odd = [i for i, a in enumerate(drawn) if int(a) % 2]
    rounds = odd[PROMPTS - 1] // PROMPTS  # the round that draws the last one kept
    regular_odd = [a for a in drawn[:PROMPTS] if int(a) % 2]
    assert 0 < len(regular_odd) < PROMPTS and 1 <= rounds <= 3  # the case this test is about

    batch = trainer.rollout(step)
    assert group_answers(batch) == [drawn[i] for i in odd[:PROMPTS]]
    assert group_answers(batch)[:len(regular_odd)] == regular_odd  # the regular ones first
    assert len(batch.samples) == PROMPTS * N
    assert batch.rewards.view(-1, N).tolist() == [[1.0] + [0.0] * (N - 1)] * PROMPTS
    assert [s.prompt_index for s in batch.samples] == [i // N for i in range(PROMPTS * N)]
    assert batch.sampling_metrics == {
        "rollout/resample_rounds": rounds, "rollout/prompts_drawn": PROMPTS * (1 + rounds),
        "rollout/informative_groups": PROMPTS,
        "rollout/reward_mean_drawn": len([i for i in odd if i < PROMPTS * (1 + rounds)])
        / (N * PROMPTS * (1 + rounds))}
    # generated tokens count every round's responses, not only the kept ones
    assert batch.generated_tokens > sum(len(s.output_ids) for s in batch.samples)

    # deterministic in (step, round): the same weights sample the same batch again, whatever
    # the engine drew in between (a resumed run reproduces the uninterrupted one)
    trainer.rollout(step + 1)
    again = trainer.rollout(step)
    assert [s.output_ids for s in again.samples] == [s.output_ids for s in batch.samples]
    assert again.sampling_metrics == batch.sampling_metrics

    # score() keeps the rewards rollout gave; every kept group has a loss
    trainer.score(batch)
    trainer.advantages(batch)
    masks = torch.cat([mb.loss_mask.sum(-1) for mini in batch.mini_batches for mb in mini])
    assert bool((masks > 0).all())


def test_resampling_stops_at_its_cap_and_tops_up_with_masked_groups(trainer, caplog):
    """Only answer 9 is informative: the cap (1 round here) ends the search; the step trains on
    the informative groups found and the first flat ones, which get no loss, and says so."""
    trainer.cfg.algorithm.resample_max_rounds = 1
    try:
        step = next(s for s in range(1, 50)
                    if 0 < draws(trainer.task, s, 1).count("9") < PROMPTS)
        drawn = draws(trainer.task, step, 1)
        trainer.task.score = scripted(lambda answer: answer == "9")
        with caplog.at_level(logging.INFO, logger="megatron_rl"):
            batch = trainer.rollout(step)
    finally:
        trainer.cfg.algorithm.resample_max_rounds = 3
    found = drawn.count("9")
    keep = sorted([i for i, a in enumerate(drawn) if a == "9"]
                  + [i for i, a in enumerate(drawn) if a != "9"][:PROMPTS - found])
    assert group_answers(batch) == [drawn[i] for i in keep]
    assert batch.sampling_metrics["rollout/resample_rounds"] == 1
    assert batch.sampling_metrics["rollout/prompts_drawn"] == 2 * PROMPTS
    assert batch.sampling_metrics["rollout/informative_groups"] == found
    assert f"{found} of {PROMPTS} groups informative after 1 extra round(s)" in caplog.text

    # as many groups and micro-batches as ever; the flat ones carry no loss
    trainer.advantages(batch)
    assert len(batch.mini_batches) == 2 and len(batch.samples) == PROMPTS * N
    masks = torch.cat([mb.loss_mask.sum(-1) for mini in batch.mini_batches for mb in mini])
    has_loss = (masks.view(-1, N) > 0).any(-1).tolist()
    assert has_loss == [a == "9" for a in group_answers(batch)]

    # nothing informative at all: the full cap, then the regular groups, all masked
    trainer.task.score = scripted(lambda answer: False)
    batch = trainer.rollout(step)
    assert batch.sampling_metrics["rollout/resample_rounds"] == 3
    assert batch.sampling_metrics["rollout/informative_groups"] == 0
    assert group_answers(batch) == drawn[:PROMPTS]


def test_train_step_metrics(trainer):
    trainer.task.score = scripted(lambda answer: int(answer) % 2 == 1)
    record = trainer.train_step(2)
    batch_rounds = record["rollout/resample_rounds"]
    assert record["rollout/prompts_drawn"] == PROMPTS * (1 + batch_rounds)
    assert record["rollout/informative_groups"] == PROMPTS
    # reward_mean is over the batch the optimizer sees: one right response per kept group
    assert record["reward_mean"] == record["rollout/reward_mean"] == 1 / N
    assert record["rollout/equal_reward_group_frac"] == 0.0
    assert record["rollout/reward_mean_drawn"] <= record["reward_mean"]
    json.dumps(record)  # every value is a plain number


def test_without_resampling_the_step_is_as_before(trainer):
    trainer.cfg.algorithm.filter_equal_groups = True
    try:
        trainer.task.score = scripted(lambda answer: False)
        record = trainer.train_step(3)
        assert not any(k in record for k in ("rollout/resample_rounds", "rollout/prompts_drawn",
                                             "rollout/informative_groups"))
        batch = trainer.rollout(4)
    finally:
        trainer.cfg.algorithm.filter_equal_groups = "resample"
    assert batch.rewards is None and batch.sampling_metrics == {}
    assert [a for _, a in trainer.task.prompts_for_step(4, PROMPTS)] == group_answers(batch)


def dataset_overrides(tmp_path):
    from tests.tiny_tokenizer import save_word_tokenizer

    words = "what is one two three four five six seven eight nine ten ?"
    tokenizer_dir = save_word_tokenizer(tmp_path / "tokenizer", words)
    rows = [{"prompt": [{"role": "user", "content": f"what is {w} ?"}],
             "reward_model": {"ground_truth": str(i)}}
            for i, w in enumerate(words.split()[2:-1])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data.task=dataset", f"data.path={tmp_path / 'train.jsonl'}",
            f"data.tokenizer_dir={tokenizer_dir}", "training.sft_steps=0", "data.eval_prompts=4",
            "model.vocab_size=32"]


@pytest.mark.parametrize("kind", ["addition", "clock_walk", "dataset"])
def test_extra_prompts_are_deterministic_training_prompts_apart_from_the_stream(kind, tmp_path):
    overrides = {"addition": ["data.digits=1", "data.eval_prompts=50"],
                 "clock_walk": ["data.task=clock_walk", "data.eval_prompts=100"],
                 "dataset": dataset_overrides(tmp_path)}[kind]
    cfg = load_config(None, overrides + ["algorithm.filter_equal_groups=resample"],
                      world_size=1, on_this_host=True)
    task = build_task(cfg)
    stream = [task.prompts_for_step(step, 16) for step in range(1, 4)]
    extra = {(step, r): task.prompts_for_resample(step, r, 16)
             for step in range(1, 4) for r in range(1, 4)}
    held_out = {tuple(ids) for ids, _ in task.eval_prompts}
    assert all(len(p) == 16 and not {tuple(ids) for ids, _ in p} & held_out
               for p in extra.values())
    # deterministic in (data seed, step, round), also in a task built afresh (a resumed run)
    fresh = build_task(cfg)
    assert all(fresh.prompts_for_resample(*key, 16) == p for key, p in extra.items())
    assert len({tuple(tuple(ids) for ids, _ in p) for p in extra.values()}) == len(extra)
    # the steps' stream is what it was, and what a task that never resampled draws
    assert [task.prompts_for_step(step, 16) for step in range(1, 4)] == stream
    assert [build_task(load_config(None, overrides, world_size=1)).prompts_for_step(step, 16)
            for step in range(1, 4)] == stream
    # another data seed, other extra prompts
    other = build_task(load_config(None, overrides + ["data.seed=1"], world_size=1))
    assert other.prompts_for_resample(1, 1, 16) != extra[1, 1]


def test_resampling_is_refused_when_every_prompt_is_held_out(tmp_path):
    overrides = ["data.digits=1", "data.eval_prompts=5000"]  # every one of the 100 problems
    build_task(load_config(None, overrides, world_size=1))
    with pytest.raises(ConfigError, match="every data.task=addition prompt is among the "
                                          "data.eval_prompts=5000 held out"):
        build_task(load_config(None, overrides + ["algorithm.filter_equal_groups=resample"],
                               world_size=1))
    dataset = dataset_overrides(tmp_path) + ["data.eval_prompts=200"]
    build_task(load_config(None, dataset, world_size=1, on_this_host=True))
    with pytest.raises(ConfigError, match="every data.task=dataset prompt"):
        build_task(load_config(None, dataset + ["algorithm.filter_equal_groups=resample"],
                               world_size=1, on_this_host=True))
