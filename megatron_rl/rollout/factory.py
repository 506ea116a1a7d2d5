"""The one place that chooses a rollout engine from rollout.engine, so the trainer holds a
RolloutEngine (rollout/types.py) and never asks which kind.

A module of its own: it imports every engine (the SGLang one brings HTTP and process control),
which neither the leaf types.py nor the package's __init__ (imported by config.py through
rollout/config.py) should.
"""
from megatron_rl.rollout.builtin import BuiltinEngine
from megatron_rl.rollout.sglang_rollout import SGLangRolloutEngine
from megatron_rl.rollout.types import RolloutEngine


def build_rollout_engine(cfg, model, out_dir: str, weight_version: int, device: str,
                         vocab_size: int) -> RolloutEngine:
    """The job's engine, on every rank together. cfg: the JobConfig; model: the trainer's (DDP
    wrapped) policy; out_dir: the run folder (the SGLang engines' weights and logs go there);
    weight_version: the trainer's completed steps (its checkpoint's step on resume); device: the
    trainer's torch.device type ("cpu", "cuda"), where rollout.sglang.device=auto puts the
    servers; vocab_size: the tokenizer's (the built-in engine never samples padded columns)."""
    rc = cfg.rollout
    if rc.engine == "sglang":
        return SGLangRolloutEngine(cfg, model, out_dir, weight_version=weight_version,
                                   device=device if rc.sglang.device == "auto"
                                   else rc.sglang.device)
    if rc.engine == "builtin":
        return BuiltinEngine(model, vocab_size=vocab_size, seed=rc.seed,
                             weight_version=weight_version)
    raise ValueError(f"unknown rollout.engine {rc.engine!r}")
