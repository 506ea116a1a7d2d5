"""The policy's two jobs on a rollout batch: log-probs without gradient (old / current policy,
and the frozen reference policy of the KL term) and the PPO-family update, through megatron's
schedules on any TP/PP/DP layout.

Log-probs and entropies come from the vocab-parallel op (megatron_rl.ops) on the output layer's
logits shard, so [tokens, vocab] probabilities are never gathered. Losses are normalised by the
mini-batch's global token / sequence counts and scaled back for megatron's averaging, so the
update is the same whatever the micro-batch size and DP size (docs/algorithms.md).
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rl.algorithms import TokenStats, covariance_metrics, policy_loss, select_tokens
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.ops import vocab_parallel_logprobs_entropy
from megatron_rl.training.step import forward_backward


def token_logprobs(batch: Dict, logits: torch.Tensor, temperature: float, vocab_size: int):
    from megatron.core import parallel_state as mpu

    return vocab_parallel_logprobs_entropy(logits, batch["targets"], temperature,
                                           group=mpu.get_tensor_model_parallel_group(),
                                           vocab_size=vocab_size)


def model_inputs(micro_batches: List[Dict]) -> List[Dict]:
    # No "labels" key: the model then returns logits (not megatron's cross-entropy).
    return [dict(tokens=mb["tokens"]) for mb in micro_batches]


@torch.no_grad()
def compute_logprobs(model, micro_batches: List[Dict], temperature: float,
                     vocab_size: int) -> Optional[List[torch.Tensor]]:
    """Per-token log-probs of each micro-batch's targets [b, s] on the last pipeline stage
    (None on the other stages)."""
    from megatron.core import parallel_state as mpu

    captured = []

    def capture(batch, logits):
        lp, _ = token_logprobs(batch, logits, temperature, vocab_size)
        captured.append(lp)
        return logits.new_zeros(()), {}

    inputs = model_inputs(micro_batches)
    for inp, mb in zip(inputs, micro_batches):
        inp["targets"] = mb["targets"]
    forward_backward([model], inputs, capture, forward_only=True)
    return captured if mpu.is_pipeline_last_stage() else None


def build_reference_model(policy, model_cfg, parallel_cfg):
    """The reference policy of the KL-to-reference term (algorithm.kl_ref_coef): a frozen copy of
    `policy`'s current weights (call it while they are the initial ones), built in the same TP/PP
    layout so each rank copies its own shard and computes its log-probs with the same
    vocab-parallel op (compute_logprobs). No gradient, in no optimizer, never trained; eval mode,
    so dropout (if any) never perturbs it. Collective: every rank calls it."""
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.models.unwrap import unwrap_model

    reference = build_gpt_model(model_cfg, parallel_cfg)
    reference.load_state_dict(unwrap_model(policy).state_dict())
    reference.requires_grad_(False)
    reference.eval()
    return reference


def _flat_cat(micro_batches: List[Dict], key: str) -> torch.Tensor:
    return torch.cat([mb[key].reshape(-1) for mb in micro_batches])


def _split_like(flat: torch.Tensor, micro_batches: List[Dict]) -> List[torch.Tensor]:
    sizes = [mb["loss_mask"].numel() for mb in micro_batches]
    return [part.view_as(mb["loss_mask"]) for part, mb in zip(flat.split(sizes), micro_batches)]


def train_mini_batch(model, optimizer, micro_batches: List[Dict], cfg: AlgorithmConfig,
                     temperature: float, vocab_size: int, seed: int) -> Dict[str, float]:
    """One optimizer step on one mini-batch (this rank's micro-batches). Needs "old_logprobs" in
    every micro-batch on the last stage, and "ref_logprobs" when cfg.kl_ref_coef > 0. Returns
    metrics (token means over the whole mini-batch across DP ranks) on the last stage, {}
    elsewhere."""
    from megatron.core import parallel_state as mpu

    dp_group = mpu.get_data_parallel_group()
    dp_size = mpu.get_data_parallel_world_size()
    last_stage = mpu.is_pipeline_last_stage()
    counts = torch.tensor([sum(float(mb["loss_mask"].sum()) for mb in micro_batches),
                           sum(float((mb["loss_mask"].sum(-1) > 0).sum()) for mb in micro_batches)],
                          dtype=torch.float64)
    dist.all_reduce(counts, group=dp_group)
    num_tokens, num_sequences = counts.tolist()
    if num_tokens == 0:
        # Every group was filtered (all rewards equal): no gradient, and an Adam step on zero
        # grads would still move the weights through its momentum. Same decision on all ranks.
        return {"num_tokens": 0.0, "update_ok": 0.0} if last_stage else {}

    # Clip-Cov / KL-Cov: one selection for the whole mini-batch over all DP ranks, before the
    # micro-batch loop (the pipeline's last stage is where log-probs exist).
    selected = [None] * len(micro_batches)
    cov_metrics = {}
    current = None
    if cfg.loss_mode in ("clip_cov", "kl_cov") and cfg.cov_policy == "current":
        # Every pipeline stage takes part in the forward; the log-probs exist on the last.
        current_parts = compute_logprobs(model, micro_batches, temperature, vocab_size)
        if last_stage:
            current = torch.cat([lp.reshape(-1) for lp in current_parts])
    if last_stage and not all_finite([current] + [mb[k] for mb in micro_batches
                                                 for k in ("old_logprobs", "advantages")]
                                     + [mb.get("ref_logprobs") for mb in micro_batches],
                                     dp_group):
        # A NaN/inf log-prob or advantage: no selection (it needs finite covariances); the loss
        # turns non-finite too and grads_are_finite skips the update below.
        if cfg.loss_mode in ("clip_cov", "kl_cov"):
            selected = [torch.zeros_like(mb["loss_mask"], dtype=torch.bool)
                        for mb in micro_batches]
    elif last_stage and cfg.loss_mode in ("clip_cov", "kl_cov"):
        old = _flat_cat(micro_batches, "old_logprobs")
        adv = _flat_cat(micro_batches, "advantages")
        mask = _flat_cat(micro_batches, "loss_mask").bool()
        flat_selected = select_tokens(cfg, current, old, adv, mask, seed=seed, group=dp_group)
        selected = _split_like(flat_selected, micro_batches)
        cov_metrics = covariance_metrics(current if current is not None else old, adv, mask,
                                         flat_selected, group=dp_group)
    elif last_stage:
        cov_metrics = covariance_metrics(_flat_cat(micro_batches, "old_logprobs"),
                                         _flat_cat(micro_batches, "advantages"),
                                         _flat_cat(micro_batches, "loss_mask").bool(),
                                         group=dp_group)

    stats = TokenStats()
    # megatron divides each micro-batch loss by their number, and DDP averages over DP ranks;
    # the losses here are already shares of the global mean, so undo both.
    scale = dp_size * len(micro_batches)

    def loss_fn(batch, logits):
        logprobs, entropy = token_logprobs(batch, logits, temperature, vocab_size)
        loss, step_stats = policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"], cfg,
            selected=batch.get("selected"), entropy=entropy,
            ref_logprobs=batch.get("ref_logprobs"),
            rollout_logprobs=batch.get("rollout_logprobs"),
            num_global_tokens=max(num_tokens, 1.0), num_global_sequences=max(num_sequences, 1.0))
        stats.add(step_stats)
        return loss * scale, {}

    inputs = model_inputs(micro_batches)
    for inp, mb, sel in zip(inputs, micro_batches, selected):
        inp.update(targets=mb["targets"], old_logprobs=mb.get("old_logprobs"),
                   advantages=mb["advantages"], loss_mask=mb["loss_mask"])
        if sel is not None:
            inp["selected"] = sel
        if cfg.rollout_is_cap is not None:
            inp["rollout_logprobs"] = mb["rollout_logprobs"]
        if cfg.kl_ref_coef:
            inp["ref_logprobs"] = mb.get("ref_logprobs")
    model.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward([model], inputs, loss_fn)
    if grads_are_finite(model):
        update_ok, grad_norm, _ = optimizer.step()
    else:  # weights and optimizer state stay as they were
        model.zero_grad_buffer()
        optimizer.zero_grad()
        update_ok, grad_norm = False, None
    if not last_stage:
        return {"nonfinite_skipped": float(not update_ok)}
    metrics = stats.reduce(dp_group)
    metrics.update(cov_metrics)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
    metrics["update_ok"] = float(bool(update_ok))
    metrics["nonfinite_skipped"] = float(not update_ok)
    return metrics


def all_finite(tensors, group=None) -> bool:
    """True when every given tensor (None skipped) on every rank of `group` (None: the whole
    job) is finite: one all-reduce, so every rank takes the same decision."""
    local = all(bool(torch.isfinite(x).all()) for x in tensors if x is not None)
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def grads_are_finite(model) -> bool:
    """A NaN/inf loss leaves NaN gradients; checked over the whole job before the optimizer step
    because megatron's fp32 optimizer has no found-inf check of its own."""
    return all_finite([getattr(p, "main_grad", p.grad) for p in model.parameters()])
