"""The training job: `torchrun ... -m megatron_rl.train --config X.yaml [key.sub=value ...]`.

For now it runs the supervised warm start of the tiny model on the built-in addition task
(the RL loop builds on it): data -> micro-batches -> megatron forward/backward -> optimizer step ->
metrics, on any TP/PP/DP layout.
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megatron-rl-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML job config (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # megatron-core warns at import about optional GPU packages (TE, apex) and experimental APIs.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_rl.config import ConfigError, load_config, to_dict

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # every config error surfaces here, before any process group starts
        cfg = load_config(args.config, args.overrides, world_size=world_size)
        num_micro = cfg.training.num_micro_batches(cfg.parallel.data_parallel_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from megatron_rl.data.synthetic import CharTokenizer, addition_problems, supervised_batch
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.training.optimizer import build_lr_scheduler, build_optimizer, wrap_ddp
    from megatron_rl.training.step import train_step

    info = state.initialize(cfg.parallel)
    tokenizer = CharTokenizer()
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"model.vocab_size={cfg.model.vocab_size} is smaller than the synthetic "
                         f"tokenizer's {tokenizer.vocab_size}")
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.training)
    scheduler = build_lr_scheduler(optimizer, cfg.training)

    out_dir = cfg.training.output_dir
    is_logger = info.is_last_pp_stage and info.tp_rank == 0 and info.dp_rank == 0
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
    dist.barrier()
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if is_logger else None

    per_rank = cfg.training.global_batch_size // info.dp_size
    for step in range(1, cfg.training.steps + 1):
        t0 = time.time()
        problems = addition_problems(cfg.training.global_batch_size, digits=2,
                                     seed=cfg.training.seed * 100003 + step)
        mine = problems[info.dp_rank * per_rank: (info.dp_rank + 1) * per_rank]
        tokens, labels, mask = supervised_batch(mine, tokenizer, cfg.training.seq_length)
        micro = [dict(tokens=t.to(info.device), labels=l.to(info.device),
                      loss_mask=m.to(info.device))
                 for t, l, m in zip(tokens.chunk(num_micro), labels.chunk(num_micro),
                                    mask.chunk(num_micro))]
        metrics, ok, grad_norm = train_step([model], optimizer, micro)
        scheduler.step(1)
        if metrics:
            loss = torch.stack([m["lm_loss"] for m in metrics]).mean()
            from megatron.core import parallel_state as mpu
            dist.all_reduce(loss, group=mpu.get_data_parallel_group())
            loss = loss.item() / info.dp_size
        if is_logger:
            record = dict(step=step, loss=loss, grad_norm=float(grad_norm or 0.0),
                          lr=optimizer.param_groups[0]["lr"], update_ok=bool(ok),
                          step_time_s=round(time.time() - t0, 4))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % cfg.training.log_interval == 0 or step == cfg.training.steps:
                print(f"step {step:4d}/{cfg.training.steps}  loss {loss:.4f}  "
                      f"grad_norm {record['grad_norm']:.3f}  {record['step_time_s']:.2f}s/step",
                      flush=True)
    if metrics_file:
        metrics_file.close()
    state.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
