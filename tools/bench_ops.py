"""Time and peak extra memory of the vocab-parallel log-prob + entropy op (forward + backward).

Compares, on CPU, float32 logits [tokens, V_local], temperature 1:
  ext    megatron_rl.ops.vocab_parallel_logprobs_entropy (the C++ extension);
  ext-inplace  the same with inplace_backward=True (the actor's call): the gradient overwrites
         the logits, which here are a view of a leaf whose values are restored between runs;
  plain  (a) the plain PyTorch path: log_softmax + gather + entropy from exp(logp), autograd;
  tp3ar  (b) what public RL systems run on vocab-parallel logits: megatron-core's
         vocab_parallel_cross_entropy for the log-prob (on a clone of the logits: it subtracts the
         max in place) + a Megatron/verl-style entropy autograd function with three all-reduces
         (max, sum-exp, sum p*z) that saves the softmax for backward.
Cases: TP=1 with vocab 32768, and one TP=2 shard of vocab 151936 (75968 columns) run in one
process on a 1-rank gloo group, so ext and tp3ar make their real all-reduce calls (identity).

Memory: each (case, method) runs in a fresh subprocess. After the inputs exist, the kernel's
peak-RSS counter is reset (/proc/self/clear_refs = 5), one forward + backward runs, and
"peak extra" = VmHWM - RSS before; "saved" = RSS after the forward - RSS before (what stays
allocated for the backward). Large torch CPU tensors are mmap'd and unmapped on free, so RSS
follows live tensors. Both include the [tokens, V_local] logits gradient that every method must
return (512 MiB / 1.16 GiB here), except ext-inplace, whose gradient is the logits' own memory.
Time: median of --repeats forward+backward runs after that one.

Floor: in the ext-inplace process, the median time of torch.exp over the logits into a
preallocated buffer; a forward + backward must at least read every logit and exponentiate it
twice (the forward's sums, the backward's softmax) and write the gradient, so two such passes are
the floor its fwd+bwd is compared with.

Usage: .venv/bin/python tools/bench_ops.py [--repeats 3] [--tokens 4096]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {"tp1-v32768": 32768, "tp2-shard-v151936": 151936 // 2}
METHODS = ("ext", "ext-inplace", "plain", "tp3ar")
TARGETS = ("ext >= 3x faster than plain, >= 2x faster than tp3ar, peak extra <= 1/4 of tp3ar's; "
           "ext-inplace fwd+bwd <= 1.3x the two-exp-pass floor, peak extra <= 5% of the logits")


def _proc_status_mib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _worker(case, method, tokens, repeats):
    import torch
    import torch.distributed as dist

    from megatron_rl.ops import vocab_parallel_logprobs_entropy

    torch.manual_seed(0)
    vocab = CASES[case]
    store = os.path.join(tempfile.mkdtemp(prefix="bench_ops_"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    group = dist.group.WORLD

    class SavedSoftmaxEntropy(torch.autograd.Function):
        """Entropy of vocab-parallel logits the way public RL systems compute it."""

        @staticmethod
        def forward(ctx, logits):
            row_max = logits.max(dim=-1, keepdim=True).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            softmax = (logits - row_max).exp_()
            sum_exp = softmax.sum(dim=-1, keepdim=True)
            dist.all_reduce(sum_exp, group=group)
            softmax.div_(sum_exp)
            sum_p_z = (softmax * logits).sum(dim=-1, keepdim=True)
            dist.all_reduce(sum_p_z, group=group)
            ctx.save_for_backward(logits, softmax, sum_p_z)
            return (row_max + sum_exp.log() - sum_p_z).squeeze(-1)

        @staticmethod
        def backward(ctx, grad):
            logits, softmax, sum_p_z = ctx.saved_tensors
            return grad.unsqueeze(-1) * softmax * (sum_p_z - logits)

    def ext(x, t, inplace_backward=False):
        return vocab_parallel_logprobs_entropy(x, t, 1.0, None if case.startswith("tp1") else group,
                                               inplace_backward=inplace_backward)

    def plain(x, t):
        logp = torch.log_softmax(x, dim=-1)
        return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def tp3ar(x, t):
        entropy = SavedSoftmaxEntropy.apply(x)
        return -vocab_parallel_cross_entropy(x.clone(), t, tp_group=group), entropy

    if method == "tp3ar":
        from megatron_rl.compat import apply_cpu_patches

        apply_cpu_patches()  # megatron-core imports triton unconditionally; the patches stub it
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    inplace = method == "ext-inplace"
    fn = {"ext": ext, "ext-inplace": lambda x, t: ext(x, t, inplace_backward=True),
          "plain": plain, "tp3ar": tp3ar}[method]
    logits = (torch.randn(tokens, vocab) * 2).requires_grad_(True)
    original = logits.detach().clone() if inplace else None
    target = torch.randint(0, vocab, (tokens,))
    g_lp, g_h = torch.randn(tokens), torch.randn(tokens) * 0.01

    def step():
        logits.grad = None
        if inplace:  # the last backward left the gradient in the logits
            with torch.no_grad():
                logits.copy_(original)
        # in place: the op gets a non-leaf view, as the actor passes the model's output
        x = logits.view(logits.shape) if inplace else logits
        t0 = time.perf_counter()
        logprobs, entropy = fn(x, target)
        t1 = time.perf_counter()
        saved = _proc_status_mib("VmRSS")
        (g_lp * logprobs + g_h * entropy).sum().backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, saved

    before = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    _, _, after_forward = step()
    peak = _proc_status_mib("VmHWM")
    runs = [step() for _ in range(repeats)]
    floor = {}
    if inplace:
        buffer = torch.empty_like(original)
        torch.exp(original, out=buffer)  # first touch of the buffer's pages, untimed
        passes = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.exp(original, out=buffer)
            passes.append(time.perf_counter() - t0)
        floor = {"exp_pass_s": statistics.median(passes)}
        del buffer
    with torch.no_grad():
        lp, h = fn(original if inplace else logits.detach().clone(), target)
        reference = {"logprob_mean": lp.mean().item(), "entropy_mean": h.mean().item()}
    dist.destroy_process_group()
    return {"case": case, "method": method, "fwd_s": statistics.median(r[0] for r in runs),
            "fwd_bwd_s": statistics.median(r[1] for r in runs), "peak_extra_mib": peak - before,
            "saved_mib": after_forward - before, "logits_mib": logits.numel() * 4 / 2**20,
            **floor, **reference}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.tokens, args.repeats)))
        return 0

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"tokens={args.tokens}, temperature 1, fwd+bwd; times are medians of {args.repeats}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failures = []
    for case in CASES:
        rows = {}
        for method in METHODS:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case,
                                   method, "--tokens", str(args.tokens),
                                   "--repeats", str(args.repeats)],
                                  cwd=root, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{case} {method} failed:\n{proc.stdout}\n{proc.stderr}")
            rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\n{case}: logits [{args.tokens}, {CASES[case]}] = "
              f"{args.tokens * CASES[case] * 4 / 2**20:.0f} MiB")
        print(f"{'method':12s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'peak extra MiB':>15s} "
              f"{'saved MiB':>10s} {'mean logprob':>13s} {'mean entropy':>13s}")
        for method, r in rows.items():
            print(f"{method:12s} {r['fwd_s']:8.3f} {r['fwd_bwd_s']:10.3f} "
                  f"{r['peak_extra_mib']:15.0f} {r['saved_mib']:10.0f} "
                  f"{r['logprob_mean']:13.5f} {r['entropy_mean']:13.5f}")
        ext, plain, tp3ar, inplace = (rows[m] for m in ("ext", "plain", "tp3ar", "ext-inplace"))
        floor_s = 2 * inplace["exp_pass_s"]
        vs_floor = inplace["fwd_bwd_s"] / floor_s
        inplace_memory = inplace["peak_extra_mib"] / inplace["logits_mib"]
        print(f"floor: exp into a preallocated buffer {inplace['exp_pass_s']:.3f} s, two passes "
              f"{floor_s:.3f} s; ext fwd+bwd {ext['fwd_bwd_s'] / floor_s:.2f}x the floor, "
              f"ext-inplace {vs_floor:.2f}x; ext-inplace peak extra {100 * inplace_memory:.1f}% "
              f"of the logits")
        vs_plain = plain["fwd_bwd_s"] / ext["fwd_bwd_s"]
        vs_tp3ar = tp3ar["fwd_bwd_s"] / ext["fwd_bwd_s"]
        memory = ext["peak_extra_mib"] / tp3ar["peak_extra_mib"]
        print(f"ext speed-up: {vs_plain:.1f}x vs plain, {vs_tp3ar:.1f}x vs tp3ar; "
              f"peak extra memory: {memory:.2f} of tp3ar's, "
              f"{ext['peak_extra_mib'] / plain['peak_extra_mib']:.2f} of plain's")
        for ok, what in ((vs_plain >= 3, "3x vs plain"), (vs_tp3ar >= 2, "2x vs tp3ar"),
                         (memory <= 0.25, "1/4 memory"), (vs_floor <= 1.3, "1.3x the floor"),
                         (inplace_memory <= 0.05, "in-place 5% memory")):
            if not ok:
                failures.append(f"{case}: {what}")
    print(f"\ntargets ({TARGETS}): "
          + ("all met" if not failures else "MISSED " + "; ".join(failures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
