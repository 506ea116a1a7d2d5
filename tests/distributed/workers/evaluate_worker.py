"""Several evaluations in one torchrun launch (each launch costs seconds of start-up):

  evaluate_worker.py ARGS... [--then ARGS...]...

runs `python -m megatron_rl.evaluate ARGS` once per group, in order, in this process, in one
process group (each evaluation makes its own model-parallel groups in it). Stops at the first
non-zero exit code."""
import sys

import torch.distributed as dist

from megatron_rl.evaluate import main


def groups(argv):
    out = [[]]
    for arg in argv:
        if arg == "--then":
            out.append([])
        else:
            out[-1].append(arg)
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for args in groups(sys.argv[1:]):
        code = main(args)
        if code:
            sys.exit(code)
    dist.destroy_process_group()
