"""Regression runs: run the small configs of runs.yaml and compare their metric curves with the
stored baselines, within the tolerances stated there.

    python ci/regression/run.py            # run and check (what ci/test.sh does)
    python ci/regression/run.py --update   # run and store new baselines (review the diff!)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_job(name, overrides, work):
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "megatron_rl.train", "--config", "examples/tiny_cpu.yaml",
           *overrides, f"training.output_dir={out}", f"training.cache_dir={work}/cache"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"regression run {name} failed:\n{proc.stderr[-5000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def compare(name, got, want, spec):
    failures = []
    tol = spec["tolerance"]
    for key in spec["keys"]:
        g, w = curve(got, key), curve(want, key)
        if sorted(g) != sorted(w):
            failures.append(f"{name}: {key} logged at steps {sorted(g)}, baseline {sorted(w)}")
            continue
        first = min(s for s in w if s > 0) if any(s > 0 for s in w) else min(w)
        if abs(g[first] - w[first]) > tol["first_step_abs"]:
            failures.append(f"{name}: {key} at step {first} is {g[first]:.6f}, "
                            f"baseline {w[first]:.6f} (tolerance {tol['first_step_abs']})")
        mean_g, mean_w = sum(g.values()) / len(g), sum(w.values()) / len(w)
        if abs(mean_g - mean_w) > tol["run_mean_abs"][key]:
            failures.append(f"{name}: mean {key} over the run is {mean_g:.4f}, baseline "
                            f"{mean_w:.4f} (tolerance {tol['run_mean_abs'][key]})")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="store new baselines")
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    with open(os.path.join(HERE, "runs.yaml")) as f:
        spec = yaml.safe_load(f)
    failures, checked = [], 0
    with tempfile.TemporaryDirectory() as work:
        for name, overrides in spec["runs"].items():
            if args.only and name not in args.only:
                continue
            records = run_job(name, spec["common"] + overrides, work)
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
