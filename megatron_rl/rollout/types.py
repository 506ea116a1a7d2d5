"""The interface every rollout engine implements."""
from dataclasses import dataclass, field
from typing import List, Literal, Sequence


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k truncation
    max_new_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    n: int = 1  # samples per prompt; a prompt's samples come back contiguously

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be >= 1")


@dataclass
class Sample:
    prompt_ids: List[int]
    output_ids: List[int] = field(default_factory=list)
    # log pi(token) under the sampling distribution (logits / temperature, before top-p/top-k
    # truncation), one per output token; what the trainer's old log-probs are compared with.
    output_logprobs: List[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "abort"] = "length"
    weight_version: int = 0
    prompt_index: int = 0  # which prompt of the request this sample answers
