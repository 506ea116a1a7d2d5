"""The one place where megatron-core is patched to run on CPU (gloo, fp32).

megatron-core 0.19.2 assumes CUDA in a handful of places that no config setting reaches. Each
patch below is a small named function with a `needed()` check, applied only when CUDA is absent
(`apply_cpu_patches()` is a no-op on GPU hosts) and only when its check says megatron still has the
problem. tests/unit/test_cpu_patches.py has, per patch, one test that fails when the patch stops
being needed (megatron fixed it: delete the patch) and one that fails when it stops working.

What config settings already cover (so no patch): the CUDA RNG tracker
(model_parallel_cuda_manual_seed(..., inference_rng_tracker=True) keeps a CPU-safe tracker), the
P2P batching (batch_p2p_sync=False), CPU weight initialisation (use_cpu_initialization=True),
fused kernels (bias/rope/softmax fusions off).
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, List

import torch

# Modules whose bodies build tensors with a hard-coded device="cuda" on the code paths we use
# (schedules: token counting; utils/clip_grads: norms; optimizer: found-inf flags and scale;
# param_and_grad_buffer: a warm-up tensor; dist_checkpointing: exchange buffers;
# transformer.utils: the default causal mask).
CUDA_LITERAL_MODULES = (
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


@dataclass(frozen=True)
class CpuPatch:
    name: str
    why: str
    needed: Callable[[], bool]
    apply: Callable[[], None]


# --- 1. paged_stash imports triton unconditionally --------------------------------------------
def megatron_source(module_name: str) -> str:
    """Source text of a megatron-core module, read without importing it (importing
    megatron.core is what fails before the patches), or "" when the file does not exist."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return ""
    parts = module_name.split(".")[1:]
    for root in spec.submodule_search_locations:
        for path in (os.path.join(root, *parts) + ".py", os.path.join(root, *parts, "__init__.py")):
            if os.path.exists(path):
                with open(path) as f:
                    return f.read()
    return ""


def _paged_stash_needed() -> bool:
    if importlib.util.find_spec("triton") is not None or PAGED_STASH_OPS in sys.modules:
        return False
    return "\nimport triton" in megatron_source(PAGED_STASH_OPS)


def _paged_stash_apply() -> None:
    # Replace only this MoE-only kernel module (imported by gpt_model and schedules for its
    # names), not `triton` itself: a fake `triton` would make torch and others believe it exists.
    stub = types.ModuleType(PAGED_STASH_OPS)
    stub.__doc__ = "megatron_rl CPU stand-in: MoE paged-stash triton kernels are GPU-only."
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*_args, **_kwargs):
        raise RuntimeError("MoE paged stash needs triton and a GPU; it is not available on CPU")

    class _KernelStub:
        def __getitem__(self, _grid):
            return _unavailable

        __call__ = staticmethod(_unavailable)

    stub.paged_stash_copy_kernel = _KernelStub()
    stub.paged_stash_pop_kernel = _KernelStub()
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[PAGED_STASH_OPS] = stub


# --- 2. torch.cuda.current_device() used as the device of new tensors ---------------------------
def _current_device_needed() -> bool:
    try:
        torch.cuda.current_device()
    except (RuntimeError, AssertionError, AttributeError):
        return True
    return False


def _current_device_apply() -> None:
    # ~200 call sites pass torch.cuda.current_device() as a device argument; "cpu" is valid there.
    torch.cuda.current_device = lambda: "cpu"


# --- 3. streams and synchronisation ---------------------------------------------------------------
class _NullStream:
    """Stands in for a CUDA stream on CPU: work is synchronous, so waiting is a no-op."""

    def wait_stream(self, _other):
        pass

    def wait_event(self, _event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


def _streams_needed() -> bool:
    try:
        torch.cuda.current_stream()
    except (RuntimeError, AssertionError, AttributeError):
        return True
    return False


def _streams_apply() -> None:
    null_stream = _NullStream()
    torch.cuda.current_stream = lambda device=None: null_stream
    torch.cuda.default_stream = lambda device=None: null_stream
    torch.cuda.synchronize = lambda device=None: None


# --- 4. device="cuda" literals --------------------------------------------------------------------
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")


def _cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by one megatron module: factory calls with device="cuda" land on CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return attr(*args, **kwargs)

        return factory


def cuda_literal_sites(module_name: str) -> int:
    """Number of device="cuda" literals in a megatron module's source."""
    src = megatron_source(module_name)
    return src.count("device='cuda'") + src.count('device="cuda"')


def _has_cuda_literal(module_name: str) -> bool:
    return cuda_literal_sites(module_name) > 0


def _cuda_literals_needed() -> bool:
    return any(_has_cuda_literal(m) for m in CUDA_LITERAL_MODULES)


def _cuda_literals_apply() -> None:
    torch_on_cpu = _TorchOnCpu()
    for name in CUDA_LITERAL_MODULES:
        if _has_cuda_literal(name):
            module = importlib.import_module(name)
            if module.torch is torch:
                module.torch = torch_on_cpu


# --- 5. gradient clipping asserts CUDA tensors ---------------------------------------------------
CLIP_GRADS = "megatron.core.optimizer.clip_grads"


def _clip_grads_needed() -> bool:
    return "torch.cuda.FloatTensor" in megatron_source(CLIP_GRADS)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA type assert and fused kernel:
    scale every grad in place by min(1, max_norm / (total_norm + 1e-6))."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (float(total_norm) + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _clip_grads_apply() -> None:
    # optimizer.py imported the function by name, so rebind it there (and at its source).
    for name in (CLIP_GRADS, "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu


# --- 6. tied embeddings across pipeline stages call .cuda() ---------------------------------------
LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"


def _tied_embedding_needed() -> bool:
    return "weight.data.cuda()" in megatron_source(LANGUAGE_MODULE)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _tied_embedding_apply() -> None:
    # Scoped to this one method: a global Tensor.cuda no-op would hide real mistakes elsewhere.
    cls = importlib.import_module(LANGUAGE_MODULE).LanguageModule
    original = cls.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


# --- 7. activation recomputation saves the CUDA RNG state --------------------------------------
RANDOM = "megatron.core.tensor_parallel.random"


def _recompute_rng_needed() -> bool:
    return "torch.cuda.random.get_rng_state" in megatron_source(RANDOM)


def _recompute_rng_apply() -> None:
    # CheckpointFunction (recompute_granularity=full) saves and restores the CPU RNG state and
    # the CUDA one, which does not exist here; the CPU state (saved beside it) is all there is.
    module = importlib.import_module(RANDOM)
    module._get_cuda_rng_state = lambda *args, **kwargs: None
    module._set_cuda_rng_state = lambda *args, **kwargs: None


CPU_PATCHES: List[CpuPatch] = [
    CpuPatch("paged_stash_without_triton",
             "transformer/moe/ops/paged_stash.py does `import triton` at module level and is "
             "imported by gpt_model.py and schedules.py",
             _paged_stash_needed, _paged_stash_apply),
    CpuPatch("current_device_is_cpu",
             "torch.cuda.current_device() is the device of new tensors in ~200 places",
             _current_device_needed, _current_device_apply),
    CpuPatch("null_cuda_streams",
             "DDP, schedules and the optimizer wait on / synchronise CUDA streams",
             _streams_needed, _streams_apply),
    CpuPatch("cuda_literals_to_cpu",
             'device="cuda" literals in schedules, utils, optimizer, param_and_grad_buffer and '
             "dist_checkpointing",
             _cuda_literals_needed, _cuda_literals_apply),
    CpuPatch("cpu_grad_clipping",
             "clip_grad_by_total_norm_fp32 asserts torch.cuda.FloatTensor grads",
             _clip_grads_needed, _clip_grads_apply),
    CpuPatch("tied_embedding_sync_on_cpu",
             "LanguageModule.setup_embeddings_and_output_layer moves the tied embedding to CUDA "
             "before all-reducing it between the first and last pipeline stages",
             _tied_embedding_needed, _tied_embedding_apply),
    CpuPatch("recompute_without_cuda_rng",
             "activation recomputation (CheckpointFunction) saves and restores the CUDA RNG "
             "state with torch.cuda.random.get_rng_state",
             _recompute_rng_needed, _recompute_rng_apply),
]

_applied: List[str] = []


def apply_cpu_patches(force: bool = False) -> List[str]:
    """Apply each needed CPU patch once; return the names applied so far.

    Does nothing when CUDA is available (unless `force`, used by tests). Must run before
    megatron.core.models / pipeline_parallel are imported (patch 1 replaces a module at import).
    """
    if torch.cuda.is_available() and not force:
        return []
    for patch in CPU_PATCHES:
        if patch.name not in _applied and patch.needed():
            patch.apply()
            _applied.append(patch.name)
    return list(_applied)

