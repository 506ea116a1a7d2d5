"""Model weights through megatron-core dist_checkpointing: saved in one TP/PP layout, loadable
into any other (the checkpoint stores global tensors split into shards, not per-rank files)."""
import os

import torch.distributed as dist

from megatron_rl.models.gpt import unwrap_model


def save_model(model, directory: str) -> None:
    """Collective: every rank of the job calls it. `directory` must not exist or be empty."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), directory)


def load_model(model, directory: str, strict: bool = True) -> None:
    """Collective: load the weights of a checkpoint saved with any layout (a model checkpoint of
    save_model / the converter, or a training checkpoint) into this rank's shard of `model`."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint")
    inner = unwrap_model(model)
    if os.path.exists(os.path.join(directory, "train_state.json")):
        # A training checkpoint (checkpointing.checkpoint) nests the model under "model" next
        # to the optimizer; take the weights only.
        state = dist_checkpointing.load({"model": inner.sharded_state_dict()}, directory)["model"]
    else:
        state = dist_checkpointing.load(inner.sharded_state_dict(), directory)
    inner.load_state_dict(state, strict=strict)
