"""Gather this pipeline stage's tensor-parallel shards into full tensors with global names.

Used by the layout-equivalence tests and by weight export: names are megatron's, with layer
indices made global across pipeline stages (decoder.layers.<global index>...).
"""
import re
from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist

from megatron_rl.models.unwrap import unwrap_model

_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")


def global_layer_name(name: str, model) -> str:
    """decoder.layers.<local>.x -> decoder.layers.<global>.x using each layer's layer_number."""
    match = _LAYER.match(name)
    if match is None:
        return name
    layer = unwrap_model(model).decoder.layers[int(match.group(2))]
    return f"{match.group(1)}{layer.layer_number - 1}{match.group(3)}"


def is_gated_fc1(name: str) -> bool:
    """SwiGLU's fused fc1 holds [gate; up]; each TP shard holds [gate_r; up_r]."""
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def gather_tp_tensor(tensor: torch.Tensor, name: str, param, group,
                     copy: bool = True) -> torch.Tensor:
    """Full tensor from this rank's TP shard of `param` (partition attributes set by megatron).
    copy=False returns an unsplit tensor itself (detached), not a copy."""
    if group is None or dist.get_world_size(group) == 1 or not getattr(
            param, "tensor_model_parallel", False):
        return tensor.detach().clone() if copy else tensor.detach()
    dim = param.partition_dim
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    if is_gated_fc1(name):
        gates, ups = zip(*(s.chunk(2, dim=dim) for s in shards))
        return torch.cat(list(gates) + list(ups), dim=dim)
    return torch.cat(shards, dim=dim)


def named_full_tensors(model, which: str = "param",
                       copy: bool = True) -> Iterable[Tuple[str, torch.Tensor]]:
    """Yield (global name, full tensor) for this PP stage: parameters or their gradients
    (`which="grad"`: megatron DDP's main_grad when present, .grad otherwise).
    copy=False: tensors that need no gathering are the live ones, for a consumer that is done
    with each before the next optimizer step (weight sync: a copy of the model would cost as much
    as the transfer itself)."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    for name, param in unwrap_model(model).named_parameters():
        if which == "param":
            tensor = param.data
        else:
            tensor = getattr(param, "main_grad", None)
            if tensor is None:
                tensor = param.grad if param.grad is not None else torch.zeros_like(param)
        yield global_layer_name(name, model), gather_tp_tensor(tensor, name, param, group, copy)


def full_state(model, which: str = "param") -> Dict[str, torch.Tensor]:
    return dict(named_full_tensors(model, which))
