"""One pass of a model over a list of micro-batches through megatron-core's schedules (no
pipelining, or 1F1B when PP > 1): with gradients and an optimizer step (`train_step`,
`optimizer_step`), or forward-only in eval mode (`forward_only`).

A micro-batch is any object with a `tokens` [b, s] attribute; with a `labels` attribute the
model returns megatron's per-token cross-entropy, otherwise logits (the RL path's MicroBatch), or
with an `output_processor` whatever that makes of the last hidden states (megatron GPTModel's
hook, called on the last pipeline stage with output_processor_context=the micro-batch).
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass
class SupervisedBatch:
    """A micro-batch of next-token prediction: tokens [b, s], labels [b, s], loss_mask [b, s]."""
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None


def causal_position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_backward(model_chunks: Sequence[torch.nn.Module], micro_batches: List,
                     loss_fn: Callable, forward_only: bool = False,
                     output_processor: Optional[Callable] = None):
    """Run megatron's forward-backward function over `micro_batches`.

    `loss_fn(batch, output)` runs on the last pipeline stage on the model's output (per-token
    loss when the batch has labels, `output_processor`'s result when given, logits otherwise)
    and returns (loss, metrics dict); megatron divides the loss by the number of micro-batches.
    Returns the list of metrics dicts (last stage; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = micro_batches[0].tokens

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        hook = {} if output_processor is None else dict(output_processor=output_processor,
                                                        output_processor_context=batch)
        output = model(batch.tokens, causal_position_ids(batch.tokens), None,
                       labels=getattr(batch, "labels", None), **hook)
        return output, partial(loss_fn, batch)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(model_chunks),
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_only(model, micro_batches: List, on_logits: Callable,
                 output_processor: Optional[Callable] = None) -> Optional[List]:
    """[on_logits(batch, logits) for each micro-batch] on the last pipeline stage (None on the
    others): a forward pass without gradient through megatron's schedule, in eval mode (with
    dropout on, two passes over the same batch would differ by their dropout masks). `logits`
    is this rank's vocabulary shard [b, s, V_local] (or `output_processor`'s result, see
    forward_backward); the schedule may reuse its buffer after on_logits returns, so keep a
    clone, not the tensor."""
    from megatron.core import parallel_state as mpu

    results = []

    def capture(batch, output):
        results.append(on_logits(batch, output))
        like = output[0] if isinstance(output, (tuple, list)) else output
        return like.new_zeros(()), {}

    was_training = model.training
    model.eval()
    try:
        forward_backward([model], micro_batches, capture, forward_only=True,
                         output_processor=output_processor)
    finally:
        model.train(was_training)
    return results if mpu.is_pipeline_last_stage() else None


def all_finite(tensors, group=None) -> bool:
    """True when every given tensor (None skipped) on every rank of `group` (None: the whole
    job) is finite: one all-reduce, so every rank takes the same decision."""
    local = all(bool(torch.isfinite(x).all()) for x in tensors if x is not None)
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def optimizer_step(model_chunks, optimizer) -> Tuple[bool, Optional[float]]:
    """The optimizer step after a backward pass, skipped when any gradient on any rank is NaN/inf
    (a NaN loss leaves NaN gradients, and megatron's fp32 optimizer has no found-inf check of its
    own): then the gradients are zeroed and weights and optimizer state stay as they were.
    Returns (update_ok, grad_norm); grad_norm is None when skipped."""
    grads = [getattr(p, "main_grad", p.grad) for chunk in model_chunks for p in chunk.parameters()]
    if not all_finite(grads):
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return False, None
    update_ok, grad_norm, _ = optimizer.step()
    return bool(update_ok), grad_norm


def token_mean_loss(batch, per_token_loss: torch.Tensor):
    """Mean per-token cross-entropy over the batch's `loss_mask` (all tokens when None)."""
    mask = batch.loss_mask
    if mask is None:
        mask = torch.ones_like(per_token_loss)
    mask = mask.to(per_token_loss.dtype)
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    # clone: megatron divides the returned loss in place by the number of micro-batches.
    return loss, {"lm_loss": loss.detach().clone()}


def train_step(model_chunks, optimizer, micro_batches: List, loss_fn: Callable = token_mean_loss):
    """Zero grads, forward/backward all micro-batches, optimizer step (skipped on non-finite
    gradients). Returns (metrics of the last stage's micro-batches, update_ok, grad_norm)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model_chunks, micro_batches, loss_fn)
    update_ok, grad_norm = optimizer_step(model_chunks, optimizer)
    return metrics, update_ok, grad_norm
