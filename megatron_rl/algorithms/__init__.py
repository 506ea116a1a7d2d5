"""RL algorithm layer: advantages, PPO-family policy losses, Clip-Cov / KL-Cov token selection
over the whole optimizer mini-batch across data-parallel ranks, and step metrics.

Pure functions over token tensors; nothing here depends on the model or its parallel layout
except `group`, the data-parallel process group the selection reduces over. docs/algorithms.md
has the formulas, config keys and the exactness argument.
"""
from megatron_rl.algorithms.advantages import (
    compute_advantages,
    gae_advantages,
    grpo_advantages,
    informative_groups,
    keep_groups,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)
from megatron_rl.algorithms.config import ALIASES, AlgorithmConfig
from megatron_rl.algorithms.losses import aggregate, policy_loss, ppo_clip_active, reference_kl
from megatron_rl.algorithms.metrics import TokenStats, covariance_metrics, rollout_metrics
from megatron_rl.algorithms.selection import (
    clip_cov_select,
    kl_cov_select,
    select_tokens,
    token_covariance,
)

__all__ = [
    "ALIASES", "AlgorithmConfig", "TokenStats", "aggregate", "clip_cov_select",
    "compute_advantages", "covariance_metrics", "gae_advantages", "grpo_advantages",
    "informative_groups", "keep_groups", "kl_cov_select", "masked_whiten", "policy_loss",
    "ppo_clip_active", "reference_kl", "reinforce_pp_advantages", "rloo_advantages",
    "rollout_metrics", "select_tokens", "token_covariance",
]
