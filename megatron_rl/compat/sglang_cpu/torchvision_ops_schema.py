"""Lets a CUDA torchvision wheel import beside CPU torch in the SGLang venv (imported from a .pth).

sglang imports torchvision at load (multimodal configs, and transformers' image utils once it sees
torchvision installed). PyPI's torchvision wheels are CUDA builds: their _C.so needs libc10_cuda.so,
so beside the CPU torch wheel the ops library does not load, and torchvision/_meta_registrations.py
then fails at import with "operator torchvision::nms does not exist" because it registers fake
kernels for nms and qnms unconditionally. Only when that load fails, this defines those two schemas
(the image ops themselves stay unavailable; the text-only SGLang path never calls them).
"""
import importlib.abc
import importlib.util
import sys

_SCHEMAS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def torchvision_ops_missing() -> bool:
    """True when torchvision is installed but its C++ ops library cannot be loaded."""
    import glob
    import os
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libraries:
        return True
    import torch
    try:
        torch.ops.load_library(libraries[0])
    except OSError:
        return True
    return False


def define_missing_schemas() -> None:
    import torch
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the check when torchvision is first imported, so processes that never import it pay
    nothing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            if torchvision_ops_missing():
                define_missing_schemas()
        return None


def install() -> None:
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
