"""Entropy-dynamics probe: the entropy change an optimizer step actually caused, per token, next to
the first-order prediction of arXiv 2505.22617,

    H(pi_after | s) - H(pi_before | s)  ~=  -Cov_{a ~ pi_before}( log pi_before(a|s), dz(a) ),
    dz = (z_after - z_before) / temperature,

with the covariance over the whole vocabulary weighted by pi_before (docs/analysis.md derives it).
Both sides come from the logits shards of a fixed probe batch before and after the step; the
vocabulary is never gathered: entropies and covariances come from megatron_rl.ops, whose
tensor-parallel all-reduces exchange O(tokens) numbers.
"""
import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rl.ops import vocab_parallel_covariance, vocab_parallel_logprobs_entropy


@dataclass
class EntropyProbe:
    """Per-token results over the probe's masked tokens (flattened, this data-parallel rank's
    tokens) and the metrics over all of them (all data-parallel ranks)."""
    actual: torch.Tensor          # H_after - H_before
    predicted: torch.Tensor       # -Cov(log pi_before, dz)
    entropy_before: torch.Tensor
    metrics: Dict[str, float]


def _agreement_metrics(actual: torch.Tensor, predicted: torch.Tensor, entropy_before: torch.Tensor,
                       dp_group) -> Dict[str, float]:
    """Correlation and least-squares fit actual ~ slope * predicted + intercept from summed moments,
    so data-parallel ranks holding different probe tokens agree after one all-reduce."""
    a, p, h = actual.double(), predicted.double(), entropy_before.double()
    moments = torch.stack([torch.tensor(float(a.numel()), dtype=torch.float64), p.sum(), a.sum(),
                           (p * p).sum(), (a * a).sum(), (p * a).sum(), h.sum()])
    if dp_group is not None:
        dist.all_reduce(moments, group=dp_group)
    n, sum_p, sum_a, sum_pp, sum_aa, sum_pa, sum_h = moments.tolist()
    if n == 0:
        return {"probe/num_tokens": 0.0}
    mean_p, mean_a = sum_p / n, sum_a / n
    var_p = max(sum_pp / n - mean_p ** 2, 0.0)
    var_a = max(sum_aa / n - mean_a ** 2, 0.0)
    cov_pa = sum_pa / n - mean_p * mean_a
    slope = cov_pa / var_p if var_p > 0 else float("nan")
    denom = (var_p * var_a) ** 0.5
    return {
        "probe/num_tokens": n,
        "probe/entropy_before": sum_h / n,
        "probe/entropy_after": (sum_h + sum_a) / n,
        "probe/actual_change_mean": mean_a,
        "probe/predicted_change_mean": mean_p,
        "probe/correlation": cov_pa / denom if denom > 0 else float("nan"),
        "probe/slope": slope,
        "probe/intercept": mean_a - slope * mean_p if var_p > 0 else float("nan"),
        # how far the first-order term is from the truth, relative to the size of the changes
        "probe/relative_error": ((sum_aa - 2 * sum_pa + sum_pp) / sum_aa) ** 0.5 if sum_aa > 0
        else float("nan"),
    }


@torch.no_grad()
def probe_entropy_dynamics(logits_before: torch.Tensor, logits_after: torch.Tensor,
                           temperature: float = 1.0, group=None, *,
                           vocab_size: Optional[int] = None, mask: Optional[torch.Tensor] = None,
                           dp_group=None) -> EntropyProbe:
    """Actual vs first-order predicted entropy change of every token of a probe batch.

    logits_before / logits_after: this rank's vocabulary shard [..., V_local] of the same probe
    batch, before and after one optimizer step. group: the tensor-parallel group the vocabulary
    is split over (None: whole vocabulary here); vocab_size: real vocabulary columns (padding
    excluded). mask [...]: tokens to report (e.g. response tokens); None: all. dp_group: reduce the
    metrics over data-parallel ranks that hold different probe tokens (None: this rank's only).
    Every rank of `group` must call it (the ops all-reduce across it).
    """
    if logits_before.shape != logits_after.shape:
        raise ValueError(f"logits_before {tuple(logits_before.shape)} vs logits_after "
                         f"{tuple(logits_after.shape)}")
    # The entropy is all that is read; any in-vocabulary id serves as the op's target.
    any_target = torch.zeros(logits_before.shape[:-1], dtype=torch.long,
                             device=logits_before.device)
    _, entropy_before = vocab_parallel_logprobs_entropy(logits_before, any_target, temperature,
                                                        group, vocab_size=vocab_size)
    _, entropy_after = vocab_parallel_logprobs_entropy(logits_after, any_target, temperature, group,
                                                       vocab_size=vocab_size)
    # Subtract in at least float32: bf16 logits that barely move would otherwise round to zero.
    delta_dtype = torch.promote_types(logits_before.dtype, torch.float32)
    delta = logits_after.to(delta_dtype) - logits_before.to(delta_dtype)
    covariance, _ = vocab_parallel_covariance(logits_before, delta, temperature, group,
                                              vocab_size=vocab_size)
    # pi = softmax(z / T), so the logits the softmax sees move by delta / T.
    predicted = -covariance / temperature
    actual = entropy_after - entropy_before
    if mask is None:
        mask = torch.ones_like(actual, dtype=torch.bool)
    mask = mask.to(device=actual.device).bool()
    actual, predicted, entropy_before = actual[mask], predicted[mask], entropy_before[mask]
    return EntropyProbe(actual=actual, predicted=predicted, entropy_before=entropy_before,
                        metrics=_agreement_metrics(actual, predicted, entropy_before, dp_group))


def probe_batch_logits(model, micro_batches: List) -> Optional[torch.Tensor]:
    """This rank's logits shard [B, s, V_local] of a fixed probe batch (micro-batches with
    `tokens` [b, s] of one sequence length), concatenated over micro-batches; a forward-only pass
    in eval mode. None on pipeline stages other than the last."""
    from megatron_rl.training.step import forward_only

    captured = forward_only(model, micro_batches, lambda batch, logits: logits.detach().clone())
    return None if captured is None else torch.cat(captured)


PROBE_DIR = "probe"


def probe_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, PROBE_DIR, f"step_{step:06d}.pt")


def save_probe(run_dir: str, step: int, probe: EntropyProbe) -> str:
    """Writes RUN_DIR/probe/step_NNNNNN.pt: {"step", "actual", "predicted", "entropy_before"
    (float32 CPU tensors [tokens]), "metrics"}; what tools/plot_runs.py reads. Returns the path."""
    path = probe_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"step": step,
                "actual": probe.actual.float().cpu(),
                "predicted": probe.predicted.float().cpu(),
                "entropy_before": probe.entropy_before.float().cpu(),
                "metrics": dict(probe.metrics)}, path)
    return path


def load_probes(run_dir: str) -> List[Dict]:
    """Every saved probe of a run, in step order."""
    paths = glob.glob(os.path.join(run_dir, PROBE_DIR, "step_*.pt"))
    paths.sort(key=lambda p: int(re.search(r"step_(\d+)\.pt$", p).group(1)))
    return [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
