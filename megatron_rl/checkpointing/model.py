"""Model weights through megatron-core dist_checkpointing: saved in one TP/PP layout, loadable
into any other (the checkpoint stores global tensors split into shards, not per-rank files)."""
import os
import pickle

import torch.distributed as dist

from megatron_rl.checkpointing.digests import verify_digests
from megatron_rl.errors import CheckpointError
from megatron_rl.models.unwrap import unwrap_model


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint's .metadata names code that unpickling it would run."""


def write_in_this_process() -> None:
    """Make megatron's torch_dist save start no helper process. Its writer hands the write
    results back through a queue it makes with multiprocessing's spawn Manager: a server process
    (~280 MB) started at the first save, kept for the life of the job, and left running as an
    orphan when the job is killed (nothing tells it its parent died). Saves here are synchronous
    (the writes run in this process, megatron's AsyncRequest.execute_sync), so a plain queue
    carries the results as well; set before megatron makes its own, it is the one used."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_model(model, directory: str) -> None:
    """Collective: every rank of the job calls it. `directory` must not exist or be empty."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    write_in_this_process()
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), directory)


# What torch.distributed.checkpoint's .metadata pickle may name: its own metadata classes and
# plain torch/Python values. The file is a plain pickle that torch loads with pickle.load.
_METADATA_MODULES = ("torch.distributed.checkpoint.",)
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                     ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"),
                     # torch's writer records the checkpoint's path in StorageMeta
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


def verify_checkpoint_metadata(directory: str) -> None:
    """Refuse a checkpoint whose .metadata would run code when unpickled: torch reads that file
    with pickle.load, so a tampered checkpoint could execute anything (the tensors and megatron's
    common state are read weights-only). Reads it once with a restricted unpickler first. A
    .metadata that is unreadable (truncated, garbage) is a CheckpointError naming it."""
    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = (module.startswith(_METADATA_MODULES) or (module, name) in _METADATA_GLOBALS
                       or (module == "torch" and isinstance(getattr(torch, name, None),
                                                            torch.dtype)))
            if not allowed:
                raise UnsafeCheckpointError(
                    f"{path}: refers to {module}.{name}, which a checkpoint's metadata never "
                    f"needs; not loading it (a tampered checkpoint would run code here)")
            return super().find_class(module, name)

    path = os.path.join(directory, ".metadata")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                Restricted(f).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # EOFError, UnpicklingError, ValueError, ... of a damaged file
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def load_model(model, directory: str, strict: bool = True) -> None:
    """Collective: load the weights of a checkpoint saved with any layout (a model checkpoint of
    save_model / the converter, or a training checkpoint) into this rank's shard of `model`."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint")
    verify_checkpoint_metadata(directory)
    verify_digests(directory)  # a training checkpoint's (model checkpoints have none)
    inner = unwrap_model(model)
    if os.path.exists(os.path.join(directory, "train_state.json")):
        # A training checkpoint (checkpointing.checkpoint) nests the model under "model" next
        # to the optimizer; take the weights only.
        state = dist_checkpointing.load({"model": inner.sharded_state_dict()}, directory)["model"]
    else:
        state = dist_checkpointing.load(inner.sharded_state_dict(), directory)
    inner.load_state_dict(state, strict=strict)
