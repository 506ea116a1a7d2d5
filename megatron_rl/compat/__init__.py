"""Compatibility patches for running megatron-core on hosts without CUDA (see cpu_patches)."""
from megatron_rl.compat.cpu_patches import CPU_PATCHES, apply_cpu_patches

__all__ = ["CPU_PATCHES", "apply_cpu_patches"]
