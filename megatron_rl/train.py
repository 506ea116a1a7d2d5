"""The RL job: `torchrun ... -m megatron_rl.train --config X.yaml [key.sub=value ...]`.

One step: rollout -> reward -> advantages -> old log-probs -> PPO epochs over mini-batches ->
weight sync -> metrics -> checkpoint. Runs on any TP/PP/DP layout megatron-core gives.
"""
import argparse
import json
import logging
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megatron-rl-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML job config (examples/*.yaml)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the newest checkpoint in "
                             "training.output_dir/checkpoints if there is one; 'none'; or a path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    # intermixed: overrides may come before and after --resume / --config
    return parser.parse_intermixed_args(argv)


def open_scalar_sinks(cfg, out_dir: str):
    """Functions that take a metrics record: TensorBoard (training.tensorboard) and wandb
    (training.wandb_project), besides metrics.jsonl which is always written."""
    sinks = []
    numeric = lambda record: {k: v for k, v in record.items()  # noqa: E731
                              if isinstance(v, (int, float)) and k != "step"}
    if cfg.training.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

        def to_tensorboard(record):
            for key, value in numeric(record).items():
                writer.add_scalar(key, value, record["step"])
            writer.flush()

        sinks.append(to_tensorboard)
    if cfg.training.wandb_project:
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("training.wandb_project is set but wandb is not installed") from e
        from megatron_rl.config import to_dict

        run = wandb.init(project=cfg.training.wandb_project, config=to_dict(cfg), dir=out_dir)
        sinks.append(lambda record: run.log(numeric(record), step=record["step"]))
    return sinks


def main(argv=None):
    args = parse_args(argv)
    # Pre-emption: SIGTERM (sent by torchrun / Slurm to every rank) ends the current step, writes
    # a checkpoint and exits; the flag is all-reduced so every rank stops at the same step.
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    from megatron_rl.console import setup_logging, silence_third_party_warnings

    silence_third_party_warnings()  # before megatron.core is imported: most warn at import
    setup_logging(log_rank=False)  # warnings only, until the logging rank is known
    from megatron_rl.config import ConfigError, load_config, to_dict

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # every config error surfaces here, before any process group starts
        cfg = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from megatron_rl.algorithms import compute_advantages, informative_groups, rollout_metrics
    from megatron_rl.analysis import (entropy_law_metrics, probe_batch_logits,
                                      probe_entropy_dynamics, save_probe)
    from megatron_rl.analysis.validation import evaluate as evaluate_prompts
    from megatron_rl.checkpointing.checkpoint import (latest_checkpoint, load_checkpoint,
                                                      save_checkpoint)
    from megatron_rl.data.task import build_task
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.rewards.pool import RewardPool, load_reward_fn
    from megatron_rl.rollout import SamplingParams
    from megatron_rl.rollout.builtin import BuiltinEngine
    from megatron_rl.rollout.sglang_rollout import SGLangRollout
    from megatron_rl.errors import EngineError
    from megatron_rl.seeds import derive_seed
    from megatron_rl.training.actor import (build_reference_model, compute_logprobs,
                                            train_mini_batch)
    from megatron_rl.training.optimizer import build_lr_scheduler, build_optimizer, wrap_ddp
    from megatron_rl.training.rl_batch import build_mini_batches, response_mask
    from megatron_rl.training.sft import warm_start

    info = state.initialize(cfg.parallel)
    from megatron.core import parallel_state as mpu

    t, rc, alg = cfg.training, cfg.rollout, cfg.algorithm
    task = build_task(cfg)
    if cfg.model.vocab_size < task.vocab_size:
        raise SystemExit(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's {task.vocab_size}")
    # Verifiers other than the task's own ("exact") run in worker processes with a timeout (a
    # hung or crashing check scores 0 and is counted, never stalls the step).
    reward_pool = None if cfg.reward.fn == "exact" else RewardPool(
        load_reward_fn(cfg.reward.fn, cfg.reward.allowed_modules), cfg.reward.workers,
        cfg.reward.timeout_s, cfg.reward.memory_limit_mb)
    reward_faults = {"timeout": 0, "error": 0, "memory": 0}

    def score(responses, answers):
        if reward_pool is None:
            return task.score(responses, answers)
        rewards, counts = reward_pool.score(list(zip(responses, answers)))
        for key, value in counts.items():
            if key in reward_faults:
                reward_faults[key] += value
        return rewards
    is_logger = info.is_last_pp_stage and info.tp_rank == 0 and info.dp_rank == 0
    setup_logging(is_logger)
    log = logging.getLogger("megatron_rl.train").info  # not __name__: that is __main__ here
    out_dir, ckpt_root = t.output_dir, os.path.join(t.output_dir, "checkpoints")
    if info.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)

    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel), t.use_distributed_optimizer)
    resume_from = latest_checkpoint(ckpt_root) if args.resume == "auto" else (
        None if args.resume == "none" else args.resume)
    # The reference policy of the KL term (algorithm.kl_ref_coef) is the initial policy. On
    # resume the initial weights are rebuilt the same way (the fresh init of the same seed, the
    # init checkpoint, the cached warm start) and copied before the checkpoint replaces them.
    initial_weights = resume_from is None or alg.kl_ref_coef > 0
    if t.init_checkpoint and initial_weights:
        from megatron_rl.checkpointing.model import load_model

        load_model(model, t.init_checkpoint)
        log(f"initial weights from {t.init_checkpoint}")
    if t.sft_steps and initial_weights:
        warm_start(model, cfg, info, log)
    ref_model = build_reference_model(model, cfg.model, cfg.parallel) \
        if alg.kl_ref_coef > 0 else None
    optimizer = build_optimizer([model], t, t.use_distributed_optimizer)
    scheduler = build_lr_scheduler(optimizer, t)
    start_step, law_points = 0, []  # law_points: (entropy, validation accuracy) pairs
    if resume_from is not None:
        train_state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step = train_state["step"]
        law_points = [tuple(p) for p in train_state.get("law_points", [])]
        log(f"resumed from {resume_from} at step {start_step}")
    if rc.engine == "sglang":
        engine = SGLangRollout(cfg, model, out_dir, weight_version=start_step,
                               device=rc.sglang.device if rc.sglang.device != "auto"
                               else info.device.type)
    else:
        engine = BuiltinEngine(model, vocab_size=task.vocab_size, seed=rc.seed)
        engine.weight_version = start_step
    dp_group = mpu.get_data_parallel_group()

    def dp_mean(value: float) -> float:
        x = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(x, group=dp_group)
        return x.item() / info.dp_size

    eval_prompts = task.eval_prompts[info.dp_rank::info.dp_size]

    def evaluate(step: int) -> dict:
        return evaluate_prompts(engine, eval_prompts, task.decode, score,
                                max_new_tokens=rc.max_new_tokens,
                                stop_token_ids=(task.eos_id,), avg_k=t.eval_avg_k,
                                temperature=t.eval_temperature, greedy=t.eval_greedy,
                                seed=derive_seed(rc.seed, step, info.dp_rank, 7), dp_group=dp_group)

    per_rank = rc.prompts_per_step // info.dp_size

    def rank_prompts(step: int):
        """This DP rank's share of the step's (prompt ids, answer) pairs."""
        prompts = task.prompts_for_step(step, rc.prompts_per_step)
        return prompts[info.dp_rank * per_rank: (info.dp_rank + 1) * per_rank]

    def save(step: int) -> None:
        save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                        {"weight_version": engine.weight_version, "law_points": law_points},
                        keep=t.keep_checkpoints)
    sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                              max_new_tokens=rc.max_new_tokens, n=alg.n,
                              stop_token_ids=(task.eos_id,))
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if is_logger else None
    scalar_sinks = open_scalar_sinks(cfg, out_dir) if is_logger else []
    # The bar only on a terminal: in log files its carriage returns are noise, and the
    # log_interval lines say the same.
    bar = tqdm(total=t.steps, initial=start_step, disable=not (is_logger and sys.stderr.isatty()),
               desc="rl", unit="step", dynamic_ncols=True)
    if start_step == 0 and t.eval_interval:
        record = dict(step=0, **evaluate(0))
        if is_logger:
            metrics_file.write(json.dumps(record) + "\n")
    nonfinite_in_a_row = 0
    completed = start_step  # the newest step whose update is in the weights
    try:
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.time()
            # 1. rollout: this DP rank's prompts, n samples each
            mine = rank_prompts(step)
            samples = engine.generate([p for p, _ in mine], sampling,
                                      seed=derive_seed(rc.seed, step, info.dp_rank))
            if rc.async_rollout and step < t.steps:  # the next step's, while this one trains
                engine.prefetch([p for p, _ in rank_prompts(step + 1)], sampling)
            t_rollout = time.time() - t0
            # 2. reward, 3. advantages (groups of n are contiguous and stay on one rank)
            answers = [mine[s.prompt_index][1] for s in samples]
            rewards = torch.tensor(score([task.decode(s.output_ids) for s in samples], answers),
                                   dtype=torch.float32)
            resp_mask = response_mask(samples)
            advantages = compute_advantages(alg, rewards, resp_mask)
            keep = informative_groups(rewards, alg.n) if alg.filter_equal_groups else \
                torch.ones_like(rewards, dtype=torch.bool)
            minis = build_mini_batches(samples, advantages, keep, t.mini_batches,
                                       t.micro_batch_size, info.device)
            # 4. old log-probs: the policy that sampled, recomputed by the trainer; and the
            # frozen reference policy's when a KL to it is set
            mismatch = []
            for mini in minis:
                old = compute_logprobs(model, mini, rc.temperature, task.vocab_size)
                if old is not None:
                    for mb, lp in zip(mini, old):
                        mb["old_logprobs"] = lp
                        m = mb["loss_mask"]
                        mismatch.append(float(((lp - mb["rollout_logprobs"]).abs() * m).sum()
                                              / m.sum().clamp(min=1)))
                ref = None if ref_model is None else compute_logprobs(
                    ref_model, mini, rc.temperature, task.vocab_size)
                if ref is not None:
                    for mb, lp in zip(mini, ref):
                        mb["ref_logprobs"] = lp
            # 5. train: PPO epochs over mini-batches, one optimizer step each
            t1 = time.time()
            step_metrics = []
            probe = None
            for epoch in range(t.ppo_epochs):
                for index, mini in enumerate(minis):
                    probing = (t.probe_interval and step % t.probe_interval == 0
                               and epoch == index == 0)
                    if probing:  # logits of a fixed batch around this one optimizer step
                        probe_inputs = mini[:1]
                        before = probe_batch_logits(model, probe_inputs)
                    step_metrics.append(train_mini_batch(
                        model, optimizer, mini, alg, rc.temperature, task.vocab_size,
                        seed=derive_seed(alg.seed, step, epoch, index)))
                    scheduler.step(1)
                    if probing:
                        after = probe_batch_logits(model, probe_inputs)
                        if after is not None:  # the last pipeline stage holds the logits
                            probe = probe_entropy_dynamics(
                                before, after, rc.temperature,
                                mpu.get_tensor_model_parallel_group(),
                                vocab_size=task.vocab_size, mask=probe_inputs[0]["loss_mask"],
                                dp_group=dp_group)
            t_train = time.time() - t1
            completed = step
            # 6. weight sync: SGLang engines get the new weights; the built-in engine reads the
            # trained weights in place
            engine.update_weights()
            # 7. metrics, evaluation, checkpoint
            record = dict(step=step, reward_mean=dp_mean(float(rewards.mean())),
                          lr=optimizer.param_groups[0]["lr"], weight_version=engine.weight_version,
                          rollout_time_s=t_rollout, train_time_s=t_train,
                          rollout_weight_version=min(s.weight_version for s in samples),
                          step_time_s=time.time() - t0)
            record.update({f"rollout/{k}": v for k, v in rollout_metrics(
                rewards, advantages, resp_mask, alg.n).items()})
            for key in sorted({k for m in step_metrics for k in m}):
                # skipped updates lack most keys
                values = [m[key] for m in step_metrics if key in m]
                record[key] = sum(values) / len(values)
            if mismatch:
                record["rollout_train_logprob_diff"] = sum(mismatch) / len(mismatch)
            response_tokens = dp_mean(float(resp_mask.sum())) * info.dp_size
            record["rollout_tokens_per_s"] = response_tokens / max(t_rollout, 1e-9)
            trained_tokens = dp_mean(float(sum(mb["tokens"].numel() for mini in minis
                                               for mb in mini))) * info.dp_size * t.ppo_epochs
            record["train_tokens_per_s"] = trained_tokens / max(t_train, 1e-9)
            if reward_pool is not None:
                record.update({f"reward/{k}_total": v for k, v in reward_faults.items()})
            if task.skipped_rows and step == start_step + 1:
                record.update({f"data/skipped_{k}": v for k, v in task.skipped_rows.items()})
            if probe is not None:
                record.update(probe.metrics)
                if is_logger:
                    save_probe(out_dir, step, probe)
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                record.update(evaluate(step))
                if math.isfinite(record.get("entropy", float("nan"))):
                    law_points.append((record["entropy"], record["eval_accuracy"]))
                    record.update(entropy_law_metrics(law_points))
            if is_logger:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                for sink in scalar_sinks:
                    sink(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}",
                                entropy=f"{record.get('entropy', float('nan')):.3f}",
                                s_per_step=f"{record['step_time_s']:.2f}",
                                rollout_tok_s=f"{record['rollout_tokens_per_s']:.0f}",
                                train_tok_s=f"{record['train_tokens_per_s']:.0f}")
                bar.update(1)
                if step % t.log_interval == 0:
                    log(f"step {step}: reward {record['reward_mean']:.3f} entropy "
                        f"{record.get('entropy', float('nan')):.4f} "
                        + (f"eval_acc {record['eval_accuracy']:.3f} " if "eval_accuracy" in record
                           else "") + f"{record['step_time_s']:.2f}s")
            skipped = any(m.get("nonfinite_skipped") for m in step_metrics)
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
            stop = torch.tensor([1.0 if stop_requested else 0.0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if ((t.checkpoint_interval and step % t.checkpoint_interval == 0) or step == t.steps
                    or stop.item()):
                save(step)
            if stop.item():
                log(f"SIGTERM: checkpoint of step {step} written to {ckpt_root}; exiting "
                    f"(continue with --resume auto)")
                break
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise SystemExit(
                    f"{nonfinite_in_a_row} steps in a row had non-finite gradients (updates "
                    f"skipped, training.max_nonfinite_steps={t.max_nonfinite_steps}); the newest "
                    f"good checkpoint is {latest_checkpoint(ckpt_root)}")
    except EngineError as e:
        # The engines failed for good (every rank raises together). Steps are atomic: this
        # one either finished training (completed == step) or left the weights untouched.
        if completed > start_step:
            save(completed)
        raise SystemExit(f"rollout engines failed: {e}\nnewest checkpoint: "
                         f"{latest_checkpoint(ckpt_root)} (continue with --resume auto)")
    finally:
        if rc.engine == "sglang":
            engine.shutdown()
    bar.close()
    if reward_pool is not None:
        reward_pool.close()
    if metrics_file:
        metrics_file.close()
        from megatron_rl.analysis.plots import write_run_plots

        log(f"plots: {', '.join(write_run_plots(out_dir))}")
    state.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
