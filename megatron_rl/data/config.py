"""Prompt data config."""
import math
import re
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from megatron_rl.errors import SEED_RANGE, FieldError, check_range

EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# names the metrics of every set together take (eval/mean/accuracy)
RESERVED_EVAL_SET_NAMES = ("mean",)


@dataclass
class EvalSetConfig:
    """One held-out evaluation set (data.eval_sets, docs/data_and_rewards.md): a prompt file in
    data.path's format, loaded and tokenized as data.path is, and how to sample and score it.
    Its metrics are eval/<name>/accuracy (mean reward over all samples: avg@k), pass@<k>,
    response_tokens and truncated."""
    name: str  # letters, digits, _ . - (it is part of metric keys)
    path: str  # .jsonl or .parquet, verl / DAPO format like data.path
    prompt_key: Optional[str] = None  # null: data.prompt_key
    answer_key: Optional[str] = None  # null: data.answer_key
    temperature: float = 0.0  # 0: greedy (then samples must be 1)
    samples: int = 1  # k of avg@k and pass@k
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # null: rollout.max_new_tokens
    reward: Optional[str] = None  # null: reward.fn; "exact", "math" or "package.module:function"
    weight: float = 1.0  # in eval/mean/accuracy, the weighted mean over the sets
    max_prompts: Optional[int] = None  # the first N usable rows (null: all)

    def __post_init__(self):
        if not EVAL_SET_NAME.fullmatch(self.name):
            raise FieldError(f"name must be letters, digits, '_', '.' or '-' (it is part of the "
                             f"metric keys), got {self.name!r}")
        if self.name in RESERVED_EVAL_SET_NAMES:
            raise FieldError(f"name {self.name!r} is taken by eval/{self.name}/accuracy")
        if not self.path.endswith((".jsonl", ".parquet")):
            raise FieldError(f"path must be a .jsonl or .parquet file, got {self.path!r}")
        check_range(None, self, "temperature", 0)
        check_range(None, self, "samples", 1)
        if self.temperature == 0 and self.samples != 1:
            raise FieldError(f"samples must be 1 when temperature is 0 (greedy decoding draws "
                             f"the same response every time), got {self.samples}")
        check_range(None, self, "top_p", 0, 1, low_open=True)
        check_range(None, self, "max_new_tokens", 1, null="rollout.max_new_tokens")
        check_range(None, self, "weight", 0)
        check_range(None, self, "max_prompts", 1, null="every row")


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
    # Held-out sets from files (data.task=dataset only; docs/data_and_rewards.md): each is
    # evaluated every training.eval_interval steps and by `python -m megatron_rl.evaluate`.
    # Given, they replace the draw from the training prompts (data.eval_prompts, eval_seed).
    eval_sets: List[EvalSetConfig] = field(default_factory=list)
    # true: refuse an eval set holding a prompt of data.path (the same token ids after the chat
    # template), naming both files and rows
    eval_disjoint: bool = False

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
        if self.eval_sets and self.task != "dataset":
            raise ValueError(f"data.eval_sets needs data.task=dataset (the sets are tokenized "
                             f"with data.tokenizer_dir); data.task={self.task} evaluates on its "
                             f"own held-out problems")
        for index, entry in enumerate(self.eval_sets):
            first = next(i for i, e in enumerate(self.eval_sets) if e.name == entry.name)
            if first != index:
                raise ValueError(f"data.eval_sets[{index}].name {entry.name!r} is already the "
                                 f"name of data.eval_sets[{first}]")
        if self.eval_sets and not sum(e.weight for e in self.eval_sets) > 0:
            raise ValueError("data.eval_sets: every weight is 0; eval/mean/accuracy needs one "
                             "above 0")
        if self.eval_disjoint and not self.eval_sets:
            raise ValueError("data.eval_disjoint=true needs data.eval_sets (without them the "
                             "held-out prompts are a draw from data.path)")
