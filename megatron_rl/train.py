"""The RL job: `torchrun ... -m megatron_rl.train --config X.yaml [key.sub=value ...]`.

A thin entry over megatron_rl.training.trainer.RLTrainer, whose train_step is one RL step:
rollout -> score -> advantages -> old log-probs -> PPO epochs over mini-batches -> weight sync ->
metrics -> checkpoint, on any TP/PP/DP layout megatron-core gives.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megatron-rl-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML job config (examples/*.yaml)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the newest intact checkpoint in "
                             "training.output_dir/checkpoints if there is one; 'none'; or a path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds an earlier run: removes its "
                             "checkpoints/, metrics.jsonl and tensorboard/ (each named) first")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    # intermixed: overrides may come before and after --resume / --config
    args = parser.parse_intermixed_args(argv)
    if args.overwrite and args.resume != "none":
        parser.error("--overwrite starts the run over; it cannot be combined with --resume")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_rl.console import setup_logging, silence_third_party_warnings

    silence_third_party_warnings()  # before megatron.core is imported: most warn at import
    setup_logging(log_rank=False)  # warnings only, until the logging rank is known
    from megatron_rl.config import load_job_config

    cfg = load_job_config(args.config, args.overrides)  # every config error, named, here
    if cfg is None:
        return 2
    from megatron_rl.checkpointing.output_dir import claim_output_dir
    from megatron_rl.errors import CheckpointError, OutputDirError

    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # the job's claim on its output folder: rank 0's
        try:  # before anything heavy: a busy folder or an earlier run there ends the launch here
            lock = claim_output_dir(cfg.training.output_dir, args.resume, args.overwrite)
        except OutputDirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        from megatron_rl.training.trainer import RLTrainer

        trainer = RLTrainer(cfg, resume=args.resume)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except CheckpointError as e:  # named folder and file, said once; no traceback needed
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
