"""Supervised warm start of the policy on a built-in task, cached by its settings.

RL from a random tiny model would wait long for a first reward; a short SFT on the task's
demonstrations gives it a policy that is sometimes right. The result is a layout-independent
megatron checkpoint under training.cache_dir, keyed by everything that shapes it and nothing
else (not the RL seeds or the prompt order), so later runs -- every method and seed of the
README's comparison -- load it instead of training again.
"""
import dataclasses
import hashlib
import json
import logging
import os

import torch
import torch.distributed as dist

from megatron_rl.checkpointing.model import load_model, save_model
from megatron_rl.data.synthetic import CharTokenizer, supervised_batch
from megatron_rl.data.task import build_task
from megatron_rl.files import publish_folder
from megatron_rl.training.optimizer import build_optimizer
from megatron_rl.training.step import SupervisedBatch, train_step

logger = logging.getLogger("megatron_rl.training.sft")  # not __name__: __main__ under python -m


def sft_cache_key(cfg, demonstrations) -> str:
    """`demonstrations`: the task's (count, seed) -> (prompt, response) pairs function."""
    t, d = cfg.training, cfg.data
    # The task's problems and the held-out split shape the demonstrations; data.seed (the RL
    # prompt order) does not.
    task_keys = dict(task=d.task, digits=d.digits) if d.task == "addition" else dict(
        task=d.task, walk_steps=d.walk_steps, walk_digits=d.walk_digits, walk_slip=d.walk_slip,
        eval_prompts=d.eval_prompts, eval_seed=d.eval_seed)
    # A sample of the demonstrations themselves: a change of the task's format or of its
    # demonstrator is a new cache entry, never a stale warm start.
    sample = demonstrations(4, t.seed)
    keyed = dict(model=dataclasses.asdict(cfg.model), data=task_keys, sample=sample,
                 steps=t.sft_steps, lr=t.sft_lr, batch=t.sft_batch_size, seed=t.seed,
                 seq_length=t.seq_length)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def sft_training_config(t):
    """The warm start's optimizer settings: training's, at sft_lr. There is no LR schedule:
    min_lr (which must not exceed lr) is 0, so any sft_lr is accepted."""
    return dataclasses.replace(t, lr=t.sft_lr, min_lr=0.0, lr_warmup_steps=0,
                               steps=t.sft_steps)


def warm_start(model, cfg, info, log=logger.info) -> str:
    """Load the cached SFT weights into `model`, training and caching them first if needed."""
    # the prompt order is irrelevant here: demonstrations draw their own problems
    demonstrations = build_task(cfg).demonstrations
    path = os.path.join(cfg.training.cache_dir, f"sft-{sft_cache_key(cfg, demonstrations)}")
    if os.path.exists(os.path.join(path, "done")):
        load_model(model, path)
        log(f"warm start: loaded cached SFT weights from {path}")
        return path
    t = cfg.training
    optimizer = build_optimizer([model], sft_training_config(t), t.use_distributed_optimizer)
    tokenizer = CharTokenizer()
    per_rank = t.sft_batch_size // info.dp_size
    num_micro = max(per_rank // t.micro_batch_size, 1)
    losses = []
    for step in range(1, t.sft_steps + 1):
        # Not derive_seed: the cached warm starts, the regression baselines and the README's
        # figure were all drawn from these seeds; moving them re-draws every warm start.
        problems = demonstrations(t.sft_batch_size, t.seed * 7919 + step)
        mine = problems[info.dp_rank * per_rank: (info.dp_rank + 1) * per_rank]
        tokens, labels, mask = supervised_batch(mine, tokenizer, t.seq_length)
        micro = [SupervisedBatch(a.to(info.device), b.to(info.device), c.to(info.device))
                 for a, b, c in zip(tokens.chunk(num_micro), labels.chunk(num_micro),
                                    mask.chunk(num_micro))]
        metrics, _, _ = train_step([model], optimizer, micro)
        if metrics:
            losses.append(float(torch.stack([m["lm_loss"] for m in metrics]).mean()))
        if step % max(t.sft_steps // 5, 1) == 0 and losses:
            log(f"warm start: step {step}/{t.sft_steps} loss {losses[-1]:.4f}")
    tmp = path + f".tmp{os.getpid() if info.rank == 0 else ''}"
    tmp_name = [tmp]
    dist.broadcast_object_list(tmp_name, src=0)
    save_model(model, tmp_name[0])
    if info.rank == 0:
        open(os.path.join(tmp_name[0], "done"), "w").close()
        publish_folder(tmp_name[0], path)
    dist.barrier()
    return path


def main(argv=None) -> int:
    """`python -m megatron_rl.training.sft --config X.yaml [key=value ...]`: build (or find) the
    cached warm start of a job config and print its folder as the last line of stdout, so that
    several RL runs (e.g. one per seed) can start from that one checkpoint
    (`training.init_checkpoint=PATH training.sft_steps=0`); nothing when training.sft_steps is 0.
    Logs go to stderr. The same process-group set-up as the trainer."""
    import argparse
    import sys

    from megatron_rl.console import setup_logging, silence_third_party_warnings

    parser = argparse.ArgumentParser(prog="python -m megatron_rl.training.sft",
                                     description=main.__doc__)
    parser.add_argument("--config", help="YAML job config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)
    silence_third_party_warnings()  # before megatron.core is imported: most warn at import
    setup_logging(log_rank=False)  # warnings only, until the logging rank is known
    from megatron_rl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides,
                          world_size=int(os.environ.get("WORLD_SIZE", "1")), on_this_host=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not cfg.training.sft_steps:  # nothing to build: stdout stays empty
        print("training.sft_steps is 0: the config has no warm start", file=sys.stderr)
        return 0
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.training.optimizer import wrap_ddp

    info = state.initialize(cfg.parallel)
    # INFO on the trainer's logging rank (the one holding the losses)
    setup_logging(info.is_last_pp_stage and info.tp_rank == 0 and info.dp_rank == 0)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel),
                     cfg.training.use_distributed_optimizer)
    if cfg.training.init_checkpoint:  # as the trainer does: the warm start continues from it
        load_model(model, cfg.training.init_checkpoint)
    path = warm_start(model, cfg, info)
    if info.rank == 0:
        print(path, flush=True)
    state.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
