"""Content digests of a checkpoint's files: digests.json holds the SHA-256 and the size of every
other file of the folder, written when the checkpoint is saved and checked before it is loaded, so
flipped bytes, a truncated or missing file, or a file replaced afterwards are found and named
instead of loading quietly. Plain functions over one folder; checkpointing.checkpoint splits the
hashing of a checkpoint's files among the ranks."""
import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional

from megatron_rl.errors import CheckpointError

MANIFEST = "digests.json"
_CHUNK = 1 << 20


def folder_files(folder: str) -> List[str]:
    """Every file below `folder` but the manifest, as sorted paths relative to it."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def file_digest(path: str) -> Dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
    return {"sha256": sha.hexdigest(), "bytes": size}


def digest_files(folder: str, names: Iterable[str]) -> Dict[str, Dict]:
    return {name: file_digest(os.path.join(folder, name)) for name in names}


def write_manifest(folder: str, digests: Dict[str, Dict]) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"algorithm": "sha256", "files": dict(sorted(digests.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str) -> Optional[Dict[str, Dict]]:
    """{file: {"sha256", "bytes"}}; None for a checkpoint saved without digests."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not all(
                isinstance(d.get("sha256"), str) and isinstance(d.get("bytes"), int)
                for d in files.values()):
            raise ValueError("not a sha256 digest list")
        return files
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def check_files(folder: str, names: Iterable[str], manifest: Dict[str, Dict]) -> List[str]:
    """What is wrong with `names` (files of the manifest) in `folder`: one line per bad file,
    naming it; [] when all match. Sizes are compared before any file is read."""
    problems = []
    for name in names:
        want = manifest[name]
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            if size != want["bytes"]:
                problems.append(f"{path}: {size} bytes, {want['bytes']} when saved "
                                f"({'truncated' if size < want['bytes'] else 'grown'})")
                continue
            if file_digest(path)["sha256"] != want["sha256"]:
                problems.append(f"{path}: content differs from when it was saved "
                                f"(SHA-256 mismatch)")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except OSError as e:
            problems.append(f"{path}: unreadable ({e})")
    return problems


def _gather(items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank (as is without a process
    group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(items)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


def _my_share(names: List[str]) -> List[str]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def write_digests(folder: str) -> None:
    """Collective: every rank hashes a share of the folder's files, rank 0 writes the manifest.
    Call it when every file but the manifest is written (and visible to every rank)."""
    import torch.distributed as dist

    names = folder_files(folder)
    if dist.is_initialized():  # one list for all: rank 0's view of the folder
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    digests = dict(_gather(digest_files(folder, _my_share(names)).items()))
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_manifest(folder, digests)


def verify_digests(folder: str) -> bool:
    """Collective: check `folder` against its manifest, every rank a share of the files. Raises
    CheckpointError listing every bad file (the same on every rank); False when the folder has no
    manifest (saved without digests), True when every file matches."""
    try:
        manifest, problems = read_manifest(folder), []
    except CheckpointError as e:
        manifest, problems = None, [str(e)]
    if manifest is not None:
        problems += check_files(folder, _my_share(sorted(manifest)), manifest)
    reports = _gather([(manifest is not None, problems)])  # one verdict on every rank
    problems = list(dict.fromkeys(p for _, mine in reports for p in mine))  # once each
    if problems:
        raise CheckpointError(f"{folder} fails verification:\n  " + "\n  ".join(problems))
    return all(found for found, _ in reports)
