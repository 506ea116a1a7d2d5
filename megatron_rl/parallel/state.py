"""Process groups: torch.distributed plus megatron-core's parallel_state, from ParallelConfig.

Kept apart from model code, as in megatron-core: models ask parallel_state for ranks and groups.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rl.compat import apply_cpu_patches
from megatron_rl.parallel.config import ParallelConfig
from megatron_rl.ports import free_port


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    device: torch.device

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def initialize(cfg: ParallelConfig) -> ParallelInfo:
    """Start torch.distributed (env:// as set by torchrun; a 1-rank group when run plainly) and
    megatron-core's model-parallel groups. Idempotent for the process group; re-creates the
    megatron groups (tests switch layouts within one launch)."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        apply_cpu_patches()
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU hosts")
    device = device_for_rank()
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
        if "WORLD_SIZE" in os.environ:  # torchrun (env://)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # run plainly: a 1-rank group on a free local port, without touching os.environ
            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
    world_size = dist.get_world_size()
    cfg.resolve_data_parallel(world_size)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
    )
    # On CPU the inference tracker is used: it records seeds without touching CUDA RNG state.
    tensor_parallel.model_parallel_cuda_manual_seed(
        cfg.seed, inference_rng_tracker=not use_cuda, force_reset_rng=True)
    torch.manual_seed(cfg.seed)
    return ParallelInfo(
        world_size=world_size,
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_size=cfg.tensor_model_parallel_size,
        pp_size=cfg.pipeline_model_parallel_size,
        dp_size=mpu.get_data_parallel_world_size(),
        device=device,
    )


def destroy() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
