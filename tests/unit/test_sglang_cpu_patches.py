"""The CPU stand-ins installed into the SGLang venv (megatron_rl/compat/sglang_cpu): each is still
needed (the reason is still there in the installed sglang / torchvision) and still works (sglang's
server modules import, and a CUDA kernel reached by mistake raises instead of computing)."""
import json
import subprocess

import pytest

from tests.torchrun import sglang_python

CHECKS = r'''
import json, os, glob, importlib.util
out = {}
spec = importlib.util.find_spec("sglang")
cache_move = os.path.join(spec.submodule_search_locations[0], "kernels/ops/kvcache/cache_move.py")
out["sglang_imports_sgl_kernel"] = "from sgl_kernel import" in open(cache_move).read()
import megatron_rl_torchvision_ops_schema as hook
out["torchvision_ops_missing"] = hook.torchvision_ops_missing()
import torch, torchvision
out["nms_schema_defined"] = hasattr(torch.ops.torchvision, "nms")
import sglang.srt.managers.scheduler, sglang.srt.mem_cache.memory_pool, sglang.srt.models.qwen2
import sgl_kernel
out["stand_in"] = getattr(sgl_kernel, "STAND_IN", False)
try:
    from sgl_kernel.kvcacheio import transfer_kv_per_layer
    transfer_kv_per_layer()
    out["kernel_raises"] = False
except RuntimeError as e:
    out["kernel_raises"] = "stand-in" in str(e)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def checks():
    proc = subprocess.run([sglang_python(), "-c", CHECKS], capture_output=True, text=True,
                          env={"SGLANG_USE_CPU_ENGINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sgl_kernel_stand_in_still_needed_and_works(checks):
    assert checks["sglang_imports_sgl_kernel"], (
        "sglang no longer imports sgl_kernel unconditionally: drop the stand-in")
    assert checks["stand_in"] and checks["kernel_raises"]


def test_torchvision_hook_still_needed_and_works(checks):
    assert checks["torchvision_ops_missing"], (
        "torchvision's ops library loads beside CPU torch now: drop torchvision_ops_schema.py")
    assert checks["nms_schema_defined"]
