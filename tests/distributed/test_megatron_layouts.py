"""TP=2, PP=2, DP=2 (2 processes) and TP2xDP2, TP2xPP2, PP2xDP2 (4 processes) give the logits,
loss, gradients and optimizer step of one process; checkpoints reshard between layouts; and the
check does fail when a TP mapping is broken."""
import pytest

from tests.torchrun import run_torchrun

WORKER = "tests/distributed/workers/megatron_layouts_worker.py"
pytestmark = pytest.mark.distributed


def test_two_process_layouts_match_single_process(tmp_path):
    out = run_torchrun(WORKER, 2, [tmp_path, "tp2", "pp2", "dp2"])
    assert "OK: tp2 pp2 dp2 match" in out


def test_four_process_layouts_with_tied_embeddings(tmp_path):
    out = run_torchrun(WORKER, 4, [tmp_path, "tp2dp2", "tp2pp2", "pp2dp2"],
                       env={"TIE_EMBEDDINGS": "1"})
    assert "OK: tp2dp2 tp2pp2 pp2dp2 match" in out


def test_broken_tp_mapping_is_caught(tmp_path):
    with pytest.raises(AssertionError) as excinfo:
        run_torchrun(WORKER, 2, [tmp_path, "tp2"], env={"BREAK_TP_MAPPING": "1"})
    message = str(excinfo.value)
    assert "tp2: logits differs" in message and "tp2: grads[" in message


def test_long_sequence_with_recompute(tmp_path):
    """8k-token sequences (the paper's response length) through TP=2 with full activation
    recomputation give the single-process logits, loss, gradients and step. (Sequence
    parallelism needs TransformerEngine's norms, so it cannot run on CPU: build_gpt_model says
    so, tests/unit/test_model.py.)"""
    out = run_torchrun(WORKER, 2, [tmp_path, "tp2rc"], env={"LONG_SEQUENCE": "8192"})
    assert "OK: tp2rc match" in out
