"""Fit the entropy law R = -a exp(H) + b to a finished run and check how well its first K
evaluations predict the rest (the paper: fit on 36 steps, predict 200, RMSE 0.9 points).

    python tools/fit_entropy_law.py RUN_DIR [--first-k 36] [--accuracy-key eval_accuracy]

Prints a, b, the ceiling -a + b and the held-out RMSE in accuracy points; writes
RUN_DIR/plots/entropy_law.png (or --out).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.analysis.entropy_law import (entropy_accuracy_points, fit_entropy_law,  # noqa: E402
                                              predict_from_prefix)
from megatron_rl.analysis.plots import plot_prefix_prediction, read_run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--first-k", type=int, default=36,
                        help="evaluations to fit on (lowered to leave at least one to predict)")
    parser.add_argument("--accuracy-key", default="eval_accuracy",
                        help="metrics key used as R (e.g. eval_avg@8)")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/plots/entropy_law.png)")
    args = parser.parse_args(argv)

    run = read_run(args.run_dir)
    steps, entropy, accuracy = entropy_accuracy_points(run.records, args.accuracy_key)
    if len(steps) < 3:
        print(f"{args.run_dir}: {len(steps)} (entropy, {args.accuracy_key}) points; the law needs "
              "at least 3 (2 to fit, 1 to predict)", file=sys.stderr)
        return 1
    first_k = min(args.first_k, len(steps) - 1)
    if first_k != args.first_k:
        print(f"only {len(steps)} points: fitting on the first {first_k}")
    full = fit_entropy_law(entropy, accuracy)
    prefix = predict_from_prefix(entropy, accuracy, first_k)
    print(f"run {run.name} ({run.label}): {len(steps)} points, "
          f"steps {int(steps[0])}..{int(steps[-1])}")
    print(f"all points:     a = {full.a:.4f}  b = {full.b:.4f}  ceiling -a+b = {full.ceiling:.4f}  "
          f"residual RMS = {100 * full.residual_rms:.2f} pts")
    print(f"first {first_k:3d} pts: a = {prefix.fit.a:.4f}  b = {prefix.fit.b:.4f}  "
          f"ceiling -a+b = {prefix.fit.ceiling:.4f}")
    print(f"predicting the other {len(prefix.actual)} "
          f"(steps {int(steps[first_k])}..{int(steps[-1])}): "
          f"RMSE = {100 * prefix.rmse:.2f} accuracy pts")
    out = args.out or os.path.join(args.run_dir, "plots", "entropy_law.png")
    print(f"wrote {plot_prefix_prediction(run, prefix, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
