"""Clip-Cov / KL-Cov selection and loss are independent of micro-batch size and DP size
(one torchrun launch, 2 gloo processes; the checks are in workers/selection_worker.py)."""
import os

import pytest

from tests.torchrun import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "workers", "selection_worker.py")


@pytest.mark.distributed
def test_selection_and_loss_identical_across_layouts():
    out = run_torchrun(WORKER, nproc=2, timeout=300)
    lines = [line for line in out.splitlines() if "identical in all 3 layouts" in line]
    assert len(lines) == 5, out
