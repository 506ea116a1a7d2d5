"""Reward config: which verifier, and how its checks are isolated."""
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_rl.errors import check_range


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
    memory_limit_mb: Optional[int] = 2048  # per worker; null: no limit
    # A reward outside [min_value, max_value], NaN or inf is a verifier fault: scored 0 and
    # counted (reward/invalid_total), never passed on to the advantages.
    min_value: float = -1.0
    max_value: float = 1.0

    def __post_init__(self):
        check_range("reward", self, "workers", 1)
        check_range("reward", self, "timeout_s", 0, low_open=True)
        check_range("reward", self, "memory_limit_mb", 1, null="no limit")
        check_range("reward", self, "min_value", -1e30, 1e30)
        check_range("reward", self, "max_value", self.min_value, 1e30, low_open=True)
