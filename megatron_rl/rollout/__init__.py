"""Rollout engines: SGLang servers (production) and the built-in engine (small CPU runs, tests).

Both take token-id prompts and SamplingParams and return Samples with the response token ids,
their log-probs under the sampling distribution and a finish reason.
"""
from megatron_rl.rollout.types import Sample, SamplingParams

__all__ = ["Sample", "SamplingParams"]
