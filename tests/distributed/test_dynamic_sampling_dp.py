"""Dynamic sampling at DP=2: the ranks agree on the number of extra rounds while they need
different numbers of groups (one torchrun launch; the checks are in
workers/dynamic_sampling_worker.py)."""
import pytest

from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_dynamic_sampling_rounds_line_up_across_dp_ranks(tmp_path):
    out = run_torchrun("tests/distributed/workers/dynamic_sampling_worker.py", 2, [tmp_path],
                       timeout=300)
    assert "OK: dynamic sampling at DP=2 runs the same rounds on every rank" in out
