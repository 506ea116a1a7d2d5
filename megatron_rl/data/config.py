"""Prompt data config."""
import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_rl.errors import SEED_RANGE, check_range


@dataclass
class DataConfig:
    # "addition" / "clock_walk": the built-in synthetic tasks (data/synthetic.py; their own
    # tokenizer, which model.vocab_size must cover). "dataset": prompts from `path` (jsonl or
    # parquet, verl/DAPO format) tokenized with the HF tokenizer in `tokenizer_dir`
    # (docs/data_and_rewards.md).
    task: Literal["addition", "clock_walk", "dataset"] = "addition"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"  # dotted path into nested fields
    tokenizer_dir: Optional[str] = None
    max_prompt_tokens: int = 1024
    # bad rows: stop naming the row, or count and skip
    on_invalid: Literal["error", "skip"] = "error"
    apply_chat_template: bool = True
    digits: int = 2  # operand digits of the addition task
    walk_steps: int = 5  # digits a clock_walk response adds (5 tokens each)
    walk_digits: int = 4  # how many digits (of 1-9) a clock_walk prompt allows
    # how often the clock_walk warm start's demonstrator writes a wrong total when it adds a 9
    # (less for smaller digits, never for a 1): the room RL has above the warm start
    walk_slip: float = 0.0
    seed: int = 0  # the order of the training prompt stream
    # held-out prompts for validation accuracy; clock_walk takes them from a set of problems
    # disjoint from training's (data/synthetic.py clock_walk_split), cut by eval_seed
    eval_prompts: int = 64
    eval_seed: int = 999_983

    def __post_init__(self):
        if self.task == "dataset" and (self.path is None or self.tokenizer_dir is None):
            raise ValueError("data.task=dataset needs data.path and data.tokenizer_dir")
        if self.max_prompt_tokens < 1:
            raise ValueError("data.max_prompt_tokens must be >= 1")
        if not 2 <= self.walk_steps <= 8:
            raise ValueError(f"data.walk_steps must be in [2, 8], got {self.walk_steps}")
        if not 2 <= self.walk_digits <= 8:
            raise ValueError(f"data.walk_digits must be in [2, 8], got {self.walk_digits}")
        if not 0.0 <= self.walk_slip <= 1.0:
            raise ValueError(f"data.walk_slip must be in [0, 1], got {self.walk_slip}")
        if self.eval_prompts < 1:
            # 0 is not "no evaluation" (that is training.eval_interval=0): refused rather than
            # an accuracy of 0 over no prompts
            raise ValueError(f"data.eval_prompts must be >= 1, got {self.eval_prompts} "
                             f"(training.eval_interval=0 turns evaluation off)")
        for name in ("seed", "eval_seed"):
            check_range("data", self, name, **SEED_RANGE)
        if self.task == "clock_walk":
            # as many problems as data/synthetic.py clock_walk_problems lists; the held-out set
            # must leave some for training
            problems = 10 * math.comb(9, self.walk_digits)
            if self.eval_prompts >= problems:
                raise ValueError(f"data.eval_prompts={self.eval_prompts} must be below the "
                                 f"{problems} clock_walk problems of data.walk_digits="
                                 f"{self.walk_digits}, so some are left for training")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"data.digits must be in [1, 6], got {self.digits}")
