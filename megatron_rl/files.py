"""Files and folders written whole or not at all: a checkpoint, a cached warm start and an
engine's HF weights folder, the `latest` pointer, eval.json and the example data are each written
under a staging name beside their final one and then moved into place, so a crash mid-write never
leaves a partial file or folder under the name readers look for."""
import os
import shutil
from typing import Callable


def staging_name(path: str) -> str:
    """The temporary name a file is written under beside `path`: .NAME.tmp."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def replace_file(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) writes the whole file at a staging name beside `path`, then it replaces `path`
    (os.replace: readers see the old file or the new one); on failure the staging file goes."""
    tmp = staging_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_folder(staging: str, final: str) -> None:
    """Move the completely written folder `staging` to `final`, replacing what was there. A crash
    between the two calls leaves `final` absent (readers then fall back or rebuild), never
    half-written; both paths must be on one file system (the rename is atomic)."""
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
