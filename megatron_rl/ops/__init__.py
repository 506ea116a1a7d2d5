"""Vocab-parallel log-prob / entropy / covariance ops (C++/CUDA extension with a PyTorch fallback).

See docs/ops.md for the API, the memory model and the formulas.
"""
from megatron_rl.ops.fused_output import output_layer_logprobs_entropy
from megatron_rl.ops.vocab_parallel import (vocab_parallel_covariance,
                                            vocab_parallel_logprobs_entropy)

__all__ = ["vocab_parallel_logprobs_entropy", "vocab_parallel_covariance",
           "output_layer_logprobs_entropy"]
