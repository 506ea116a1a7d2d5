"""Training checkpoints: model, optimizer and LR scheduler through megatron dist_checkpointing,
plus the step and the data position, written atomically, verified when read, pruned to the last N.

Layout: ROOT/step_00000012/ (a megatron distributed checkpoint: .metadata, __<rank>_<i>.distcp,
common.pt, metadata.json; train_state.json; digests.json, the SHA-256 and size of every other
file) and ROOT/latest (the name of the newest complete one). A checkpoint is written to
ROOT/.tmp_step_N, its digests last, and renamed into place after every rank has finished, and
`latest` is replaced with os.replace, so a crash mid-write leaves the previous checkpoint as the
one `--resume auto` finds (and the next save clears the leftover folder).

Reading one back checks its digests first (every rank a share of the files), then loads it; a
checkpoint that fails either is a CheckpointError naming it and the file. `--resume auto` tries the
checkpoint `latest` names, then the older ones, newest first, and says which it skipped and why;
without `latest` it takes the newest intact one and says so. Pruning keeps the `keep` newest up to
the one just written and never removes one newer than it or the one `latest` names.
"""
import errno
import json
import logging
import os
import re
import shutil
import sys
from typing import Callable, List, Optional, Tuple

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rl.checkpointing.digests import verify_digests, write_digests
from megatron_rl.checkpointing.model import (UnsafeCheckpointError, verify_checkpoint_metadata,
                                             write_in_this_process)
from megatron_rl.errors import CheckpointError
from megatron_rl.files import publish_folder, replace_file, staging_name
from megatron_rl.models.unwrap import unwrap_model

LATEST = "latest"
STATE_FILE = "train_state.json"
_STEP_NAME = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp_"
# what a failed save or load raises (torch's CheckpointException is a BaseException)
_ERRORS = (Exception, CheckpointException)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def warn(message: str) -> None:
    """Loud, once per job: stderr of rank 0."""
    if _rank0():
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


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


# -- writing -----------------------------------------------------------------------------------

def save_checkpoint(root: str, step: int, model, optimizer, scheduler, train_state: dict,
                    keep: int = 2) -> str:
    """Collective. Returns the checkpoint's folder. A full disk is a CheckpointError saying so,
    with the folder, the bytes a checkpoint takes and the bytes free; the previous checkpoint
    stays `latest`."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, _TMP_PREFIX + checkpoint_name(step))
    if _rank0():
        os.makedirs(root, exist_ok=True)
        _clear_leftovers(root)
        os.makedirs(tmp)
    dist.barrier()
    with_optimizer = optimizer_has_state(optimizer)
    state = _sharded_state(model, optimizer, False, with_optimizer)
    worker_errors = _WorkerErrors()
    try:
        write_in_this_process()
        with worker_errors:
            dist_checkpointing.save(state, tmp)
        dist.barrier()
        if _rank0():
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(dict(train_state, step=step, scheduler=scheduler.state_dict(),
                               optimizer_state=with_optimizer), f)
        dist.barrier()
        write_digests(tmp)
        if _rank0():
            publish_folder(tmp, final)
            _point_latest(root, checkpoint_name(step))
            _prune(root, keep, step)
    except _ERRORS as e:
        causes, needed = worker_errors.messages + _chain(e), _checkpoint_bytes(root, state)
        if not _disk_full(causes, root, needed):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial write took
        raise CheckpointError(_disk_full_message(root, step, needed, causes)) from e
    dist.barrier()
    return final


class _WorkerErrors(logging.Handler):
    """megatron's writer logs a write error's text (errno included) and raises only "Worker
    failure ... <class 'OSError'>"; this keeps the logged text for the error message."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: List[str] = []
        self._logger = logging.getLogger("megatron.core.dist_checkpointing")

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._logger.addHandler(self)

    def __exit__(self, *exc):
        self._logger.removeHandler(self)


def _describe(error: BaseException) -> str:
    """One line per failure: torch's CheckpointException carries each rank's exception (its own
    text is a traceback)."""
    failures = getattr(error, "failures", None)
    if isinstance(error, CheckpointException) and isinstance(failures, dict):
        return "; ".join(f"rank {rank}: {_describe(exc)}" for rank, (exc, _) in failures.items())
    return type(error).__name__ + (f": {error}" if str(error) else "")


def _chain(error: BaseException) -> List[str]:
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = _describe(error)
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
                and os.strerror(error.errno) not in text):
            text += f" [{os.strerror(error.errno)}]"
        texts.append(text)
        error = error.__cause__ or error.__context__
    return texts


_FULL_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]",
                    # torch.save's zip writer when a write comes up short
                    "unexpected pos")


def _disk_full(causes: List[str], root: str, needed: int) -> bool:
    if any(text in cause for cause in causes for text in _FULL_DISK_TEXTS):
        return True
    try:
        return shutil.disk_usage(root).free < needed
    except OSError:
        return False


def _disk_full_message(root: str, step: int, needed: int, causes: List[str]) -> str:
    try:
        free = f"{shutil.disk_usage(root).free:,} bytes are free there"
    except OSError:
        free = "the free space there is unknown"
    previous = latest_checkpoint(root)
    cause = next((c for c in causes if any(t in c for t in _FULL_DISK_TEXTS)),
                 causes[0] if causes else "unknown")
    return (f"no space left on device: writing checkpoint {checkpoint_name(step)} to {root} "
            f"failed; a checkpoint takes about {needed:,} bytes and {free}. "
            + (f"The previous checkpoint {previous} stays latest. " if previous else "")
            + f"(cause: {cause})")


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, files in os.walk(folder)
               for n in files)


def _checkpoint_bytes(root: str, state) -> int:
    """About what one checkpoint takes: the newest one on disk, else this rank's tensors times
    the ranks."""
    steps = checkpoint_steps(root)
    if steps:
        return _folder_bytes(os.path.join(root, steps[-1][1]))
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    local = sum(v.data.numel() * v.data.element_size() for v in nested_values(state)
                if torch.is_tensor(getattr(v, "data", None)))
    return local * (dist.get_world_size() if dist.is_initialized() else 1)


def _clear_leftovers(root: str) -> None:
    """Rank 0, before a save: the temporary folders of saves that never finished (a kill -9
    mid-save, a step never saved again). Only one job writes here (the output folder's lock)."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(_TMP_PREFIX) or name == os.path.basename(staging_name(LATEST)):
            warn(f"removing {path}, left by a save that did not finish")
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _prune(root: str, keep: int, written: int) -> None:
    """Keep the checkpoint just written and the keep - 1 newest older ones; never remove one
    newer than the one just written (a run resumed from an earlier step leaves the later ones
    alone) or the one `latest` names."""
    protected = {checkpoint_name(written), _read_latest(root)}
    older = [name for step, name in checkpoint_steps(root) if step < written]
    for name in older[:max(len(older) - (keep - 1), 0)]:
        if name not in protected:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -- finding -----------------------------------------------------------------------------------

def checkpoint_steps(root: str) -> List[Tuple[int, str]]:
    """(step, folder name) of every checkpoint folder under root, oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _STEP_NAME.fullmatch(n))
             and os.path.isdir(os.path.join(root, n))]
    return sorted(found)


def _read_latest(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _point_latest(root: str, name: str) -> None:
    """ROOT/latest names checkpoint folder `name`, replaced atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(name)

    replace_file(os.path.join(root, LATEST), write)


def set_aside_checkpoints(root: str, from_step: int) -> Optional[str]:
    """Move the checkpoints of steps >= from_step (weights known to be diverged) to
    ROOT/diverged/, point `latest` at the newest one left and return it (None: none left, and no
    `latest`). Nothing is deleted. Rank 0 only."""
    aside = os.path.join(root, "diverged")
    left = []
    for step, name in checkpoint_steps(root):
        if step < from_step:
            left.append(name)
            continue
        os.makedirs(aside, exist_ok=True)
        shutil.rmtree(os.path.join(aside, name), ignore_errors=True)
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    if not left:
        if os.path.exists(os.path.join(root, LATEST)):
            os.remove(os.path.join(root, LATEST))
        return None
    _point_latest(root, left[-1])
    return os.path.join(root, left[-1])


def latest_checkpoint(root: str) -> Optional[str]:
    """The checkpoint `latest` names; when `latest` is missing or names no checkpoint folder,
    the newest one; None when there is none. Not verified: what messages quote."""
    steps = checkpoint_steps(root)
    name = _read_latest(root)
    if name not in {n for _, n in steps}:
        name = steps[-1][1] if steps else None
    return None if name is None else os.path.join(root, name)


def resume_candidates(root: str) -> List[str]:
    """What `--resume auto` tries, in order: the checkpoint `latest` names, then every older one,
    newest first. When `latest` is missing or names no checkpoint, every checkpoint newest first
    (said loudly). Ones newer than the one `latest` names are from a run that was resumed from an
    earlier step: not candidates (said). Every rank gets rank 0's list."""
    steps = checkpoint_steps(root)
    name = _read_latest(root)
    names = [n for _, n in reversed(steps)]
    if steps and name not in names:
        what = "is missing" if name is None else f"names {name!r}, which is not a checkpoint"
        warn(f"{os.path.join(root, LATEST)} {what}: taking the newest intact checkpoint of "
             f"{', '.join(names)}")
    elif steps:
        newer, names = names[:names.index(name)], names[names.index(name):]
        if newer:
            warn(f"{os.path.join(root, LATEST)} names {name}; not resuming from the newer "
                 f"{', '.join(newer)} (left by a run that was later resumed from {name} or an "
                 f"earlier step)")
    paths = [os.path.join(root, n) for n in names]
    if dist.is_initialized():
        box = [paths]
        dist.broadcast_object_list(box, src=0)
        paths = box[0]
    return paths


# -- reading -----------------------------------------------------------------------------------

def verify_checkpoint(path: str) -> None:
    """Collective. Raise CheckpointError (naming the folder and each bad file) unless `path` is a
    checkpoint whose files match the digests written when it was saved; UnsafeCheckpointError for
    a .metadata that would run code. A checkpoint saved before digests existed is loaded with a
    warning."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:  # the refusal to unpickle code first: it does not depend on digests a forger can write
        verify_checkpoint_metadata(path)
        unreadable = None
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        unreadable = e  # the digests name the damage better, when there are digests
    if not verify_digests(path):
        warn(f"{path} has no digests (saved before checkpoints carried them): loading it "
             f"unverified")
    if unreadable is not None:
        raise unreadable
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{path}: no {STATE_FILE} (not a training checkpoint)")


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Collective. Verifies `path`, then loads it into the current layout (any TP/PP layout it
    was saved with); returns its train state. Anything wrong is a CheckpointError naming `path`,
    raised on every rank."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(path)
    error = None
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            train_state = json.load(f)
        with_optimizer = train_state.pop("optimizer_state", True)
        state = dist_checkpointing.load(_sharded_state(model, optimizer, True, with_optimizer),
                                        path)
        unwrap_model(model).load_state_dict(state["model"])
        if with_optimizer:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(train_state.pop("scheduler"))
    except _ERRORS as e:  # damaged files without digests, a model this checkpoint does not fit
        error = f"{path} does not load: {_describe(e)}"
    if dist.is_initialized():  # every rank moves on together
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, error)
        error = next((e for e in everyone if e), None)
    if error:
        raise CheckpointError(error)
    return train_state


def load_newest_intact(candidates: List[str], model, optimizer, scheduler,
                       note: Callable[[str], None] = warn) -> Tuple[str, dict]:
    """Collective. Load the first of `candidates` (newest first) that verifies and loads; each
    one skipped is reported with its path and why. A CheckpointError listing them all when none
    does: never a silent fresh start."""
    rejected = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, model, optimizer, scheduler)
        except CheckpointError as e:
            rejected.append(str(e))
            rest = candidates[len(rejected):]
            note(f"checkpoint {path} is not usable: {e}"
                 + (f"\n  trying the next older one, {rest[0]}" if rest else ""))
    raise CheckpointError("no usable checkpoint:\n" + "\n".join(rejected))
