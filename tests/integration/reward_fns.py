"""Reward functions for the integration tests (reward workers import them by module path)."""


def answer_word(response: str, answer: str) -> float:
    """1.0 when the answer is one of the response's words: an untrained model's responses score
    now and then, so accuracies and pass@k of its evaluations are not all 0."""
    return float(answer in response.split())
