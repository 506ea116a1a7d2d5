"""The policy's two jobs on a rollout batch: log-probs without gradient (old / current policy,
and the frozen reference policy of the KL term) and the PPO-family update, through megatron's
schedules on any TP/PP/DP layout.

Log-probs and entropies come from the vocab-parallel op (megatron_rl.ops) on the output layer's
logits shard (OutputLayerLogprobs, the model's output_processor), so [tokens, vocab]
probabilities are never gathered, and the update's backward writes the logits' gradient over the
logits; with `chunked` (the trainer's training.logprob_chunking) output_layer_logprobs_entropy
applies the output layer one logits block at a time (HiddenStateLogprobs), so the
[tokens, vocab / TP] logits never exist either. Losses are normalised by the
mini-batch's global token / sequence counts and scaled back for megatron's averaging, so the
update is the same whatever the micro-batch size and DP size (docs/algorithms.md).
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rl.algorithms import TokenStats, covariance_metrics, policy_loss, select_tokens
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.ops import output_layer_logprobs_entropy, vocab_parallel_logprobs_entropy
from megatron_rl.training.rl_batch import MicroBatch
from megatron_rl.training.step import all_finite, forward_backward, forward_only, optimizer_step


class OutputLayerLogprobs:
    """megatron GPTModel's `output_processor` hook: on the last pipeline stage the model returns
    (log-probs, entropies) [b, s] of the micro-batch's targets (its output_processor_context),
    from the output layer's [s, b, V/TP] logits shard by the vocab-parallel op. Unlike the
    model's own logits output this skips megatron's [s, b] -> [b, s] transposed copy of the
    logits, and with it the copy its output layer's backward makes of the transposed gradient.

    inplace_backward: the logits' gradient overwrites the logits (the update's case: nothing but
    the op reads them, and the output layer's backward needs only their gradient)."""

    def __init__(self, temperature: float, vocab_size: int, inplace_backward: bool = False):
        self.temperature, self.vocab_size = temperature, vocab_size
        self.inplace_backward = inplace_backward

    def __call__(self, *, hidden_states, output_layer, output_weight, context, scale_logits, **_):
        from megatron.core import parallel_state as mpu

        logits, _ = output_layer(hidden_states, weight=output_weight)
        logprobs, entropy = vocab_parallel_logprobs_entropy(
            scale_logits(logits), context.targets.t(), self.temperature,
            group=mpu.get_tensor_model_parallel_group(), vocab_size=self.vocab_size,
            inplace_backward=self.inplace_backward)
        return logprobs.t().contiguous(), entropy.t().contiguous()


class HiddenStateLogprobs:
    """megatron GPTModel's `output_processor` hook: on the last pipeline stage the model returns
    (log-probs, entropies) [b, s] of the micro-batch's targets (its output_processor_context)
    computed from the final hidden states and the output layer's weight shard by
    output_layer_logprobs_entropy, instead of [b, s, V/TP] logits."""

    def __init__(self, temperature: float, vocab_size: int, **chunks):
        self.temperature, self.vocab_size, self.chunks = temperature, vocab_size, chunks

    def __call__(self, *, hidden_states, output_layer, output_weight, context, config, **_):
        from megatron.core import parallel_state as mpu

        if getattr(config, "use_mup", False):
            raise NotImplementedError("chunked log-probs do not apply MuP's logit scaling")
        weight = output_layer.weight if output_weight is None else output_weight
        group = mpu.get_tensor_model_parallel_group()
        reduce_grad_hidden = True
        if output_layer.sequence_parallel:
            # What the output layer does with sequence-parallel input: gather the sequence
            # shards; the gather's backward reduce-scatters the hidden-state gradient.
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, True, group)
            reduce_grad_hidden = False
        # megatron's hidden states are [s, b, h]: the targets follow, the results go back
        logprobs, entropy = output_layer_logprobs_entropy(
            hidden_states, weight, context.targets.t(), self.temperature, group,
            vocab_size=self.vocab_size, all_reduce_grad_hidden=reduce_grad_hidden,
            **self.chunks)
        return logprobs.t().contiguous(), entropy.t().contiguous()


def _output_processor(temperature: float, vocab_size: int, chunked: bool,
                      inplace_backward: bool = False):
    """The model's output_processor: (log-probs, entropies) [b, s] from the logits shard, or
    (chunked) from the hidden states in blocks."""
    if chunked:
        return HiddenStateLogprobs(temperature, vocab_size)
    return OutputLayerLogprobs(temperature, vocab_size, inplace_backward)


def compute_logprobs(model, micro_batches: List[MicroBatch], temperature: float,
                     vocab_size: int, *, chunked: bool = False) -> Optional[List[torch.Tensor]]:
    """Per-token log-probs of each micro-batch's targets [b, s] on the last pipeline stage
    (None on the other stages). chunked: from the hidden states in blocks (HiddenStateLogprobs),
    never materialising the logits."""
    return forward_only(model, micro_batches, lambda batch, output: output[0],
                        output_processor=_output_processor(temperature, vocab_size, chunked))


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


def _flat_cat(micro_batches: List[MicroBatch], key: str) -> torch.Tensor:
    return torch.cat([getattr(mb, key).reshape(-1) for mb in micro_batches])


def _split_like(flat: torch.Tensor, micro_batches: List[MicroBatch]) -> List[torch.Tensor]:
    sizes = [mb.loss_mask.numel() for mb in micro_batches]
    return [part.view_as(mb.loss_mask) for part, mb in zip(flat.split(sizes), micro_batches)]


def train_mini_batch(model, optimizer, micro_batches: List[MicroBatch], cfg: AlgorithmConfig,
                     temperature: float, vocab_size: int, seed: int, *,
                     old_is_current: bool = False, chunked: bool = False) -> Dict[str, float]:
    """One optimizer step on one mini-batch (this rank's micro-batches). Needs old_logprobs in
    every micro-batch on the last stage, and ref_logprobs when cfg.kl_ref_coef > 0. Returns
    metrics (token means over the whole mini-batch across DP ranks) on the last stage, {}
    elsewhere.

    old_is_current: the weights are still the ones that computed these old_logprobs (no
    optimizer step since; the trainer passes it for the first optimizer step of a step's first
    PPO epoch). Clip-Cov / KL-Cov with cov_policy "current" then take the current policy's
    log-probs from old_logprobs instead of running their no-grad forward, which would recompute
    them bit for bit (the same forward on the same weights and batch). Same value on every
    rank. chunked: log-probs and entropies from the hidden states in blocks, as compute_logprobs
    (the same value as the old log-probs' forward, or the shortcut is no longer bitwise)."""
    from megatron.core import parallel_state as mpu

    dp_group = mpu.get_data_parallel_group()
    dp_size = mpu.get_data_parallel_world_size()
    last_stage = mpu.is_pipeline_last_stage()
    counts = torch.tensor([sum(float(mb.loss_mask.sum()) for mb in micro_batches),
                           sum(float((mb.loss_mask.sum(-1) > 0).sum()) for mb in micro_batches)],
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
        if old_is_current:  # the current policy is the one that computed old_logprobs
            current = _flat_cat(micro_batches, "old_logprobs") if last_stage else None
        else:
            # Every pipeline stage takes part in the forward; the log-probs exist on the last.
            current_parts = compute_logprobs(model, micro_batches, temperature, vocab_size,
                                             chunked=chunked)
            if last_stage:
                current = torch.cat([lp.reshape(-1) for lp in current_parts])
    if last_stage and not all_finite([current] + [t for mb in micro_batches for t in (
            mb.old_logprobs, mb.advantages, mb.ref_logprobs)], dp_group):
        # A NaN/inf log-prob or advantage: no selection (it needs finite covariances); the loss
        # turns non-finite too and optimizer_step skips the update below.
        if cfg.loss_mode in ("clip_cov", "kl_cov"):
            selected = [torch.zeros_like(mb.loss_mask, dtype=torch.bool)
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

    def loss_fn(batch, output):
        logprobs, entropy = output
        loss, step_stats = policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, batch.loss_mask, cfg,
            selected=batch.selected, entropy=entropy, ref_logprobs=batch.ref_logprobs,
            rollout_logprobs=batch.rollout_logprobs,
            num_global_tokens=max(num_tokens, 1.0), num_global_sequences=max(num_sequences, 1.0))
        stats.add(step_stats)
        return loss * scale, {}

    for mb, sel in zip(micro_batches, selected):
        mb.selected = sel
    model.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward([model], micro_batches, loss_fn,
                     output_processor=_output_processor(temperature, vocab_size, chunked,
                                                        inplace_backward=True))
    update_ok, grad_norm = optimizer_step([model], optimizer)
    if not last_stage:
        return {"nonfinite_skipped": float(not update_ok)}
    metrics = stats.reduce(dp_group)
    metrics.update(cov_metrics)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
    metrics["update_ok"] = float(bool(update_ok))
    metrics["nonfinite_skipped"] = float(not update_ok)
    return metrics

