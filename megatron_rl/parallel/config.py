"""Parallel layout config: tensor, pipeline, context and data parallel sizes."""
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_rl.errors import SEED_RANGE, check_range


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    # None: whatever the world size leaves (world / (tp * pp * cp)); set it to have it checked.
    data_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # "auto": nccl when CUDA is available, gloo otherwise.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # A collective that waits longer than this fails the job instead of hanging it.
    timeout_minutes: float = 10.0
    seed: int = 1234

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.data_parallel_size is not None and self.data_parallel_size < 1:
            raise ValueError(f"parallel.data_parallel_size must be >= 1, "
                             f"got {self.data_parallel_size}")
        if self.timeout_minutes <= 0:
            raise ValueError("parallel.timeout_minutes must be positive")
        check_range("parallel", self, "seed", **SEED_RANGE)

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def resolve_data_parallel(self, world_size: int) -> int:
        """Set and return the DP size for `world_size`; raise naming the keys if impossible."""
        from megatron_rl.errors import ConfigError

        mp = self.model_parallel_size
        layout = (f"parallel.tensor_model_parallel_size={self.tensor_model_parallel_size} x "
                  f"parallel.pipeline_model_parallel_size={self.pipeline_model_parallel_size} x "
                  f"parallel.context_parallel_size={self.context_parallel_size}")
        if world_size % mp:
            raise ConfigError(f"{layout} = {mp} does not divide the world size {world_size}")
        dp = world_size // mp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise ConfigError(
                f"{layout} x parallel.data_parallel_size={self.data_parallel_size} = "
                f"{mp * self.data_parallel_size} != world size {world_size}")
        self.data_parallel_size = dp
        return dp
