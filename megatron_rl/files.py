"""Folders written whole or not at all: a checkpoint, a cached warm start and an engine's HF
weights folder are each written under a staging name beside their final one and then moved into
place, so a crash mid-write never leaves a partial folder under the name readers look for."""
import os
import shutil


def publish_folder(staging: str, final: str) -> None:
    """Move the completely written folder `staging` to `final`, replacing what was there. A crash
    between the two calls leaves `final` absent (readers then fall back or rebuild), never
    half-written; both paths must be on one file system (the rename is atomic)."""
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
