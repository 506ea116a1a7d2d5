"""Validation on held-out prompts: greedy accuracy and sampled avg@k (the mean over k samples per
prompt, the paper's avg@32 at temperature 0.6), averaged over all data-parallel ranks' prompts.
They are the R of the entropy law and the accuracy the plots show."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_rl.rollout import SamplingParams


def evaluate(engine, prompts: Sequence[Tuple[List[int], str]], decode: Callable[[List[int]], str],
             score: Callable[[List[str], List[str]], List[float]], *, max_new_tokens: int,
             stop_token_ids: Sequence[int] = (), avg_k: int = 0, temperature: float = 0.6,
             top_p: float = 1.0, seed: Optional[int] = None, dp_group=None,
             greedy: bool = True) -> Dict[str, float]:
    """{"eval_accuracy": greedy accuracy[, f"eval_avg@{avg_k}": sampled accuracy]} over the
    (prompt ids, answer) pairs of this data-parallel rank, reduced over `dp_group` as sums and
    counts, so ranks with unequal shares still give the mean over all prompts. Every rank of the
    engine's model-parallel group calls it with the same prompts.

    greedy=False: no greedy pass; "eval_accuracy" is then the avg@k itself (for tasks where the
    greedy answer hides what the policy does, e.g. a policy that is right at its mode but slips
    when it samples)."""
    if not greedy and avg_k < 1:
        raise ValueError("greedy=False needs avg_k >= 1 samples per prompt")
    sampled = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             stop_token_ids=tuple(stop_token_ids), n=avg_k) if avg_k else None
    if greedy:
        runs = [("eval_accuracy", SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                 stop_token_ids=tuple(stop_token_ids)))]
        if sampled is not None:
            runs.append((f"eval_avg@{avg_k}", sampled))
    else:
        runs = [("eval_accuracy", sampled)]
    sums = torch.zeros(2 * len(runs), dtype=torch.float64)
    for index, (_, params) in enumerate(runs):
        # Called with no prompts too: the SGLang rollout's generate is collective over ranks.
        samples = engine.generate([p for p, _ in prompts], params, seed=seed)
        if samples:
            rewards = score([decode(s.output_ids) for s in samples],
                            [prompts[s.prompt_index][1] for s in samples])
            sums[2 * index], sums[2 * index + 1] = float(sum(rewards)), float(len(rewards))
    if dp_group is not None:
        dist.all_reduce(sums, group=dp_group)
    return {name: (sums[2 * i] / sums[2 * i + 1].clamp(min=1)).item()
            for i, (name, _) in enumerate(runs)}
