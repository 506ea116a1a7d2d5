"""Megatron weights as Hugging Face tensors for the engines: gathered over TP, collected from every
pipeline stage onto global rank 0, renamed with the checkpoint converter's mapping (one mapping
for conversion and sync); and HF folders of them (the engines' initial weights, disk sync).
Sending them to running SGLang servers is weight_transfer.py's."""
import json
import os
import shutil
from typing import Iterator, Tuple

import torch
import torch.distributed as dist

from megatron_rl.files import publish_folder
from megatron_rl.models.config import ModelConfig
from megatron_rl.models.hf_mapping import hf_config_from_model_config, megatron_to_hf_tensors
from megatron_rl.parallel.gather import named_full_tensors

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.pt")


def hf_weights(model, cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every rank of data-parallel replica 0 must iterate this (TP gathers and PP broadcasts are
    collective); global rank 0 receives the (HF name, full tensor) pairs, one tensor at a time,
    the others get nothing. Other replicas hold the same weights and return at once.
    Tensors that need no gathering are the live parameters (views): use each before the next
    optimizer step."""
    from megatron.core import parallel_state as mpu

    if mpu.get_data_parallel_rank() != 0:
        return
    pp_size, pp_rank = (mpu.get_pipeline_model_parallel_world_size(),
                        mpu.get_pipeline_model_parallel_rank())
    is_receiver = dist.get_rank() == 0
    tp_rank = mpu.get_tensor_model_parallel_rank()
    for stage in range(pp_size):
        if stage == pp_rank:
            for name, full in named_full_tensors(model, copy=False):
                if stage == 0:
                    if is_receiver:
                        yield from megatron_to_hf_tensors(name, full, cfg)
                elif tp_rank == 0:  # stage s's TP rank 0 forwards to stage 0's TP rank 0
                    _send_to_first_stage(name, full)
            if stage and tp_rank == 0:
                _send_to_first_stage(None, None)
        elif pp_rank == 0 and tp_rank == 0 and stage:
            while True:
                name, full = _receive_from_stage(stage)
                if name is None:
                    break
                if is_receiver:
                    yield from megatron_to_hf_tensors(name, full, cfg)


def _send_to_first_stage(name, tensor) -> None:
    from megatron.core import parallel_state as mpu

    group = mpu.get_pipeline_model_parallel_group()
    meta = [None if name is None else (name, tuple(tensor.shape), tensor.dtype)]
    first = dist.get_global_rank(group, 0)
    dist.send_object_list(meta, dst=first, group=group)
    if name is not None:
        dist.send(tensor.contiguous(), dst=first, group=group)


def _receive_from_stage(stage: int):
    from megatron.core import parallel_state as mpu

    group = mpu.get_pipeline_model_parallel_group()
    source = dist.get_global_rank(group, stage)
    meta = [None]
    dist.recv_object_list(meta, src=source, group=group)
    if meta[0] is None:
        return None, None
    name, shape, dtype = meta[0]
    tensor = torch.empty(shape, dtype=dtype, device=torch.cuda.current_device()
                         if torch.cuda.is_available() else "cpu")
    dist.recv(tensor, src=source, group=group)
    return name, tensor


def write_hf_folder(named_tensors, out_dir: str, files_from: str = None,
                    cfg: ModelConfig = None) -> int:
    """Replace out_dir (atomically: staged beside it, then renamed) with an HF folder: the
    non-weight files of files_from (config, tokenizer) or a config.json made from cfg, plus the
    given weights in model.safetensors. Returns the bytes of weights written."""
    from safetensors.torch import save_file

    staging = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if files_from is not None:
        shutil.copytree(files_from, staging, ignore=shutil.ignore_patterns(*_WEIGHT_PATTERNS))
    else:
        os.makedirs(staging)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config_from_model_config(cfg), f, indent=2)
    tensors = {name: t.detach().contiguous().cpu() for name, t in named_tensors}
    save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    publish_folder(staging, out_dir)
    return sum(t.numel() * t.element_size() for t in tensors.values())
