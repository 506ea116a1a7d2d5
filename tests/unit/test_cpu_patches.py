"""One test per CPU patch that fails when megatron-core no longer needs it (delete the patch
then), and one that fails when the patch stops working. CPU hosts only."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_rl.compat.cpu_patches import CPU_PATCHES, apply_cpu_patches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply without CUDA")
NAMES = [p.name for p in CPU_PATCHES]


@pytest.fixture(scope="module")
def needed_before_patching():
    # In a fresh process: once applied, some checks (current_device) answer differently.
    code = ("import json; from megatron_rl.compat.cpu_patches import CPU_PATCHES; "
            "print(json.dumps({p.name: p.needed() for p in CPU_PATCHES}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_patch_is_still_needed(name, needed_before_patching):
    assert needed_before_patching[name], (
        f"megatron-core no longer needs CPU patch {name!r}: remove it from cpu_patches.py")


def test_unpatched_megatron_fails_on_cpu():
    # The reason for patch 1, observed rather than read from the source.
    code = "import megatron.core.models.gpt"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'triton'" in proc.stderr


@pytest.fixture(scope="module")
def patched():
    applied = apply_cpu_patches()
    assert applied == NAMES
    return applied


def test_paged_stash_stub(patched):
    import megatron.core.models.gpt  # noqa: F401  (imports paged_stash)
    from megatron.core.transformer.moe.ops import paged_stash

    with pytest.raises(RuntimeError, match="needs triton and a GPU"):
        paged_stash.paged_stash_copy_kernel[(1,)]()


def test_current_device(patched):
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu  # noqa: F401

    t = torch.empty(3, device=torch.cuda.current_device())
    assert t.device.type == "cpu"


def test_null_streams(patched):
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.default_stream())
    torch.cuda.synchronize()


def test_cuda_literals(patched):
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.optimizer import grad_scaler

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]
    scaler = grad_scaler.ConstantGradScaler(2.0)
    assert scaler.scale.device.type == "cpu" and scaler.scale.item() == 2.0


def test_grad_clipping(patched):
    from megatron.core.optimizer import optimizer

    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4,), 3.0)
    total_norm = float(torch.cat([p.grad for p in params]).norm())
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
    clipped = torch.cat([p.grad for p in params]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_tied_embedding_sync_wrapper(patched):
    # The end-to-end check is tests/distributed (tp2pp2 with tied embeddings); here: the method
    # is wrapped and leaves Tensor.cuda untouched outside it.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert hasattr(LanguageModule.setup_embeddings_and_output_layer, "__wrapped__")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()


def test_recompute_keeps_the_cpu_rng_and_matches_no_recompute(patched):
    """Full activation recomputation runs on CPU and, with dropout, recomputes the same mask
    (CheckpointFunction restores the CPU RNG state it saved): gradients equal the plain run's."""
    from megatron_rl.config import load_config
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state

    grads = {}
    for recompute in ("null", "full"):
        cfg = load_config(None, ["model.hidden_dropout=0.3", "model.attention_dropout=0.3",
                                 f"model.recompute_granularity={recompute}"])
        state.initialize(cfg.parallel)
        torch.manual_seed(0)
        model = build_gpt_model(cfg.model, cfg.parallel)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 12),
                               generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        model(tokens, torch.arange(12)[None].expand(2, -1), None).float().square().mean().backward()
        grads[recompute] = [p.grad.clone() for p in model.parameters()]
        state.destroy()
    for plain, recomputed in zip(grads["null"], grads["full"]):
        torch.testing.assert_close(recomputed, plain)
