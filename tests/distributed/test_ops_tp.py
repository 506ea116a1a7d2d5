"""Vocab-parallel ops at TP=2 (torchrun, gloo) against float64 references on the gathered logits.

One launch runs every check (tests/distributed/workers/ops_tp_worker.py): log-prob / entropy and
their gradients for odd shard widths, -inf logits, temperatures != 1, bf16 / fp32 / fp64, targets
on the other shard, padded vocabularies and the [s, b, V_local] layout; covariance; the
hidden-states version (grad_hidden all-reduced, grad_weight per shard); gradcheck; all through the
extension and again through the PyTorch fallback; and a control showing that dropping the
all-reduces is detected.
"""
import os

import pytest

from tests.torchrun import run_torchrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "ops_tp_worker.py")


@pytest.mark.distributed
def test_vocab_parallel_ops_tp2():
    out = run_torchrun(WORKER, nproc=2, timeout=300)
    for rank in (0, 1):
        assert f"ops_tp_worker rank {rank}: all checks passed" in out, out


@pytest.mark.distributed
def test_chunked_actor_path_tp2():
    """The trainer's chunked log-prob path at TP=2 (the model's hidden states and each rank's
    output-layer shard) against its logits path: old log-probs, update metrics, weights."""
    worker = os.path.join(os.path.dirname(WORKER), "chunked_logprobs_worker.py")
    out = run_torchrun(worker, nproc=2, timeout=300)
    for rank in (0, 1):
        assert f"chunked_logprobs_worker rank {rank}: all checks passed" in out, out
