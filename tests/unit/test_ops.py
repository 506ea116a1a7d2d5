"""megatron_rl.ops (TP=1) against float64 PyTorch references on the same logits.

TP=2 runs in tests/distributed/test_ops_tp.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from megatron_rl.ops import output_layer_logprobs_entropy, vocab_parallel as vp
from megatron_rl.ops import vocab_parallel_covariance, vocab_parallel_logprobs_entropy
from megatron_rl.ops.reference import dense_covariance, dense_logprobs_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (rtol, atol) for outputs (always fp32 math) and for gradients (stored in the logits' dtype).
OUTPUT_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-5),
              torch.bfloat16: (1e-5, 2e-5), torch.float16: (1e-5, 2e-5)}
GRAD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 2e-6),
            torch.bfloat16: (1e-2, 1e-4), torch.float16: (2e-3, 2e-6)}


@pytest.fixture(params=["extension", "reference"])
def backend(request, monkeypatch):
    """Runs a test through the C++ kernels and again through the PyTorch fallback ops."""
    if request.param == "reference":
        monkeypatch.setattr(vp, "phase_ops", lambda device: vp._REFERENCE_OPS)
    else:
        assert vp._NATIVE_OPS is not None, "megatron_rl._C did not load: rebuild the extension"
    return request.param


def make_logits(shape, dtype, seed=0, scale=3.0, masked_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    logits[torch.rand(shape, generator=g) < masked_fraction] = float("-inf")
    return logits.to(dtype)


def check_logprobs_entropy(logits, target, temperature, vocab_size=None):
    """Outputs and logits-gradient of the op vs dense float64 autograd on the same values."""
    dtype = logits.dtype
    g = torch.Generator().manual_seed(1)
    grad_lp = torch.randn(target.shape, generator=g)
    grad_h = torch.randn(target.shape, generator=g)

    x = logits.clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, target, temperature,
                                                        vocab_size=vocab_size)
    assert logprobs.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64
                                               else torch.float32)
    (grad_lp.to(logprobs.dtype) * logprobs + grad_h.to(entropy.dtype) * entropy).sum().backward()

    x64 = logits.detach().double().requires_grad_(True)
    ref_lp, ref_h = dense_logprobs_entropy(x64, target, temperature, vocab_size)
    (grad_lp.double() * ref_lp + grad_h.double() * ref_h).sum().backward()

    rtol, atol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=rtol, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    assert x.grad.dtype == dtype
    if vocab_size is not None:  # padding columns get exactly zero gradient
        assert torch.all(x.grad[..., vocab_size:] == 0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    return logprobs, entropy, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_logprobs_entropy_match_float64(backend, dtype, temperature):
    logits = make_logits((13, 1001), dtype)  # odd vocabulary, ~10% -inf logits
    target = torch.randint(0, 1001, (13,), generator=torch.Generator().manual_seed(2))
    check_logprobs_entropy(logits, target, temperature)


def test_sequence_parallel_layout_and_large_rows(backend):
    # [s, b, V_local] as megatron's output layer returns it; a row long enough for many SIMD blocks.
    logits = make_logits((5, 3, 4099), torch.float32, seed=3, scale=6.0)
    target = torch.randint(0, 4099, (5, 3), generator=torch.Generator().manual_seed(4))
    logprobs, entropy, _ = check_logprobs_entropy(logits, target, 0.9)
    assert logprobs.shape == entropy.shape == (5, 3)


def test_masked_rows_and_masked_target(backend):
    logits = make_logits((4, 37), torch.float32, seed=5, masked_fraction=0.0)
    logits[0, 1:] = float("-inf")  # one finite logit: p = 1 there, entropy 0
    logits[1, :30] = float("-inf")
    logits[2, 7] = float("-inf")
    target = torch.tensor([0, 31, 7, 36])
    x = logits.clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, target)
    assert logprobs[0] == 0 and entropy[0] == 0
    assert logprobs[2] == float("-inf")  # the sampled token was masked
    (logprobs[[0, 1, 3]].sum() + entropy.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1, :30] == 0)  # p = 0 columns get no gradient
    check_logprobs_entropy(logits[[0, 1, 3]], target[[0, 1, 3]], 1.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocabulary_is_excluded(backend, dtype):
    logits = make_logits((6, 128), dtype, seed=6)
    logits[:, 101:] = 50.0  # padding columns with huge logits must not count
    target = torch.randint(0, 101, (6,), generator=torch.Generator().manual_seed(7))
    check_logprobs_entropy(logits, target, 0.8, vocab_size=101)


def test_entropy_only_and_logprob_only_backward(backend):
    logits = make_logits((3, 50), torch.float64, seed=8)
    target = torch.tensor([1, 2, 3])
    for pick in (0, 1):
        x = logits.clone().requires_grad_(True)
        vocab_parallel_logprobs_entropy(x, target, 1.4)[pick].sum().backward()
        x64 = logits.clone().requires_grad_(True)
        dense_logprobs_entropy(x64, target, 1.4)[pick].sum().backward()
        torch.testing.assert_close(x.grad, x64.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(backend):
    logits = make_logits((3, 7), torch.float64, seed=9, masked_fraction=0.0).requires_grad_(True)
    target = torch.tensor([0, 6, 3])
    for temperature, vocab_size in ((1.0, None), (0.7, 6)):
        assert torch.autograd.gradcheck(
            lambda x: vocab_parallel_logprobs_entropy(x, target, temperature,
                                                      vocab_size=vocab_size),
            (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,delta_dtype", [(torch.float32, torch.float32),
                                               (torch.float64, torch.float64),
                                               (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_covariance_matches_float64(backend, dtype, delta_dtype):
    logits = make_logits((9, 333), dtype, seed=10)
    g = torch.Generator().manual_seed(11)
    delta = (torch.randn(9, 333, generator=g) + 0.3 * logits.float().clamp(min=-10)).to(delta_dtype)
    for temperature, vocab_size in ((1.0, None), (0.6, 300)):
        cov, mean_delta = vocab_parallel_covariance(logits, delta, temperature,
                                                    vocab_size=vocab_size)
        ref_cov, ref_mean = dense_covariance(logits.double(), delta.double(), temperature,
                                             vocab_size)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(cov.double(), ref_cov, rtol=tol, atol=tol)
        torch.testing.assert_close(mean_delta.double(), ref_mean, rtol=tol, atol=tol)


def test_covariance_predicts_entropy_change():
    # First-order entropy dynamics (PAPER.md): H(z + eps d) - H(z) ~= -eps Cov_p(log p, d).
    logits = make_logits((4, 200), torch.float64, seed=12, masked_fraction=0.0)
    delta = torch.randn(4, 200, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    eps = 1e-6
    target = torch.zeros(4, dtype=torch.long)
    h0 = vocab_parallel_logprobs_entropy(logits, target)[1]
    h1 = vocab_parallel_logprobs_entropy(logits + eps * delta, target)[1]
    cov, _ = vocab_parallel_covariance(logits, delta)
    torch.testing.assert_close((h1 - h0) / eps, -cov, rtol=1e-4, atol=1e-6)


def dense_output_layer(hidden, weight, target, temperature, vocab_size):
    return dense_logprobs_entropy(hidden @ weight.t(), target, temperature, vocab_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_layer_matches_dense(backend, dtype):
    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(2, 11, 16, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(203, 16, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    target = torch.randint(0, 190, (2, 11), generator=g)
    grad_lp, grad_h = torch.randn(2, 11, generator=g), torch.randn(2, 11, generator=g)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    # Chunks smaller than the problem so several token and vocab blocks merge.
    logprobs, entropy = output_layer_logprobs_entropy(h, w, target, 0.8, vocab_size=190,
                                                      token_chunk=5, vocab_chunk=64)
    (grad_lp.to(logprobs.dtype) * logprobs + grad_h.to(entropy.dtype) * entropy).sum().backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_lp, ref_h = dense_output_layer(h64, w64, target, 0.8, 190)
    (grad_lp.double() * ref_lp + grad_h.double() * ref_h).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=10 * tol, atol=10 * tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=10 * tol, atol=10 * tol)


def test_output_layer_gradcheck(backend):
    g = torch.Generator().manual_seed(15)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, 4, 7])
    assert torch.autograd.gradcheck(
        lambda h, w: output_layer_logprobs_entropy(h, w, target, 1.3, vocab_size=8, token_chunk=3,
                                                   vocab_chunk=4),
        (hidden, weight), eps=1e-6, atol=1e-7)


def inplace_and_out_of_place_grads(logits, target, temperature, vocab_size=None, beside=None):
    """(out-of-place gradient, in-place gradient, the logits it overwrote, their base) for the
    same values. The in-place op gets a non-leaf view of a base tensor, and `beside` [..., k]
    columns after the logits in that base make its rows strided (a column slice)."""
    g = torch.Generator().manual_seed(11)
    grad_lp, grad_h = torch.randn(target.shape, generator=g), torch.randn(target.shape, generator=g)

    def backward(lp, h):
        (grad_lp.to(lp.dtype) * lp + grad_h.to(h.dtype) * h).sum().backward()

    x = logits.clone().requires_grad_(True)
    backward(*vocab_parallel_logprobs_entropy(x, target, temperature, vocab_size=vocab_size))
    wide = logits if beside is None else torch.cat([logits, beside], dim=-1)
    base = wide.clone().requires_grad_(True)
    y = base[..., :logits.shape[-1]]
    seen = []
    y.register_hook(seen.append)
    backward(*vocab_parallel_logprobs_entropy(y, target, temperature, vocab_size=vocab_size,
                                              inplace_backward=True))
    (grad,) = seen
    return x.grad, grad, y, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature,vocab_size", [(1.0, None), (0.7, 1000)])
def test_inplace_backward_equals_out_of_place_bitwise(backend, dtype, temperature, vocab_size):
    """The gradient written over the logits has the out-of-place gradient's bits, and it is the
    logits' own storage (nothing [tokens, V] allocated)."""
    logits = make_logits((3, 5, 1003), dtype, seed=12)  # odd vocabulary: SIMD tails
    target = torch.randint(0, 1003, (3, 5), generator=torch.Generator().manual_seed(13))
    target[0, 0] = 1002  # a padding column when vocab_size=1000: no target logit
    want, grad, overwritten, _ = inplace_and_out_of_place_grads(logits, target, temperature,
                                                                vocab_size)
    assert grad.dtype == dtype and torch.equal(grad, want)
    assert grad.data_ptr() == overwritten.data_ptr()
    assert torch.equal(overwritten.detach(), want)  # the logits now hold their gradient


def test_inplace_backward_on_strided_rows(backend):
    # Rows further apart than their width: the gradient lands in the slice, the rest is intact.
    logits = make_logits((7, 257), torch.float32, seed=14)
    beside = torch.randn(7, 43)
    target = torch.randint(0, 257, (7,), generator=torch.Generator().manual_seed(15))
    want, grad, overwritten, base = inplace_and_out_of_place_grads(logits, target, 1.3,
                                                                   beside=beside)
    assert torch.equal(grad, want) and grad.data_ptr() == overwritten.data_ptr()
    assert torch.equal(base.detach()[:, 257:], beside)


def test_reuse_of_overwritten_logits_is_caught(backend):
    logits = make_logits((4, 64), torch.float32, seed=16, masked_fraction=0.0)
    target = torch.tensor([1, 2, 3, 4])

    def fresh():
        return logits.clone().requires_grad_(True)

    # A leaf is the caller's own tensor: never overwritten.
    with pytest.raises(ValueError, match="leaf"):
        vocab_parallel_logprobs_entropy(fresh(), target, inplace_backward=True)
    # This backward twice: its saved logits were overwritten by the first.
    base = fresh()
    lp, _ = vocab_parallel_logprobs_entropy(base * 1, target, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()
    # Another function saved the same logits and runs its backward after this one (autograd
    # runs later-created nodes first): it would read the gradient, and autograd refuses.
    base = fresh()
    x = base * 1
    square = (x * x).sum()
    lp, _ = vocab_parallel_logprobs_entropy(x, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (square + lp.sum()).backward()
    # ... and when that function runs first it read the logits intact: the gradient is right.
    ref = fresh()
    ref_lp, _ = vocab_parallel_logprobs_entropy(ref, target)
    (ref_lp.sum() + (ref * ref).sum()).backward()
    base = fresh()
    x = base * 1
    lp, _ = vocab_parallel_logprobs_entropy(x, target, inplace_backward=True)
    (lp.sum() + (x * x).sum()).backward()
    torch.testing.assert_close(base.grad, ref.grad, rtol=1e-6, atol=1e-6)


def test_inplace_op_rejects_overlapping_rows():
    logits = torch.randn(1, 16).expand(4, 16)  # four rows on one row of memory
    stats = torch.zeros(4)
    with pytest.raises(RuntimeError, match="overlapping rows"):
        torch.ops.megatron_rl.logprob_entropy_backward_(logits, torch.zeros(4, dtype=torch.long),
                                                         stats, stats, stats, stats, 1.0, 0, 16)


def test_bad_arguments_are_rejected():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(3, dtype=torch.long), vocab_size=11)
    with pytest.raises(RuntimeError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(3, dtype=torch.long), temperature=-1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.megatron_rl.logprob_stats(logits.to(torch.int32), None, 1.0, 0, 10)


FALLBACK_SCRIPT = r"""
import sys
sys.modules["megatron_rl._C"] = None  # makes `from megatron_rl import _C` raise ImportError
import torch
from megatron_rl.ops import (vocab_parallel, vocab_parallel_logprobs_entropy,
                             vocab_parallel_covariance)
from megatron_rl.ops.reference import dense_logprobs_entropy, dense_covariance
assert vocab_parallel.phase_ops(torch.device("cpu")) is vocab_parallel._REFERENCE_OPS
logits = torch.randn(5, 77, dtype=torch.float64) * 2
target = torch.randint(0, 77, (5,))
x = logits.clone().requires_grad_(True)
lp, h = vocab_parallel_logprobs_entropy(x, target, 0.9)
(lp + h).sum().backward()
x64 = logits.clone().requires_grad_(True)
rlp, rh = dense_logprobs_entropy(x64, target, 0.9)
(rlp + rh).sum().backward()
torch.testing.assert_close((lp, h, x.grad), (rlp, rh, x64.grad), rtol=1e-10, atol=1e-12)
delta = torch.randn(5, 77, dtype=torch.float64)
torch.testing.assert_close(vocab_parallel_covariance(logits, delta, 0.9),
                           dense_covariance(logits, delta, 0.9))
print("fallback ok")
"""


def test_reference_fallback_when_extension_missing():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stdout + proc.stderr
    # one line, logged (stderr) at import
    messages = [line for line in proc.stderr.splitlines() if "megatron_rl._C" in line]
    assert len(messages) == 1 and "PyTorch reference" in messages[0], proc.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_conversions_match_torch(dtype):
    ops = torch.ops.megatron_rl
    # Loads: every non-NaN bit pattern as a one-column row; the row max is the kernel's conversion.
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[~torch.isnan(values)].unsqueeze(-1).contiguous()
    stats = ops.logprob_stats(values, None, 1.0, 0, 1)
    assert torch.equal(stats[0], values.squeeze(-1).float())
    # Stores (round to nearest even, subnormals, overflow): with one column, logit 0, lse 0 and
    # the target elsewhere, p = 1 and the gradient is exactly -grad_logprob, rounded to dtype.
    g = torch.Generator().manual_seed(16)
    wanted = torch.cat([torch.randn(20000, generator=g)
                        * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),
                        values.squeeze(-1).float()[::7] * (1 + 2.0 ** -11),
                        torch.tensor([65519.0, 65520.0, 7e4])])
    rows = wanted.numel()
    zeros = torch.zeros(rows)
    grad = ops.logprob_entropy_backward(torch.zeros(rows, 1, dtype=dtype), torch.full((rows,), -1),
                                        zeros, zeros, -wanted, zeros, 1.0, 0, 1)
    assert torch.equal(grad.squeeze(-1), wanted.to(dtype))


ISA_SCRIPT = """
import torch
import megatron_rl._C  # noqa: F401
from megatron_rl.ops.reference import dense_logprobs_entropy
ops = torch.ops.megatron_rl
g = torch.Generator().manual_seed(5)
logits = torch.randn(64, 4099, generator=g) * 3
target = torch.randint(0, 4099, (64,), generator=g)
stats = ops.logprob_stats(logits, target, 1.0, 0, 4099)
lse = stats[0] + stats[1].log()
want, _ = dense_logprobs_entropy(logits.double(), target)
torch.testing.assert_close(stats[3] - lse, want.float(), rtol=1e-5, atol=2e-5)
torch.save({"isa": ops.cpu_kernel_isa(), "stats": stats}, OUT)
"""


def test_cpu_kernels_follow_aten_cpu_capability(tmp_path):
    """ATEN_CPU_CAPABILITY picks the extension's kernel copy too, so that one setting pins every
    vector width of a run (ci/regression/run.py relies on it): each copy is right, and the copies
    really differ (a sum over 4099 columns at 8 vs 16 lanes differs in its last bits)."""
    import megatron_rl._C  # noqa: F401

    settings = {"default": "baseline", "avx2": "avx2", "avx512": "avx512"}
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in settings:
        pytest.skip(f"not an x86 ATen build (CPU capability {best})")
    results = {}
    for capability, isa in settings.items():
        if capability == "avx512" and best != "avx512":
            continue
        out = tmp_path / f"{capability}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + ISA_SCRIPT],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[capability] = torch.load(out)
        assert results[capability]["isa"] == isa, (capability, results[capability]["isa"])
    assert not torch.equal(results["default"]["stats"], results["avx2"]["stats"])
    if "avx512" in results:
        assert not torch.equal(results["avx2"]["stats"], results["avx512"]["stats"])


def test_kernels_split_rows_over_threads_with_the_same_bits():
    """CI runs pytest at one torch thread per worker (ci/test.sh), so the kernels' row split
    over threads (at::parallel_for) is exercised here explicitly: rows are independent, so one
    and two threads give the same bits, the in-place backward included."""
    ops = torch.ops.megatron_rl
    logits = make_logits((4096, 300), torch.float32)  # ~218 rows per task: 19 tasks
    target = torch.randint(0, 300, (4096,), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(2, 4096, generator=g)
    delta = torch.randn(4096, 300, generator=g)

    def run():
        stats = ops.logprob_stats(logits, target, 1.0, 0, 300)
        lse = stats[0] + stats[1].log()
        entropy = lse - stats[0] - stats[2] / stats[1]
        grad = ops.logprob_entropy_backward(logits, target, lse, entropy, *grads, 1.0, 0, 300)
        inplace = logits.clone()
        ops.logprob_entropy_backward_(inplace, target, lse, entropy, *grads, 1.0, 0, 300)
        cov = ops.covariance_partials(logits, delta, lse, entropy, 1.0, 300)
        return stats, grad, inplace, cov

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
