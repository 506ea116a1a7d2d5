"""Aggregate seeds of several methods: ROOT/<method>/seed_<s>/ run folders (what
examples/run_tiny_cpu.sh writes under runs/tiny_cpu).

    python tools/compare_runs.py ROOT [--out FILE.png] [--summary FILE.json]

Writes ROOT/comparison.png (mean over seeds and min-max band of entropy, held-out accuracy and
covariance vs step; accuracy vs entropy with each method's fitted law) and ROOT/summary.json,
and prints the table: per method, mean ±std [min, max] over seeds of the initial and final
entropy, warm-start and final held-out accuracy, the law's a, b, ceiling and R^2, the prefix
check's RMSE, then the issue's checks (reported, never enforced). docs/analysis.md defines them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.analysis.compare import compare_root, format_table  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder of <method>/seed_<s>/ run folders")
    parser.add_argument("--out", help="PNG path (default ROOT/comparison.png)")
    parser.add_argument("--summary", help="JSON path (default ROOT/summary.json)")
    args = parser.parse_args(argv)
    try:
        summary = compare_root(args.root, args.out, args.summary)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    print(format_table(summary))
    print(f"wrote {summary['figure']} and {summary['summary_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
