"""Greedy accuracy and sampled avg@k from a scripted engine: the numbers and the sampling
parameters each evaluation asks for."""
import pytest

from megatron_rl.analysis.validation import evaluate
from megatron_rl.rollout.types import Sample


class ScriptedEngine:
    """Greedy answers prompt i with token i; sampled answers are right for the first i+1 of k."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seed=None):
        self.calls.append(params)
        samples = []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                right = j <= i if params.temperature > 0 else i % 2 == 0
                samples.append(Sample(prompt_ids=list(prompt), output_ids=[1 if right else 0],
                                      prompt_index=i))
        return samples


def score(responses, answers):
    return [float(r == a) for r, a in zip(responses, answers)]


def test_greedy_and_avg_at_k():
    engine = ScriptedEngine()
    prompts = [([5, 6], "1"), ([7], "1"), ([8, 9], "1")]
    metrics = evaluate(engine, prompts, decode=lambda ids: str(ids[0]), score=score,
                       max_new_tokens=4, stop_token_ids=(2,), avg_k=4, temperature=0.6)
    assert metrics["eval_accuracy"] == 2 / 3  # prompts 0 and 2
    assert metrics["eval_avg@4"] == (1 + 2 + 3) / 12
    greedy, sampled = engine.calls
    assert (greedy.temperature, greedy.n, greedy.max_new_tokens,
            tuple(greedy.stop_token_ids)) == (0.0, 1, 4, (2,))
    assert (sampled.temperature, sampled.n) == (0.6, 4)
    assert evaluate(ScriptedEngine(), prompts, decode=lambda ids: str(ids[0]), score=score,
                    max_new_tokens=4) == {"eval_accuracy": 2 / 3}


def test_sampled_accuracy_as_eval_accuracy_without_greedy_pass():
    engine = ScriptedEngine()
    prompts = [([5, 6], "1"), ([7], "1"), ([8, 9], "1")]
    metrics = evaluate(engine, prompts, decode=lambda ids: str(ids[0]), score=score,
                       max_new_tokens=4, avg_k=4, temperature=1.0, greedy=False)
    assert metrics == {"eval_accuracy": (1 + 2 + 3) / 12}
    (sampled,) = engine.calls
    assert (sampled.temperature, sampled.n) == (1.0, 4)
    with pytest.raises(ValueError, match="avg_k"):
        evaluate(engine, prompts, decode=lambda ids: str(ids[0]), score=score,
                 max_new_tokens=4, greedy=False)
