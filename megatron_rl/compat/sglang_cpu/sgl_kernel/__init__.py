"""megatron_rl stand-in for `sgl_kernel` (SGLang's CUDA kernel package) in a CPU-only SGLang venv.

sglang imports names from sgl_kernel at module level in ~100 places, although its dense-model CPU
path (torch_native attention, pytorch sampling) calls none of them; the real package ships only
CUDA builds. Every name resolves to a function that raises, so a CPU run that does reach a CUDA
kernel fails loudly instead of silently computing something else.
Installed by ci/setup_sglang_cpu.sh into the SGLang venv only; never on a GPU host.
"""
import sys
import types

STAND_IN = True
# scalar_type is left out: sglang falls back to its own mock types when importing it fails.
_SUBMODULES = ("kvcacheio", "flash_attn", "quantization", "mamba", "allreduce")


def _missing_kernel(qualified_name):
    def kernel(*_args, **_kwargs):
        raise RuntimeError(f"{qualified_name} is a CUDA kernel of sgl_kernel; this CPU-only SGLang "
                           f"install has a stand-in (megatron_rl/compat/sglang_cpu) that cannot "
                           "run it")
    kernel.__name__ = qualified_name.rsplit(".", 1)[-1]
    kernel.__qualname__ = qualified_name
    return kernel


def _module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_kernel(f"{module_name}.{name}")
    return __getattr__


__getattr__ = _module_getattr(__name__)
for _sub in _SUBMODULES:
    _module = types.ModuleType(f"{__name__}.{_sub}")
    _module.__getattr__ = _module_getattr(_module.__name__)
    sys.modules[_module.__name__] = _module
    globals()[_sub] = _module
