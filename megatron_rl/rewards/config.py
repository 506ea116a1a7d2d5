"""Reward config: which verifier, and how its checks are isolated."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class RewardConfig:
    # "exact" (the task's own check: exact match of the answer, or clock_walk's path check;
    # scored in the trainer process), "math" (math-verify) or
    # "package.module:function" of a user module listed in allowed_modules. Everything but
    # "exact" runs in worker processes with a timeout and a memory cap.
    fn: str = "exact"
    allowed_modules: List[str] = field(default_factory=list)
    workers: int = 2
    timeout_s: float = 10.0
    memory_limit_mb: Optional[int] = 2048
    # A reward outside [min_value, max_value], NaN or inf is a verifier fault: scored 0 and
    # counted (reward/invalid_total), never passed on to the advantages.
    min_value: float = -1.0
    max_value: float = 1.0

    def __post_init__(self):
        if not self.min_value < self.max_value:
            raise ValueError(f"reward.min_value={self.min_value} must be below "
                             f"reward.max_value={self.max_value}")
        if self.workers < 1 or self.timeout_s <= 0:
            raise ValueError("reward.workers must be >= 1 and reward.timeout_s > 0")
