"""Regression runs: run the small configs of runs.yaml and compare their metric curves with the
stored baselines, within the tolerances stated there.

    python ci/regression/run.py            # run and check (what ci/test.sh does)
    python ci/regression/run.py --update   # run and store new baselines (review the diff!)
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# Every numeric path of a regression run pinned to one vector width, so that its curves are
# bitwise the same on every x86-64 machine with AVX2 (this project's CPUs: AVX2-only and AVX-512
# AMD EPYC alike), not just on the machine that stored the baselines. Unpinned, ATen picks AVX-512
# kernels where the CPU has them, a sum changes in its last bits, a sampled token flips, and a 0/1
# reward moves at step 1 (0.234 on AVX-512, 0.156 on AVX2). ATEN_CPU_CAPABILITY also picks the
# extension's kernel copy (csrc/kernels/vocab_parallel_cpu.h); MKL's conditional numerical
# reproducibility and oneDNN's ISA cap cover Intel CPUs, where MKL would take AVX-512 paths
# (on AMD it takes AVX2 ones either way: the curves here are the same with and without them).
# One thread: a different thread count splits sums differently.
PINNED_ENV = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned_env():
    if platform.machine() != "x86_64":
        raise SystemExit(f"the regression baselines are x86-64 (AVX2) curves; this machine is "
                         f"{platform.machine()}")
    return dict(os.environ, **PINNED_ENV)


def run_module(module, overrides, what):
    """`python -m module --config examples/tiny_cpu.yaml overrides` in the pinned environment;
    its stdout, or SystemExit with its stderr."""
    cmd = [sys.executable, "-m", module, "--config", "examples/tiny_cpu.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=pinned_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-5000:]}")
    return proc.stdout


def run_job(name, overrides, out):
    run_module("megatron_rl.train", [*overrides, f"training.output_dir={out}"],
               f"regression run {name}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def compare(name, got, want, spec):
    """Every logged step of every key, within runs.yaml's step_abs: the runs are pinned
    (PINNED_ENV), so a difference anywhere is a change in the computation, not in the CPU."""
    failures = []
    tol = spec["tolerance"]["step_abs"]
    for key in spec["keys"]:
        g, w = curve(got, key), curve(want, key)
        if sorted(g) != sorted(w):
            failures.append(f"{name}: {key} logged at steps {sorted(g)}, baseline {sorted(w)}")
            continue
        off = [step for step in sorted(w) if abs(g[step] - w[step]) > tol]
        if off:
            first = off[0]
            failures.append(f"{name}: {key} differs at {len(off)} of {len(w)} steps; first at "
                            f"step {first}: {g[first]:.10g}, baseline {w[first]:.10g} "
                            f"(tolerance {tol})")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="store new baselines")
    parser.add_argument("--only", nargs="*", help="run only these names")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, one thread each (default: 2, or 1 on one core)")
    parser.add_argument("--cache-dir", help="keep the warm start here between invocations "
                        "(default: a temporary folder, built anew each time)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    with open(os.path.join(HERE, "runs.yaml")) as f:
        spec = yaml.safe_load(f)
    names = [name for name in spec["runs"] if not args.only or name in args.only]
    failures, checked = [], 0
    print("regression runs pinned to " + " ".join(f"{k}={v}" for k, v in PINNED_ENV.items()),
          flush=True)
    with tempfile.TemporaryDirectory() as work:
        cache = [f"training.cache_dir={args.cache_dir or os.path.join(work, 'cache')}"]
        # The warm start first, once: the runs share it (its cache key leaves out what they
        # change), then the runs side by side, one thread each; pinned, their curves do not
        # depend on what else the machine runs.
        run_module("megatron_rl.training.sft", spec["common"] + cache, "the warm start")
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {name: pool.submit(run_job, name,
                                         spec["common"] + spec["runs"][name] + cache,
                                         os.path.join(work, name))
                       for name in names}
            for name in names:
                records = futures[name].result()
                path = os.path.join(HERE, "baselines", f"{name}.jsonl")
                if args.update:
                    with open(path, "w") as f:
                        for r in records:
                            f.write(json.dumps({k: r[k] for k in ["step"] + spec["keys"]
                                                if k in r}) + "\n")
                    print(f"{name}: baseline written to {os.path.relpath(path, ROOT)}")
                    continue
                if not os.path.exists(path):
                    failures.append(f"{name}: no baseline at {path} (run with --update)")
                    continue
                with open(path) as f:
                    want = [json.loads(line) for line in f]
                found = compare(name, records, want, spec)
                failures += found
                checked += 1
                print(f"regression {name}: {'FAILED' if found else 'ok'}", flush=True)
    if failures:
        print("\n".join(failures))
    if not args.update:
        print(f"regression: {checked - len({f.split(':')[0] for f in failures})} passed, "
              f"{len({f.split(':')[0] for f in failures})} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
