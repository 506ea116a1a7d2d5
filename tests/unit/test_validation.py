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


# -- evaluation sets ---------------------------------------------------------------------------

class FixedEngine:
    """Answers each prompt with fixed samples: {prompt ids: [(output ids, finish reason), ...]},
    cycled to params.n; records the params and seed of each call."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, params, seed=None):
        self.calls.append((params, seed))
        samples = []
        for i, prompt in enumerate(prompts):
            fixed = self.answers[tuple(prompt)]
            for j in range(params.n):
                ids, finish = fixed[j % len(fixed)]
                samples.append(Sample(prompt_ids=list(prompt), output_ids=list(ids),
                                      finish_reason=finish, prompt_index=i))
        return samples


def first_token(ids):
    return str(ids[0])


# prompt -> 4 samples: (output ids, finish reason); a response is right when its first token is 1
SAMPLES = {
    (5,): [([1, 2], "stop"), ([1, 9, 9], "length"), ([0, 2], "stop"), ([0, 9, 9], "length")],
    (6,): [([0, 2], "stop"), ([0, 2], "stop"), ([0, 9, 9], "length"), ([0, 2], "stop")],
    (7,): [([0, 2], "stop"), ([1, 9, 9], "length"), ([0, 2], "stop"), ([0, 2], "stop")],
}
PROMPTS = [([5], "1"), ([6], "1"), ([7], "1")]


def spec(name="s", temperature=0.6, samples=4, **kwargs):
    from megatron_rl.analysis.validation import EvalSpec

    return EvalSpec(name, temperature, samples, 1.0, 8, "exact", **kwargs)


def test_set_metrics_are_avg_at_k_and_pass_at_k_of_the_samples():
    from megatron_rl.analysis.validation import EvalSet, evaluate_set

    engine = FixedEngine(SAMPLES)
    result = evaluate_set(engine, EvalSet(spec("aime"), PROMPTS, score), first_token,
                          stop_token_ids=(2,), seed=11)
    # rewards: prompt 5 -> 1 1 0 0, prompt 6 -> 0 0 0 0, prompt 7 -> 0 1 0 0
    assert (result.prompts, result.samples, result.reward_sum) == (3, 12, 3.0)
    assert result.accuracy == 3 / 12  # avg@4: the mean reward over all 12 samples
    assert result.pass_at_k == 2 / 3  # prompts 5 and 7 have a right sample
    assert result.response_tokens == (2 + 3 + 2 + 3 + 2 + 2 + 3 + 2 + 2 + 3 + 2 + 2) / 12
    assert result.truncated == 4 / 12  # finish reason "length"
    assert result.metrics() == {"eval/aime/accuracy": 0.25, "eval/aime/pass@4": 2 / 3,
                                "eval/aime/response_tokens": 28 / 12,
                                "eval/aime/truncated": 4 / 12}
    ((params, seed),) = engine.calls
    assert (params.temperature, params.n, params.max_new_tokens, params.top_p,
            tuple(params.stop_token_ids), seed) == (0.6, 4, 8, 1.0, (2,), 11)


def test_greedy_set_with_one_sample_is_greedy_accuracy():
    from megatron_rl.analysis.validation import EvalSet, evaluate_set

    engine = FixedEngine(SAMPLES)
    result = evaluate_set(engine, EvalSet(spec("g", 0.0, 1), PROMPTS, score), first_token,
                          stop_token_ids=(2,), seed=None)
    assert (result.accuracy, result.pass_at_k) == (1 / 3, 1 / 3)  # only prompt 5's first
    assert engine.calls[0][0].temperature == 0.0 and engine.calls[0][0].n == 1


def test_a_passing_sample_has_a_reward_above_zero():
    from megatron_rl.analysis.validation import EvalSet, evaluate_set

    def signed(responses, answers):  # +-1 rewards, and a partial 0.5
        return [{"1": 1.0, "0": -1.0}.get(r, 0.5) for r in responses]

    result = evaluate_set(FixedEngine(SAMPLES), EvalSet(spec(), PROMPTS, signed), first_token,
                          stop_token_ids=(), seed=0)
    assert result.pass_at_k == 2 / 3 and result.accuracy == (3 - 9) / 12


def test_shares_of_unequal_size_sum_to_the_whole_set():
    """What the all-reduce adds up: counts, never per-rank means."""
    from megatron_rl.analysis.validation import EvalSet, evaluate_set

    def run(prompts):
        return evaluate_set(FixedEngine(SAMPLES), EvalSet(spec(), prompts, score), first_token,
                            stop_token_ids=(), seed=0)

    whole, a, b = run(PROMPTS), run(PROMPTS[:1]), run(PROMPTS[1:])
    for field in ("prompts", "samples", "reward_sum", "passed_prompts",
                  "response_tokens_total", "truncated_samples"):
        assert getattr(a, field) + getattr(b, field) == getattr(whole, field)
    assert whole.accuracy == 0.25 != (a.accuracy + b.accuracy) / 2


def test_weighted_mean_and_the_law_metric():
    from megatron_rl.analysis.validation import EvalSet, run_evaluation

    engine = FixedEngine(SAMPLES)
    sets = [EvalSet(spec("a", listed=True, weight=1.0, seed_parts=(1,)), PROMPTS, score),
            EvalSet(spec("b", 0.0, 1, listed=True, weight=3.0, seed_parts=(2,)), PROMPTS, score)]
    results, record = run_evaluation(engine, sets, first_token, stop_token_ids=(), seed=7)
    assert record["eval/mean/accuracy"] == (1 * 0.25 + 3 * (1 / 3)) / 4
    assert record["eval_accuracy"] == record["eval/mean/accuracy"]  # law_metric eval_accuracy
    from megatron_rl.seeds import derive_seed

    assert [seed for _, seed in engine.calls] == [derive_seed(7, 1), derive_seed(7, 2)]
    _, record = run_evaluation(engine, sets, first_token, stop_token_ids=(), seed=7,
                               law_metric="eval/a/pass@4")
    assert record["eval_accuracy"] == 2 / 3 and record["eval/mean/accuracy"] != 2 / 3


@pytest.mark.parametrize("greedy, avg_k", [(True, 0), (True, 4), (False, 4)])
def test_the_held_out_set_logs_what_evaluate_logged(greedy, avg_k):
    """The implicit held-out set: its eval/heldout* keys, and eval_accuracy / eval_avg@k with
    the values and generate calls (params, seed, order) of the evaluation before sets."""
    from megatron_rl.analysis.validation import EvalSet, heldout_specs, run_evaluation

    class SeedsToo(ScriptedEngine):
        def generate(self, prompts, params, seed=None):
            self.calls.append(seed)
            return super().generate(prompts, params, seed)

    before, after = SeedsToo(), SeedsToo()
    old = evaluate(before, PROMPTS, decode=lambda ids: str(ids[0]), score=score,
                   max_new_tokens=4, stop_token_ids=(2,), avg_k=avg_k, temperature=0.6,
                   greedy=greedy, seed=123)
    specs = heldout_specs(4, "exact", greedy=greedy, avg_k=avg_k, temperature=0.6)
    _, record = run_evaluation(after, [EvalSet(s, PROMPTS, score) for s in specs],
                               lambda ids: str(ids[0]), stop_token_ids=(2,), seed=123)
    assert {k: record[k] for k in old} == old
    assert record["eval/heldout/accuracy"] == old["eval_accuracy"]
    if greedy and avg_k:
        assert record["eval/heldout_sampled/accuracy"] == old["eval_avg@4"]
    assert before.calls == after.calls
