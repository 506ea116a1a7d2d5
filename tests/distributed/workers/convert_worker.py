"""Load converted megatron checkpoints into several TP/PP layouts and compare the megatron logits
with the transformers logits of the source HF model.

Run under torchrun with 2 processes (gloo):
  convert_worker.py MEGATRON_DIR REFERENCE.pt [MEGATRON_DIR REFERENCE.pt ...]
REFERENCE.pt holds {"tokens": [b, s] ids, "logits": [b, s, vocab] transformers logits}. Each
checkpoint is loaded as tp1 (each rank a data-parallel replica), tp2 and pp2; rank 0 prints one
line per checkpoint and layout, "MATCH <dir> <layout> ..." or "MISMATCH <dir> <layout> ...", so that
one launch serves several tests (tests/integration/test_convert_checkpoint.py).
"""
import sys
import warnings
from types import SimpleNamespace

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_rl.checkpointing.convert import read_model_config  # noqa: E402
from megatron_rl.checkpointing.model import load_model  # noqa: E402
from megatron_rl.models.gpt import build_gpt_model  # noqa: E402
from megatron_rl.parallel import state  # noqa: E402
from megatron_rl.parallel.config import ParallelConfig  # noqa: E402
from tests.distributed.workers.megatron_layouts_worker import gathered_logits  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
TOL = dict(rtol=1e-4, atol=1e-4)


def check(checkpoint_dir, reference_path, layout):
    """None when this rank holds no logits, else the MATCH / MISMATCH line."""
    tp, pp = LAYOUTS[layout]
    cfg = read_model_config(checkpoint_dir)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    state.initialize(parallel)
    model = build_gpt_model(cfg, parallel)
    load_model(model, checkpoint_dir)
    model.eval()
    reference = torch.load(reference_path)
    with torch.no_grad():
        # one micro-batch per sequence, so that PP passes activations between the stages
        logits = gathered_logits(model, [SimpleNamespace(tokens=t[None])
                                         for t in reference["tokens"]])
    if logits is None:  # not the last pipeline stage
        return None
    got, want = logits[..., : cfg.vocab_size], reference["logits"]
    what = f"{checkpoint_dir} {layout}"
    if got.shape != want.shape:
        return f"MISMATCH {what}: logits shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    if not torch.allclose(got, want, **TOL):
        return f"MISMATCH {what}: logits differ from transformers', max abs err {err:.3e}"
    if logits[..., cfg.vocab_size:].abs().sum() > 0:
        return f"MISMATCH {what}: padded vocabulary rows give non-zero logits"
    return f"MATCH {what}: max abs err {err:.2e}"


def main():
    pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
    dist.init_process_group("gloo")
    lines = []
    for checkpoint_dir, reference_path in pairs:
        for layout in LAYOUTS:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, check(checkpoint_dir, reference_path, layout))
            # the last pipeline stage's rank speaks for the layout (every rank when tp1)
            lines.append(next(line for line in everyone if line is not None))
    rank = dist.get_rank()
    state.destroy()
    if rank == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
