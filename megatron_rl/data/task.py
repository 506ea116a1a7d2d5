"""What the RL loop needs from a task: token ids of each step's prompts with their answers,
held-out prompts (and the data.eval_sets files, loaded), how to read and score a response, the
vocabulary the model must cover, and for the built-in tasks the demonstrations of the supervised
warm start."""
import functools
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_rl.data.synthetic import (CharTokenizer, addition_problems, addition_prompt_tokens,
                                        addition_prompts, addition_prompts_outside,
                                        clock_walk_demonstrations,
                                        clock_walk_prompt_tokens, clock_walk_prompts,
                                        clock_walk_reward, clock_walk_split, draw)
from megatron_rl.errors import ConfigError
from megatron_rl.rewards.synthetic import score as exact_score
from megatron_rl.seeds import derive_seed

Prompt = Tuple[List[int], str]  # (prompt token ids, ground-truth answer)

RESAMPLE_STREAM = 1  # derive_seed's tag of the extra prompts' stream (resample_seed)


def resample_seed(seed: int, step: int, round: int) -> int:
    """The seed of dynamic sampling's extra prompts of (step, round): a stream of their own, so
    drawing them moves nothing in the steps' prompt stream (derive_seed(seed, step))."""
    return derive_seed(seed, RESAMPLE_STREAM, step, round)


@dataclass
class EvalPrompts:
    """One data.eval_sets entry, loaded: its prompts (the first max_prompts usable rows) and the
    rows skipped by reason (data.on_invalid=skip)."""
    name: str
    prompts: List[Prompt]
    skipped: dict


@dataclass
class Task:
    vocab_size: int
    eos_id: int
    decode: Callable[[List[int]], str]
    prompts_for_step: Callable[[int, int], List[Prompt]]  # (step, count) -> prompts
    # (step, round, count) -> the extra prompts of dynamic sampling's round `round` >= 1 of
    # `step` (algorithm.filter_equal_groups: resample): training prompts, never an eval prompt,
    # drawn from resample_seed(data.seed, step, round)
    prompts_for_resample: Callable[[int, int, int], List[Prompt]]
    eval_prompts: List[Prompt]
    skipped_rows: dict
    # (responses, answers) -> rewards, in the trainer process (reward.fn = "exact")
    score: Callable[[Sequence[str], Sequence[str]], List[float]] = exact_score
    # (count, seed) -> (prompt text, response text) pairs for the warm start; None: no warm start
    demonstrations: Optional[Callable[[int, int], List[Tuple[str, str]]]] = None
    # data.eval_sets, in their order (eval_prompts is then empty)
    eval_sets: List[EvalPrompts] = field(default_factory=list)


def task_vocab_size(d) -> int:
    """The vocabulary the model must cover for data config `d` (the dataset task reads its
    tokenizer from data.tokenizer_dir); ConfigError naming the key when it cannot be read."""
    if d.task != "dataset":
        return CharTokenizer().vocab_size
    from megatron_rl.data.prompts import load_tokenizer

    try:
        return len(load_tokenizer(d.tokenizer_dir))
    except Exception as e:
        raise ConfigError(f"data.tokenizer_dir={d.tokenizer_dir}: no tokenizer could be "
                          f"loaded from it ({type(e).__name__}: {e})") from e


def longest_prompt_tokens(d) -> int:
    """The longest prompt of data config `d` in tokens, known before any data is read for the
    built-in tasks; 1 for the dataset task, whose rows are checked as they load
    (data/prompts.py load_prompt_dataset max_positions)."""
    if d.task == "addition":
        return addition_prompt_tokens(d.digits)
    if d.task == "clock_walk":
        return clock_walk_prompt_tokens(d.walk_digits)
    return 1


def _check_resample_pool(cfg, empty: bool) -> None:
    if empty and cfg.algorithm.filter_equal_groups == "resample":
        raise ConfigError(f"algorithm.filter_equal_groups=resample draws extra prompts outside "
                          f"the held-out ones, but every data.task={cfg.data.task} prompt is "
                          f"among the data.eval_prompts={cfg.data.eval_prompts} held out")


def build_task(cfg, training_prompts: bool = True) -> Task:
    """The task of JobConfig `cfg`. training_prompts=False (the evaluator): data.path is not
    read when nothing needs it (data.eval_sets given, data.eval_disjoint off), and
    prompts_for_step then raises."""
    d = cfg.data
    if d.task == "addition":
        tokenizer = CharTokenizer()
        # problems are drawn at random: the extra prompts skip the eval draw's
        held_out = {p for p, _ in addition_problems(d.eval_prompts, d.digits, d.eval_seed)}
        _check_resample_pool(cfg, len(held_out) >= 10 ** (2 * d.digits))
        return Task(
            vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, decode=tokenizer.decode,
            prompts_for_step=lambda step, count: addition_prompts(
                count, d.digits, derive_seed(d.seed, step), tokenizer),
            prompts_for_resample=lambda step, round, count: addition_prompts_outside(
                count, d.digits, resample_seed(d.seed, step, round), held_out, tokenizer),
            eval_prompts=addition_prompts(d.eval_prompts, d.digits, d.eval_seed, tokenizer),
            skipped_rows={},
            demonstrations=lambda count, seed: addition_problems(count, d.digits, seed))
    if d.task == "clock_walk":
        tokenizer = CharTokenizer()
        train, held_out = clock_walk_split(d.walk_digits, d.eval_prompts, d.eval_seed)
        reward = functools.partial(clock_walk_reward, steps=d.walk_steps)
        return Task(
            vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, decode=tokenizer.decode,
            prompts_for_step=lambda step, count: clock_walk_prompts(
                draw(train, count, derive_seed(d.seed, step)), tokenizer),
            prompts_for_resample=lambda step, round, count: clock_walk_prompts(
                draw(train, count, resample_seed(d.seed, step, round)), tokenizer),
            eval_prompts=clock_walk_prompts(held_out, tokenizer), skipped_rows={},
            score=lambda responses, answers: [reward(r, a) for r, a in zip(responses, answers)],
            demonstrations=lambda count, seed: clock_walk_demonstrations(
                train, count, d.walk_steps, seed, slip=d.walk_slip))
    from megatron_rl.data.prompts import load_prompt_dataset, load_tokenizer

    tokenizer = load_tokenizer(d.tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {d.tokenizer_dir} has no eos token to stop on")

    def load(path, prompt_key, answer_key, max_new_tokens, max_new_tokens_key):
        return load_prompt_dataset(path, tokenizer, prompt_key=prompt_key, answer_key=answer_key,
                                   max_prompt_tokens=d.max_prompt_tokens, on_invalid=d.on_invalid,
                                   apply_chat_template=d.apply_chat_template,
                                   # a prompt the model has no room to answer fails here, not
                                   # when a step (or an evaluation) draws it
                                   max_positions=cfg.model.max_position_embeddings,
                                   max_new_tokens=max_new_tokens,
                                   max_new_tokens_key=max_new_tokens_key)

    dataset = None
    if training_prompts or not d.eval_sets or d.eval_disjoint:
        dataset = load(d.path, d.prompt_key, d.answer_key, cfg.rollout.max_new_tokens,
                       "rollout.max_new_tokens")
    loaded = []
    for index, entry in enumerate(d.eval_sets):
        key = (f"data.eval_sets[{index}].max_new_tokens" if entry.max_new_tokens
               else "rollout.max_new_tokens")
        rows = load(entry.path, entry.prompt_key or d.prompt_key,
                    entry.answer_key or d.answer_key,
                    entry.max_new_tokens or cfg.rollout.max_new_tokens, key)
        count = len(rows) if entry.max_prompts is None else entry.max_prompts
        if d.eval_disjoint:
            check_disjoint(dataset, d.path, rows, f"data.eval_sets[{index}] ({entry.name})",
                           count)
        loaded.append(EvalPrompts(entry.name, rows.examples[:count], dict(rows.skipped)))

    def prompts_for_step(step, count):
        if dataset is None:
            raise RuntimeError("this task was built without its training prompts")
        return dataset.batch(step, count, d.seed)

    # without eval sets: a fixed draw from the training prompts (which the steps' stream also
    # draws; the extra prompts of dynamic sampling leave them out)
    eval_prompts = [] if d.eval_sets else dataset.batch(0, d.eval_prompts, d.eval_seed)

    @functools.cache
    def resample_pool() -> List[int]:  # training rows whose prompt is no evaluation prompt
        held_out = {tuple(ids) for ids, _ in eval_prompts}
        held_out |= {tuple(ids) for entry in loaded for ids, _ in entry.prompts}
        return [i for i, (ids, _) in enumerate(dataset.examples) if tuple(ids) not in held_out]

    if cfg.algorithm.filter_equal_groups == "resample" and dataset is not None:
        _check_resample_pool(cfg, not resample_pool())
    return Task(
        vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        prompts_for_step=prompts_for_step,
        prompts_for_resample=lambda step, round, count: [
            dataset.examples[i]
            for i in draw(resample_pool(), count, resample_seed(d.seed, step, round))],
        eval_prompts=eval_prompts,
        skipped_rows=dict(dataset.skipped) if dataset is not None else {},
        eval_sets=loaded)


def check_disjoint(train, train_path: str, eval_rows, what: str, count: int) -> None:
    """DataError unless none of the first `count` prompts of eval set `eval_rows` (`what`
    names it) is a prompt of the training file: the same token ids after the chat template."""
    from megatron_rl.data.prompts import DataError

    seen = {}
    for (ids, _), location in zip(train.examples, train.locations):
        seen.setdefault(tuple(ids), location)
    for (ids, _), location in zip(eval_rows.examples[:count], eval_rows.locations):
        if tuple(ids) in seen:
            raise DataError(f"data.eval_disjoint=true: {eval_rows.source} {location} ({what}) "
                            f"is the prompt of {train_path} {seen[tuple(ids)]} (data.path)")
