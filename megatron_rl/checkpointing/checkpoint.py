"""Training checkpoints: model, optimizer and LR scheduler through megatron dist_checkpointing,
plus the step and the data position, written atomically and pruned to the last N.

Layout: ROOT/step_00000012/ (a megatron distributed checkpoint + train_state.json) and
ROOT/latest (the name of the newest complete one). A checkpoint is written to a temporary
folder and renamed into place after every rank has finished, and `latest` is replaced with
os.replace, so a crash mid-write leaves the previous checkpoint as the one `--resume auto` finds.
"""
import json
import os
import shutil
from typing import Optional

import torch.distributed as dist

from megatron_rl.checkpointing.model import verify_checkpoint_metadata
from megatron_rl.files import publish_folder
from megatron_rl.models.unwrap import unwrap_model

LATEST = "latest"
STATE_FILE = "train_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def optimizer_has_state(optimizer) -> bool:
    """False for an optimizer that has not stepped yet (e.g. every update so far was skipped):
    it is saved without its (empty) state and comes back fresh, which is the same thing."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(len(state) for opt in inner for state in opt.optimizer.state.values())


def _sharded_state(model, optimizer, is_loading: bool, with_optimizer: bool):
    model_sd = unwrap_model(model).sharded_state_dict()
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def save_checkpoint(root: str, step: int, model, optimizer, scheduler, train_state: dict,
                    keep: int = 2) -> str:
    """Collective. Returns the checkpoint's folder."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp_{checkpoint_name(step)}")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed attempt
        os.makedirs(tmp)
    dist.barrier()
    with_optimizer = optimizer_has_state(optimizer)
    dist_checkpointing.save(_sharded_state(model, optimizer, False, with_optimizer), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(dict(train_state, step=step, scheduler=scheduler.state_dict(),
                           optimizer_state=with_optimizer), f)
        publish_folder(tmp, final)
        pointer = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer, "w") as f:
            f.write(checkpoint_name(step))
        os.replace(pointer, os.path.join(root, LATEST))
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def set_aside_checkpoints(root: str, from_step: int) -> Optional[str]:
    """Move the checkpoints of steps >= from_step (weights known to be diverged) to
    ROOT/diverged/, point `latest` at the newest one left and return it (None: none left, and no
    `latest`). Nothing is deleted. Rank 0 only."""
    aside = os.path.join(root, "diverged")
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")) \
        if os.path.isdir(root) else []
    for name in names:
        if int(name.split("_")[1]) >= from_step:
            os.makedirs(aside, exist_ok=True)
            shutil.rmtree(os.path.join(aside, name), ignore_errors=True)
            os.rename(os.path.join(root, name), os.path.join(aside, name))
    left = [n for n in names if int(n.split("_")[1]) < from_step]
    if not left:
        if os.path.exists(os.path.join(root, LATEST)):
            os.remove(os.path.join(root, LATEST))
        return None
    pointer = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(left[-1])
    os.replace(pointer, os.path.join(root, LATEST))
    return os.path.join(root, left[-1])


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under root, or None."""
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise RuntimeError(f"{root}/{LATEST} names {name}, which is incomplete or missing")
    return path


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Collective. Loads into the current layout (any TP/PP layout it was saved with)."""
    from megatron.core import dist_checkpointing

    verify_checkpoint_metadata(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        train_state = json.load(f)
    with_optimizer = train_state.pop("optimizer_state", True)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, True, with_optimizer), path)
    unwrap_model(model).load_state_dict(state["model"])
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(train_state.pop("scheduler"))
    return train_state
