"""Rollout samples -> padded training tensors, split into mini-batches and micro-batches.

A sample's sequence is prompt + response; the model reads tokens[:-1] and is scored on
targets = tokens[1:], so position t predicts token t + 1 and the loss mask covers the positions
whose target is a response token. Each micro-batch is padded only to its own longest sequence
(dynamic padding), so a few long responses do not pad the whole batch.
"""
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch

from megatron_rl.rollout.types import Sample


@dataclass
class MicroBatch:
    """The contract between batching, the actor and the loss: one micro-batch of rollout
    sequences, every tensor [b, s] over the positions of tokens[:, :-1]."""
    tokens: torch.Tensor  # model input: prompt + response, without the last token
    targets: torch.Tensor  # tokens shifted by one: what each position predicts
    loss_mask: torch.Tensor  # 1 where the target is a response token of a kept sample
    advantages: torch.Tensor  # the target token's advantage (0 off the mask)
    rollout_logprobs: torch.Tensor  # the engine's log-prob of the target when it sampled it
    # Set by the trainer's old-log-probs phase on the last pipeline stage: the policy that
    # sampled, recomputed by the trainer; and the frozen reference policy's (kl_ref_coef > 0).
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    # Set by train_mini_batch for Clip-Cov / KL-Cov: the tokens selected for this update.
    selected: Optional[torch.Tensor] = None

    def to(self, device) -> "MicroBatch":
        return MicroBatch(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name).to(device) for f in fields(self)})


def sequence_tensors(sample: Sample, response_advantages: torch.Tensor):
    """One sample's rows; response_advantages holds (at least) one value per output token."""
    seq = sample.prompt_ids + sample.output_ids
    n_prompt, n_out = len(sample.prompt_ids), len(sample.output_ids)
    length = len(seq) - 1
    response = slice(n_prompt - 1, n_prompt - 1 + n_out)
    mask = torch.zeros(length)
    mask[response] = 1.0
    rollout_lp = torch.zeros(length)
    rollout_lp[response] = torch.tensor(sample.output_logprobs)
    advantages = torch.zeros(length)
    advantages[response] = response_advantages[:n_out].float()
    return dict(tokens=torch.tensor(seq[:-1]), targets=torch.tensor(seq[1:]), loss_mask=mask,
                advantages=advantages, rollout_logprobs=rollout_lp)


def response_mask(samples: Sequence[Sample]) -> torch.Tensor:
    """[B, longest response] mask of each sample's output tokens (for the advantage estimators)."""
    longest = max(max(len(s.output_ids) for s in samples), 1)
    lengths = torch.tensor([len(s.output_ids) for s in samples])
    return torch.arange(longest)[None, :] < lengths[:, None]


def pad_and_stack(rows: List[Dict[str, torch.Tensor]], pad_id: int = 0) -> MicroBatch:
    length = max(r["tokens"].numel() for r in rows)
    out = {}
    for key in rows[0]:
        fill = pad_id if key in ("tokens", "targets") else 0
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, length - r[key].numel()),
                                                        value=fill) for r in rows])
    return MicroBatch(**out)


def build_mini_batches(samples: Sequence[Sample], advantages: torch.Tensor, keep: torch.Tensor,
                       num_mini_batches: int, micro_batch_size: int,
                       device) -> List[List[MicroBatch]]:
    """[mini-batch][micro-batch] MicroBatches from samples and their response-token advantages
    [B, R] (as from algorithms.compute_advantages on response_mask(samples)). Samples with
    keep=False (e.g. groups whose rewards are all equal) get a zero loss mask: they stay in
    the batch so every rank keeps the same number of micro-batches (collectives line up), but
    add no loss and no token to the normalisers."""
    rows = [sequence_tensors(s, a) for s, a in zip(samples, advantages)]
    for row, k in zip(rows, keep.tolist()):
        if not k:
            row["loss_mask"] = torch.zeros_like(row["loss_mask"])
            row["advantages"] = torch.zeros_like(row["advantages"])
    per_mini = len(rows) // num_mini_batches
    minis = []
    for m in range(num_mini_batches):
        chunk = rows[m * per_mini: (m + 1) * per_mini]
        micro = [pad_and_stack(chunk[i: i + micro_batch_size])
                 for i in range(0, len(chunk), micro_batch_size)]
        minis.append([mb.to(device) for mb in micro])
    return minis
