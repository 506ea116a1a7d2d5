"""Training config: batch sizes, optimiser, schedule, run folder."""
from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainingConfig:
    steps: int = 20
    micro_batch_size: int = 4
    global_batch_size: int = 8  # sequences per optimizer step, across data-parallel ranks
    seq_length: int = 32
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    seed: int = 1234
    output_dir: str = "runs/default"
    log_interval: int = 1

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr < 0 or self.clip_grad < 0:
            raise ValueError("training.lr and training.clip_grad must be >= 0")

    def num_micro_batches(self, data_parallel_size: int) -> int:
        from megatron_rl.config import ConfigError

        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not divisible by "
                f"training.micro_batch_size={self.micro_batch_size} x data parallel size "
                f"{data_parallel_size}")
        return self.global_batch_size // per_step
