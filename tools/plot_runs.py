"""Plot one run or compare several (e.g. GRPO vs Clip-Cov vs KL-Cov) from their run folders.

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] --out FILE.png [--panels-dir DIR]

One run: entropy, eval accuracy, accuracy vs entropy with the fitted law and its ceiling,
covariance and the probe's predicted-vs-actual entropy change in one figure (--panels-dir also
writes each panel as its own PNG). Several: one line per run, labelled by its loss mode.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.analysis.plots import plot_runs, read_runs, write_run_plots  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True, help="PNG path of the figure")
    parser.add_argument("--panels-dir", help="one run: also write each panel as a PNG here")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(read_runs(args.run_dirs), args.out)}")
    if args.panels_dir:
        if len(args.run_dirs) != 1:
            parser.error("--panels-dir takes a single run")
        for path in write_run_plots(args.run_dirs[0], args.panels_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
