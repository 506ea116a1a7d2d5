"""The interface every rollout engine implements (RolloutEngine) and what goes in and out of it.

A leaf module (dataclasses and typing only), so that code which takes an engine (the trainer,
evaluation) can name the interface without importing an engine; rollout/factory.py builds one.
"""
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Protocol, Sequence, runtime_checkable


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


@runtime_checkable
class RolloutEngine(Protocol):
    """What the training loop talks to: the built-in engine (rollout/builtin.py) and the SGLang
    one (rollout/sglang_rollout.py). Every rank of the job holds one and calls each method
    together with the others."""

    # The RL steps whose updates are in the weights it samples from (a resumed job starts it at
    # its checkpoint's step); each Sample carries the version that drew it.
    weight_version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: Optional[int] = None) -> List[Sample]:
        """This rank's prompts in, this rank's samples out: params.n per prompt, contiguous per
        prompt, prompt_index local to `prompts`. `seed` seeds the draw where the engine can."""

    def prefetch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Start generating the next step's samples now, where the engine can (async_rollout);
        the generate() that follows with the same prompts and params takes them."""

    def update_weights(self) -> None:
        """After an optimizer step: the engine samples from the new weights, version + 1."""

    def shutdown(self) -> None:
        """Release what the engine holds (servers, groups); every rank, once, at the end."""
