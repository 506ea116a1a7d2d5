"""Rewards of the built-in synthetic tasks."""
from typing import Sequence


def exact_answer_reward(response: str, answer: str) -> float:
    """1.0 when the response (up to <eos>, already decoded) is exactly the answer, else 0.0."""
    return 1.0 if response.strip() == answer else 0.0


def score(responses: Sequence[str], answers: Sequence[str]):
    return [exact_answer_reward(r, a) for r, a in zip(responses, answers)]
