"""Wrap the model in megatron-core DDP and build its optimizer and LR schedule."""
import torch

from megatron_rl.training.config import TrainingConfig


def wrap_ddp(model, use_distributed_optimizer: bool = False):
    """megatron-core DDP: contiguous grad buffers, grads reduced over the DP group and averaged.

    The distributed optimizer needs CUDA tensors (it asserts CUDA tensor types), so on CPU it is
    never used whatever the caller asks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer and torch.cuda.is_available(),
        average_in_collective=False,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # megatron's schedules call these: finalize_model_grads all-reduces grads over DP (and the
    # tied embedding across PP stages, and layernorm grads under sequence parallel); no_sync
    # defers the DP reduction to the last micro-batch.
    from megatron.core.distributed import finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp_model.no_sync
    return ddp_model


def build_optimizer(model_chunks, cfg: TrainingConfig, use_distributed_optimizer: bool = False):
    """Adam(W) through megatron-core, with fp32 main params for bf16/fp16 models."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = model_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer and torch.cuda.is_available(),
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def optimizer_steps_per_rl_step(cfg: TrainingConfig) -> int:
    """The trainer's optimizer steps (and LR-schedule steps) in one RL step."""
    return cfg.mini_batches * cfg.ppo_epochs


def build_lr_scheduler(optimizer, cfg: TrainingConfig):
    """The LR schedule over the run's optimizer steps: the trainer advances it once per
    mini-batch, so the RL-step counts training.steps and training.lr_warmup_steps are scaled
    by optimizer_steps_per_rl_step. A decaying schedule reaches training.min_lr with the last
    optimizer step of the last RL step (the `lr` that step logs)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    per_step = optimizer_steps_per_rl_step(cfg)
    warmup = cfg.lr_warmup_steps * per_step
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        # config checks keep the warmup shorter than the run; max() only satisfies megatron's
        # assertion warmup < decay for the constant style, which never decays
        lr_decay_steps=max(cfg.steps * per_step, warmup + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(cfg.steps * per_step, 1),
        wd_incr_style="constant",
    )
