"""Training config: batch sizes, optimiser, schedule, run folder."""
from dataclasses import dataclass
from typing import Literal, Optional, Union

from megatron_rl.errors import SEED_RANGE, check_range


@dataclass
class TrainingConfig:
    steps: int = 20  # RL steps (rollout + training.mini_batches x ppo_epochs optimizer steps)
    micro_batch_size: int = 4
    seq_length: int = 32
    lr: float = 1e-3
    min_lr: float = 0.0
    # The LR schedule runs over optimizer steps (training/optimizer.py build_lr_scheduler):
    # the warmup, counted in RL steps like training.steps, rises from 0 to lr over
    # lr_warmup_steps x mini_batches x ppo_epochs optimizer steps; linear/cosine then decay
    # to min_lr, reached at the last optimizer step of the last RL step.
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    # megatron's distributed optimizer (Adam state sharded over DP ranks); GPU only: on CPU it is
    # ignored (it asserts CUDA tensors) and the replicated optimizer is used.
    use_distributed_optimizer: bool = True
    seed: int = 1234
    output_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True  # scalars to OUTPUT_DIR/tensorboard
    wandb_project: Optional[str] = None  # also log to Weights & Biases when set (needs wandb)
    # --- RL ---
    # Log-probs and entropies of the policy (old log-probs, training loss) and of the reference
    # straight from the last hidden states, one [1024, 16384] logits block at a time
    # (megatron_rl.ops.output_layer_logprobs_entropy), instead of [tokens, vocab / TP] logits.
    # "auto": the memory planner's choice (parallel/memory_plan.py logprob_chunking_choice): on
    # when it at least halves the planned memory of the logits (which the logits path holds
    # once: their gradient overwrites them). The same numbers within float round-off
    # (docs/ops.md).
    logprob_chunking: Union[bool, Literal["auto"]] = "auto"
    mini_batches: int = 1  # optimizer steps per rollout step (per PPO epoch)
    ppo_epochs: int = 1
    eval_interval: int = 5  # greedy validation accuracy every N steps (0: never)
    eval_avg_k: int = 0  # also sampled accuracy avg@k at eval_temperature (0: greedy only)
    eval_temperature: float = 0.6  # the paper's evaluation temperature
    # false: eval_accuracy (the law's R, the plots' accuracy) is avg@eval_avg_k at
    # eval_temperature instead of greedy accuracy
    eval_greedy: bool = True
    # The logged metric the entropy law fits and the plots show as eval_accuracy (which always
    # holds its value): "eval_accuracy" is the held-out set's accuracy above, or with
    # data.eval_sets their weighted mean eval/mean/accuracy; any other key the evaluation logs
    # (e.g. "eval/aime/accuracy") is checked against the config at load (docs/analysis.md).
    law_metric: str = "eval_accuracy"
    # Entropy-dynamics probe every N steps (0: off): actual vs first-order predicted entropy
    # change over the first optimizer step of the step (docs/analysis.md).
    probe_interval: int = 0
    checkpoint_interval: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    # Updates with a NaN/inf gradient are skipped; this many skipped steps in a row stop the job.
    max_nonfinite_steps: int = 3
    # Divergence beyond NaN (megatron_rl/training/guard.py): this many unhealthy steps in a row
    # stop the job (0: no guard); a step is unhealthy when every reward is 0 after positive ones,
    # when its grad norm is over divergence_grad_norm_ratio x the recent median (0: not checked),
    # or when the entropy moves more than divergence_entropy_jump nats in a step (0: not checked).
    # No checkpoint is written while unhealthy steps run; on a stop, the checkpoints holding
    # diverged weights move to checkpoints/diverged/ (one more than keep_checkpoints is kept
    # while the guard is on, so one from before the divergence is always left).
    divergence_steps: int = 10
    divergence_grad_norm_ratio: float = 0.0
    divergence_entropy_jump: float = 0.0
    # Initial policy weights: a megatron checkpoint (e.g. tools/convert_checkpoint.py
    # hf-to-megatron output), any TP/PP layout. A resumed run takes the policy from its
    # checkpoint; it still loads these (and the warm start) for the frozen reference policy
    # when algorithm.kl_ref_coef > 0.
    init_checkpoint: Optional[str] = None
    # --- supervised warm start before RL (0 steps: none); its result is cached by config ---
    sft_steps: int = 0
    sft_lr: float = 3e-3
    sft_batch_size: int = 32
    cache_dir: str = "runs/cache"

    def __post_init__(self):
        if not (isinstance(self.logprob_chunking, bool) or self.logprob_chunking == "auto"):
            raise ValueError(f"training.logprob_chunking must be true, false or auto, got "
                             f"{self.logprob_chunking!r}")
        for name in ("divergence_steps", "divergence_grad_norm_ratio", "divergence_entropy_jump"):
            check_range("training", self, name, 0)
        for name in ("steps", "micro_batch_size", "seq_length", "log_interval", "mini_batches",
                     "ppo_epochs", "keep_checkpoints", "max_nonfinite_steps", "sft_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        # 0: never (eval, probe), only at the end (checkpoints), none (sampled eval, warm start)
        for name in ("eval_interval", "probe_interval", "checkpoint_interval", "eval_avg_k",
                     "sft_steps"):
            check_range("training", self, name, 0)
        if not self.eval_greedy and self.eval_avg_k < 1:
            raise ValueError("training.eval_greedy=false needs training.eval_avg_k >= 1 "
                             "(eval_accuracy is then avg@k)")
        for name in ("lr", "sft_lr", "clip_grad", "weight_decay"):
            check_range("training", self, name, 0)
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"training.min_lr must be in [0, training.lr={self.lr}], "
                             f"got {self.min_lr}")
        decays = self.lr_decay_style != "constant"
        if not 0 <= self.lr_warmup_steps <= self.steps - decays:
            raise ValueError(
                f"training.lr_warmup_steps must be in [0, training.steps={self.steps}"
                f"{')' if decays else ']'} (RL steps"
                f"{f'; the {self.lr_decay_style} decay follows the warmup' if decays else ''})"
                f", got {self.lr_warmup_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            check_range("training", self, name, 0, 1, high_open=True)
        for name in ("adam_eps", "eval_temperature"):
            check_range("training", self, name, 0, low_open=True)
        check_range("training", self, "seed", **SEED_RANGE)
