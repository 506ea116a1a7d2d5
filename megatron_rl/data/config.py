"""Prompt data config."""
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class DataConfig:
    # "addition": the built-in synthetic task (its own tokenizer; model.vocab_size must cover
    # it). "dataset": prompts from `path` (jsonl or parquet, verl/DAPO format) tokenized with the
    # HF tokenizer in `tokenizer_dir` (docs/data_and_rewards.md).
    task: Literal["addition", "dataset"] = "addition"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"  # dotted path into nested fields
    tokenizer_dir: Optional[str] = None
    max_prompt_tokens: int = 1024
    on_invalid: Literal["error", "skip"] = "error"  # bad rows: stop naming the row, or count and skip
    apply_chat_template: bool = True
    digits: int = 2  # operand digits of the addition task
    seed: int = 0
    eval_prompts: int = 64  # held-out prompts for greedy validation accuracy
    eval_seed: int = 999_983  # disjoint stream from the training prompts

    def __post_init__(self):
        if self.task == "dataset" and (self.path is None or self.tokenizer_dir is None):
            raise ValueError("data.task=dataset needs data.path and data.tokenizer_dir")
        if self.max_prompt_tokens < 1:
            raise ValueError("data.max_prompt_tokens must be >= 1")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"data.digits must be in [1, 6], got {self.digits}")
