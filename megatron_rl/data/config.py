"""Prompt data config."""
from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    # Built-in synthetic verifiable task (its own tokenizer; model.vocab_size must cover it).
    task: Literal["addition"] = "addition"
    digits: int = 2  # operand digits of the addition task
    seed: int = 0
    eval_prompts: int = 64  # held-out prompts for greedy validation accuracy
    eval_seed: int = 999_983  # disjoint stream from the training prompts

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise ValueError(f"data.digits must be in [1, 6], got {self.digits}")
