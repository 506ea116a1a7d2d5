"""Rollout config: which engine, how many prompts per step, sampling parameters."""
from dataclasses import dataclass
from typing import Literal


@dataclass
class RolloutConfig:
    engine: Literal["builtin"] = "builtin"
    # Prompts per RL step over all data-parallel ranks; each gets algorithm.n responses.
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout.prompts_per_step and rollout.max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, "
                             f"got {self.temperature}")
