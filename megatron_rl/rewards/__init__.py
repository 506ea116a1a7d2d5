"""Reward functions: verifiers that score a response against the ground-truth answer."""
from megatron_rl.rewards.synthetic import exact_answer_reward

__all__ = ["exact_answer_reward"]
