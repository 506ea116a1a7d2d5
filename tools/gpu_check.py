"""GPU correctness checks and timings of the vocab-parallel CUDA kernels (run by
tools/gpu_check.sh).

Checks (each recorded, the run exits 1 if any fails):
- the public ops on CUDA tensors (fp32, bf16, fp16, fp64; odd / unaligned and aligned vocab sizes,
  strided rows, -inf logits, temperatures, padded vocabularies, [s, b, V] layouts) against dense
  float64 autograd on the GPU: log-probs, entropies, logits gradients, covariance, mean delta;
- the three phase ops on a vocab shard with vocab_start != 0 (what TP=2 runs) against the CPU
  extension on the same data;
- the hidden-states version (output_layer_logprobs_entropy) on CUDA against dense float64;
- torch.autograd.gradcheck in float64 on CUDA;
- inplace_backward: the gradient written over the logits equals the out-of-place one bitwise.
Timings (CUDA events, median of several runs) of the forward, the backward and the covariance on
[tokens, V_local] logits against the plain PyTorch path (log_softmax + gather + entropy), the
effective bandwidth of each kernel next to a device-to-device copy, and the peak extra memory
(torch.cuda.max_memory_allocated); the in-place forward + backward against two torch.exp passes
into a preallocated buffer (the floor of bench_ops.py). Everything goes to a JSON results file.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from megatron_rl.ops import output_layer_logprobs_entropy, vocab_parallel as vp
from megatron_rl.ops import vocab_parallel_covariance, vocab_parallel_logprobs_entropy
from megatron_rl.ops.reference import dense_covariance, dense_logprobs_entropy

DEVICE = torch.device("cuda")
# (rtol, atol); the CUDA kernels use fast exp (__expf), so fp32 tolerances are looser than on CPU.
OUTPUT_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
              torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4)}
GRAD_TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-3, 1e-5),
            torch.bfloat16: (2e-2, 1e-4), torch.float16: (4e-3, 1e-5)}
RESULTS = {"checks": [], "timings": []}


def record(name, fn):
    t0 = time.perf_counter()
    try:
        detail = fn() or {}
        ok, error = True, None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
        ok, error, detail = False, f"{type(exc).__name__}: {exc}"[:2000], {}
    RESULTS["checks"].append({"name": name, "ok": ok, "error": error,
                              "seconds": time.perf_counter() - t0, **detail})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {error}" if error else ""), flush=True)


def max_err(a, b):
    finite = torch.isfinite(b)
    return (a.double() - b)[finite].abs().max().item() if finite.any() else 0.0


def make_logits(shape, dtype, seed, masked_fraction=0.05):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float64) * 3
    logits[torch.rand(shape, generator=g, device=DEVICE) < masked_fraction] = float("-inf")
    return logits.to(dtype)


def check_logprobs_entropy(logits, target, temperature, vocab_size=None):
    dtype = logits.dtype
    g = torch.Generator(device=DEVICE).manual_seed(1)
    grad_lp = torch.randn(target.shape, generator=g, device=DEVICE)
    grad_h = torch.randn(target.shape, generator=g, device=DEVICE)
    x = logits.detach().clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs_entropy(x, target, temperature, vocab_size=vocab_size)
    (grad_lp.to(lp.dtype) * lp + grad_h.to(h.dtype) * h).sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref_lp, ref_h = dense_logprobs_entropy(x64, target, temperature, vocab_size)
    (grad_lp.double() * ref_lp + grad_h.double() * ref_h).sum().backward()
    rtol, atol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(lp.double(), ref_lp, rtol=rtol, atol=atol)
    torch.testing.assert_close(h.double(), ref_h, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    if vocab_size is not None:
        assert torch.all(x.grad[..., vocab_size:] == 0), "padding columns got gradient"
    # inplace_backward: the same bits, written over the logits (a non-leaf copy of them)
    y = logits.detach().clone().requires_grad_(True) * 1
    seen = []
    y.register_hook(seen.append)
    lp, h = vocab_parallel_logprobs_entropy(y, target, temperature, vocab_size=vocab_size,
                                            inplace_backward=True)
    (grad_lp.to(lp.dtype) * lp + grad_h.to(h.dtype) * h).sum().backward()
    assert seen[0].data_ptr() == y.data_ptr(), "in-place gradient is not in the logits' memory"
    assert torch.equal(seen[0], x.grad), "in-place gradient differs from the out-of-place one"
    return {"max_err_logprob": max_err(lp, ref_lp), "max_err_entropy": max_err(h, ref_h),
            "max_err_grad": max_err(x.grad, x64.grad)}


def check_covariance(logits, delta, temperature, vocab_size=None):
    cov, mean = vocab_parallel_covariance(logits, delta, temperature, vocab_size=vocab_size)
    ref_cov, ref_mean = dense_covariance(logits.double(), delta.double(), temperature, vocab_size)
    rtol, atol = OUTPUT_TOL[logits.dtype]
    torch.testing.assert_close(cov.double(), ref_cov, rtol=rtol, atol=atol)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=rtol, atol=atol)
    return {"max_err_cov": max_err(cov, ref_cov), "max_err_mean": max_err(mean, ref_mean)}


def check_phase_ops_match_cpu(dtype):
    """A TP shard (vocab_start != 0, padding) through the CUDA and the CPU phase ops."""
    ops = torch.ops.megatron_rl
    logits = make_logits((37, 1000), dtype, seed=5)
    target = torch.randint(0, 2000, (37,), device=DEVICE)
    target[:4] = torch.tensor([1000, 1999, 1500, 0], device=DEVICE)
    args = (1 / 0.8, 1000, 990)
    stats = ops.logprob_stats(logits, target, *args)
    stats_cpu = ops.logprob_stats(logits.cpu(), target.cpu(), *args)
    torch.testing.assert_close(stats.cpu(), stats_cpu, rtol=1e-4, atol=1e-4, equal_nan=True)
    lse = (stats[0] + stats[1].log() + 0.5).contiguous()
    entropy = (stats[1].log() - stats[2] / stats[1] + 0.1).contiguous()
    g1, g2 = (torch.randn(37, device=DEVICE, dtype=lse.dtype),
              torch.randn(37, device=DEVICE, dtype=lse.dtype))
    grad = ops.logprob_entropy_backward(logits, target, lse, entropy, g1, g2, *args)
    grad_cpu = ops.logprob_entropy_backward(logits.cpu(), target.cpu(), lse.cpu(), entropy.cpu(),
                                            g1.cpu(), g2.cpu(), *args)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.cpu().double(), grad_cpu.double(), rtol=rtol, atol=atol)
    delta = torch.randn(37, 1000, device=DEVICE)
    part = ops.covariance_partials(logits, delta, lse, entropy, args[0], args[2])
    part_cpu = ops.covariance_partials(logits.cpu(), delta.cpu(), lse.cpu(), entropy.cpu(),
                                       args[0], args[2])
    torch.testing.assert_close(part.cpu(), part_cpu, rtol=1e-4, atol=1e-4)
    return {"max_err_stats": max_err(stats.cpu()[1:], stats_cpu[1:].double()),
            "max_err_grad": max_err(grad.cpu(), grad_cpu.double())}


def check_output_layer(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(7)
    hidden = torch.randn(3, 50, 64, generator=g, device=DEVICE, dtype=torch.float64).to(dtype)
    weight = (torch.randn(1024, 64, generator=g, device=DEVICE, dtype=torch.float64)
              * 0.2).to(dtype)
    target = torch.randint(0, 1000, (3, 50), generator=g, device=DEVICE)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = output_layer_logprobs_entropy(h, w, target, 0.9, vocab_size=1000, token_chunk=64,
                                            vocab_chunk=300)
    (lp + 0.1 * ent).sum().backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_lp, ref_h = dense_logprobs_entropy(h64 @ w64.t(), target, 0.9, 1000)
    (ref_lp + 0.1 * ref_h).sum().backward()
    # The logits blocks are matmul outputs in the input dtype (as megatron's output layer makes
    # them): bf16 rounding of logits ~10 moves log-probs by ~1e-2; TF32 may be on for fp32.
    tol = {torch.float64: 1e-9, torch.float32: 5e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(lp.double(), ref_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ref_h, rtol=tol, atol=tol)
    gtol = {torch.float64: 1e-8, torch.float32: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=gtol, atol=gtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=gtol, atol=gtol)
    return {"max_err_logprob": max_err(lp, ref_lp),
            "max_err_grad_weight": max_err(w.grad, w64.grad)}


def run_checks():
    assert vp.phase_ops(DEVICE) is vp._NATIVE_OPS, f"the extension has no {DEVICE.type} kernels"
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for vocab, temperature in ((1001, 0.7), (32768, 1.0), (75968, 1.3)):
            tokens = 64 if vocab > 2000 else 33
            logits = make_logits((tokens, vocab), dtype, seed=vocab)
            target = torch.randint(0, vocab, (tokens,), generator=gen, device=DEVICE)
            record(f"logprobs/entropy/grad {dtype} V={vocab} T={temperature}",
                   lambda: check_logprobs_entropy(logits, target, temperature))
        wide = make_logits((4, 8, 4099), dtype, seed=11)
        target = torch.randint(0, 4093, (4, 8), generator=gen, device=DEVICE)
        record(f"strided rows + [s,b,V] + padding {dtype}",
               lambda: check_logprobs_entropy(wide[..., :4096], target, 0.9, vocab_size=4093))
        delta = torch.randn(40, 5003, generator=gen, device=DEVICE)
        logits = make_logits((40, 5003), dtype, seed=12)
        record(f"covariance {dtype} (fp32 delta)",
               lambda: check_covariance(logits, delta, 0.8, vocab_size=5000))
        record(f"covariance {dtype} (same-dtype delta)",
               lambda: check_covariance(logits, delta.to(dtype), 1.0))
        record(f"phase ops CUDA == CPU on a shard {dtype}",
               lambda: check_phase_ops_match_cpu(dtype))
    masked = make_logits((6, 4096), torch.float32, seed=13, masked_fraction=0.0)
    masked[0, 1:] = float("-inf")
    masked[1, :4000] = float("-inf")
    record("-inf rows", lambda: check_logprobs_entropy(
        masked, torch.tensor([0, 4001, 5, 6, 7, 8], device=DEVICE), 1.1))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        record(f"output layer {dtype}", lambda: check_output_layer(dtype))
    x = make_logits((3, 9), torch.float64, seed=14, masked_fraction=0.0).requires_grad_(True)
    t = torch.tensor([0, 8, 4], device=DEVICE)
    record("gradcheck fp64", lambda: {"gradcheck": torch.autograd.gradcheck(
        lambda v: vocab_parallel_logprobs_entropy(v, t, 0.8, vocab_size=8), (x,),
        eps=1e-6, atol=1e-7)})


def cuda_time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def plain_logprobs_entropy(x, t):
    logp = torch.log_softmax(x.float(), dim=-1)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def run_timings(tokens, repeats):
    ops = torch.ops.megatron_rl
    buffer = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    copy_target = torch.empty_like(buffer)
    copy_s = cuda_time(lambda: copy_target.copy_(buffer), repeats)
    copy_gbs = 2 * buffer.numel() / copy_s / 1e9
    RESULTS["d2d_copy_GBps"] = copy_gbs
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    buffer = copy_target = None  # frees the 2 GiB (not `del`: the lambda above names them)
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in (32768, 75968):
            logits = make_logits((tokens, vocab), dtype, seed=21, masked_fraction=0.0)
            target = torch.randint(0, vocab, (tokens,), device=DEVICE)
            delta = torch.randn(tokens, vocab, device=DEVICE, dtype=dtype)
            nbytes = logits.numel() * logits.element_size()
            stats = ops.logprob_stats(logits, target, 1.0, 0, vocab)
            lse, entropy, _ = vp.global_softmax_moments(stats, None)
            ones = torch.ones(tokens, device=DEVICE)
            fwd_kernel = cuda_time(lambda: ops.logprob_stats(
                logits, target, 1.0, 0, vocab), repeats)
            bwd_kernel = cuda_time(lambda: ops.logprob_entropy_backward(
                logits, target, lse, entropy, ones, ones, 1.0, 0, vocab), repeats)
            cov_kernel = cuda_time(lambda: ops.covariance_partials(
                logits, delta, lse, entropy, 1.0, vocab), repeats)

            def fwd_bwd(fn):
                x = logits.detach().requires_grad_(True)
                lp, h = fn(x, target)
                (lp + 0.01 * h).sum().backward()

            def fwd_bwd_inplace():
                # a non-leaf view: the gradient overwrites `logits` (run last: the values change,
                # the work does not)
                x = logits.detach().requires_grad_(True)
                lp, h = vocab_parallel_logprobs_entropy(x.view_as(x), target,
                                                        inplace_backward=True)
                (lp + 0.01 * h).sum().backward()

            ext_s = cuda_time(lambda: fwd_bwd(vocab_parallel_logprobs_entropy), repeats)
            plain_s = cuda_time(lambda: fwd_bwd(plain_logprobs_entropy), repeats)
            exp_pass_s = cuda_time(lambda: torch.exp(logits, out=delta), repeats)
            inplace_s = cuda_time(fwd_bwd_inplace, repeats)
            row = {"dtype": str(dtype), "tokens": tokens, "vocab": vocab,
                   "stats_kernel_s": fwd_kernel, "stats_GBps": nbytes / fwd_kernel / 1e9,
                   "backward_kernel_s": bwd_kernel, "backward_GBps": 2 * nbytes / bwd_kernel / 1e9,
                   "covariance_kernel_s": cov_kernel,
                   "covariance_GBps": 2 * nbytes / cov_kernel / 1e9,
                   "ext_fwd_bwd_s": ext_s, "plain_fwd_bwd_s": plain_s,
                   "ext_peak_extra_MiB": peak_extra_bytes(
                       lambda: fwd_bwd(vocab_parallel_logprobs_entropy)) / 2**20,
                   "plain_peak_extra_MiB": peak_extra_bytes(
                       lambda: fwd_bwd(plain_logprobs_entropy)) / 2**20,
                   "exp_pass_s": exp_pass_s, "ext_inplace_fwd_bwd_s": inplace_s,
                   "ext_inplace_vs_two_exp_passes": inplace_s / (2 * exp_pass_s),
                   "ext_inplace_peak_extra_MiB": peak_extra_bytes(fwd_bwd_inplace) / 2**20,
                   "logits_MiB": nbytes / 2**20}
            RESULTS["timings"].append(row)
            print(f"{dtype} [{tokens}, {vocab}]: stats {fwd_kernel * 1e3:.3f} ms "
                  f"({row['stats_GBps']:.0f} GB/s), backward {bwd_kernel * 1e3:.3f} ms "
                  f"({row['backward_GBps']:.0f} GB/s), covariance {cov_kernel * 1e3:.3f} ms "
                  f"({row['covariance_GBps']:.0f} GB/s); fwd+bwd ext {ext_s * 1e3:.2f} ms "
                  f"vs plain {plain_s * 1e3:.2f} ms; peak extra ext "
                  f"{row['ext_peak_extra_MiB']:.0f} MiB vs plain "
                  f"{row['plain_peak_extra_MiB']:.0f} MiB; in place {inplace_s * 1e3:.2f} ms = "
                  f"{row['ext_inplace_vs_two_exp_passes']:.2f}x two exp passes, peak extra "
                  f"{row['ext_inplace_peak_extra_MiB']:.0f} MiB", flush=True)
            # frees both before the next case allocates its own (not `del`: the lambdas and
            # fwd_bwd above name them)
            logits = delta = None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check_results.json")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda",
                        help="'cpu' runs the same checks on the CPU kernels, without timings "
                             "(a dry run of this script)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    from megatron_rl import _C

    RESULTS.update(device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                   torch=torch.__version__, cuda=torch.version.cuda,
                   extension_with_cuda=bool(_C.with_cuda))
    print(json.dumps({k: RESULTS[k] for k in ("device", "torch", "cuda", "extension_with_cuda")}),
          flush=True)
    run_checks()
    if DEVICE.type == "cuda":
        try:
            run_timings(args.tokens, args.repeats)
        except Exception as exc:  # noqa: BLE001 - keep the correctness results if a timing fails
            RESULTS["timing_error"] = f"{type(exc).__name__}: {exc}"
            print(f"timing failed: {RESULTS['timing_error']}", flush=True)
    failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    RESULTS["failed"] = failed
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=1)
    print(f"{len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} checks passed; "
          f"results in {args.out}")
    return 1 if failed or "timing_error" in RESULTS else 0


if __name__ == "__main__":
    sys.exit(main())
