"""One forward/backward over a list of micro-batches, through megatron-core's schedules
(no pipelining, or 1F1B when PP > 1), and the optimizer step around it."""
from functools import partial
from typing import Callable, Dict, List, Sequence

import torch


def causal_position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_backward(model_chunks: Sequence[torch.nn.Module], micro_batches: List[Dict],
                     loss_fn: Callable, forward_only: bool = False):
    """Run megatron's forward-backward function over `micro_batches`.

    Each micro-batch is a dict with at least "tokens" [b, s]. `loss_fn(batch, output)` runs on the
    last pipeline stage on the model's output (per-token loss when the batch has "labels",
    logits otherwise) and returns (loss, metrics dict); megatron divides it by the number of
    micro-batches. Returns the list of metrics dicts (last stage; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = micro_batches[0]["tokens"]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch.get("position_ids", causal_position_ids(batch["tokens"])),
                       batch.get("attention_mask"), labels=batch.get("labels"))
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


def token_mean_loss(batch: Dict, per_token_loss: torch.Tensor):
    """Mean per-token cross-entropy over the batch's `loss_mask` (all tokens when absent)."""
    mask = batch.get("loss_mask")
    if mask is None:
        mask = torch.ones_like(per_token_loss)
    mask = mask.to(per_token_loss.dtype)
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    # clone: megatron divides the returned loss in place by the number of micro-batches.
    return loss, {"lm_loss": loss.detach().clone()}


def train_step(model_chunks, optimizer, micro_batches: List[Dict], loss_fn: Callable = token_mean_loss):
    """Zero grads, forward/backward all micro-batches, optimizer step.

    Returns (metrics of the last stage's micro-batches, update_successful, grad_norm)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model_chunks, micro_batches, loss_fn)
    update_successful, grad_norm, _ = optimizer.step()
    return metrics, update_successful, grad_norm
