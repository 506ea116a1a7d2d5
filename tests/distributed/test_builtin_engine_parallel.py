import pytest

from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_builtin_engine_tp2_pp2_match_single_process(tmp_path):
    out = run_torchrun("tests/distributed/workers/builtin_engine_worker.py", 2, [tmp_path / "ckpt"])
    assert "OK: built-in engine TP=2 and PP=2 match one process" in out
