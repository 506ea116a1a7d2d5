"""Validation on held-out prompts, one evaluation set at a time: accuracy (the mean reward over
all samples: greedy accuracy with one greedy sample, the paper's avg@32 at temperature 0.6 with 32
samples), pass@k, response length and truncation, each summed over all data-parallel ranks'
prompts. The trainer (every training.eval_interval steps) and `python -m megatron_rl.evaluate`
(a checkpoint or an HF folder) both call `run_evaluation`; the sets come from the config through
`eval_specs`, which also says which metric keys a config logs (`eval_metric_keys`, checked
against training.law_metric at load). docs/data_and_rewards.md and docs/analysis.md have the
definitions."""
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_rl.rollout import SamplingParams
from megatron_rl.seeds import derive_seed

Prompt = Tuple[List[int], str]  # (prompt token ids, ground-truth answer)
Score = Callable[[List[str], List[str]], List[float]]  # (responses, answers) -> rewards
MEAN_KEY = "eval/mean/accuracy"
LAW_KEY = "eval_accuracy"  # what the entropy law and the plots read; holds the law metric's value
EVAL_SEED_TAG = 7  # derive_seed's tag of evaluation's draws (rollouts' have none)
# A sample passes when its reward is above this: 1 for the 0/1 verifiers (exact, math), +1 for
# +-1 rewards, and a penalised wrong answer (< 0) does not pass.
PASS_ABOVE = 0.0


@dataclass(frozen=True)
class EvalSpec:
    """What the config says about one evaluation set, before any data is read."""
    name: str
    temperature: float  # 0: greedy
    samples: int  # k
    top_p: float
    max_new_tokens: int
    reward: str  # reward.fn spec
    weight: float = 1.0
    listed: bool = False  # a data.eval_sets entry (counted in eval/mean/accuracy)
    alias: Optional[str] = None  # the key its accuracy was logged under before sets existed
    # folded into the sampling seed after (rollout.seed, step, DP rank, 7): () for the held-out
    # set, whose draws are the ones the trainer made before sets existed
    seed_parts: Tuple[int, ...] = ()

    def keys(self) -> List[str]:
        keys = [f"eval/{self.name}/{what}" for what in
                ("accuracy", f"pass@{self.samples}", "response_tokens", "truncated")]
        return keys + ([self.alias] if self.alias else [])


def eval_seed(rollout_seed: int, step: int, dp_rank: int) -> int:
    """The sampling seed of an evaluation at `step` on a data-parallel rank (the trainer's and the
    evaluator's alike, so a checkpoint scores what its run logged at that step)."""
    return derive_seed(rollout_seed, step, dp_rank, EVAL_SEED_TAG)


def eval_specs(cfg) -> List[EvalSpec]:
    """The evaluation sets of JobConfig `cfg`, in the order they are evaluated: the entries of
    data.eval_sets; without them the held-out set (the built-in task's held-out problems, the
    dataset task's draw of data.eval_prompts) as `heldout`, greedy when training.eval_greedy
    (logged also as eval_accuracy), and avg@training.eval_avg_k at training.eval_temperature
    when eval_avg_k > 0: as `heldout_sampled` (also eval_avg@k) beside the greedy one, or as
    `heldout` itself (also eval_accuracy) when eval_greedy is false."""
    d, t, rc, fn = cfg.data, cfg.training, cfg.rollout, cfg.reward.fn
    if d.eval_sets:
        return [EvalSpec(s.name, s.temperature, s.samples, s.top_p,
                         s.max_new_tokens or rc.max_new_tokens, s.reward or fn, s.weight,
                         listed=True, seed_parts=(zlib.crc32(s.name.encode()),))
                for s in d.eval_sets]
    return heldout_specs(rc.max_new_tokens, fn, greedy=t.eval_greedy, avg_k=t.eval_avg_k,
                         temperature=t.eval_temperature)


def heldout_specs(max_new_tokens: int, reward: str, *, greedy: bool, avg_k: int,
                  temperature: float, top_p: float = 1.0) -> List[EvalSpec]:
    """The held-out set's evaluations (eval_specs without data.eval_sets)."""
    specs = []
    if greedy:
        specs.append(EvalSpec("heldout", 0.0, 1, 1.0, max_new_tokens, reward, alias=LAW_KEY))
    if avg_k:
        specs.append(EvalSpec("heldout_sampled" if greedy else "heldout", temperature, avg_k,
                              top_p, max_new_tokens, reward,
                              alias=f"eval_avg@{avg_k}" if greedy else LAW_KEY))
    return specs


def eval_metric_keys(cfg) -> List[str]:
    """Every key an evaluation of `cfg` logs (what training.law_metric may name)."""
    specs = eval_specs(cfg)
    keys = [key for spec in specs for key in spec.keys()]
    if any(spec.listed for spec in specs):
        keys.append(MEAN_KEY)
    return list(dict.fromkeys(keys + [LAW_KEY]))


def law_source(specs: Sequence[EvalSpec], law_metric: str) -> str:
    """The key whose value eval_accuracy takes: training.law_metric, where "eval_accuracy" means
    the held-out set's accuracy, or eval/mean/accuracy with data.eval_sets."""
    if law_metric == LAW_KEY and any(spec.listed for spec in specs):
        return MEAN_KEY
    return law_metric


@dataclass
class EvalSet:
    """One set as a rank evaluates it: the spec, this data-parallel rank's prompts, its scorer."""
    spec: EvalSpec
    prompts: Sequence[Prompt]
    score: Score


def build_eval_sets(cfg, task, score_for: Callable[[str], Score], dp_rank: int,
                    dp_size: int) -> List[EvalSet]:
    """The sets of eval_specs(cfg), each with this data-parallel rank's share of its prompts
    (every dp_size-th from dp_rank: the task's held-out prompts, or the loaded data.eval_sets
    file) and the scorer `score_for` gives for its reward spec."""
    files = {loaded.name: loaded.prompts for loaded in task.eval_sets}
    return [EvalSet(spec, list(files[spec.name] if spec.listed else task.eval_prompts)
                    [dp_rank::dp_size], score_for(spec.reward))
            for spec in eval_specs(cfg)]


# the per-set sums, in this order, all-reduced over data-parallel ranks
_COUNTS = ("prompts", "samples", "reward_sum", "passed_prompts", "response_tokens_total",
           "truncated_samples")


@dataclass
class SetResult:
    """One set's evaluation, summed over every data-parallel rank."""
    spec: EvalSpec
    prompts: int
    samples: int  # prompts x k
    reward_sum: float
    passed_prompts: int  # prompts with a sample whose reward is above PASS_ABOVE
    response_tokens_total: int  # generated tokens, a stop token included
    truncated_samples: int  # stopped by max_new_tokens

    @property
    def accuracy(self) -> float:  # avg@k: the mean reward over all samples
        return self.reward_sum / max(self.samples, 1)

    @property
    def pass_at_k(self) -> float:
        return self.passed_prompts / max(self.prompts, 1)

    @property
    def response_tokens(self) -> float:
        return self.response_tokens_total / max(self.samples, 1)

    @property
    def truncated(self) -> float:
        return self.truncated_samples / max(self.samples, 1)

    def metrics(self) -> Dict[str, float]:
        accuracy, pass_key, tokens, truncated = self.spec.keys()[:4]
        out = {accuracy: self.accuracy, pass_key: self.pass_at_k, tokens: self.response_tokens,
               truncated: self.truncated}
        if self.spec.alias:
            out[self.spec.alias] = self.accuracy
        return out

    def summary(self) -> Dict:
        """What eval.json holds per set: settings, the numbers and the counts behind them."""
        s = self.spec
        return {"prompts": self.prompts, "k": s.samples, "temperature": s.temperature,
                "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "reward": s.reward,
                "weight": s.weight, "accuracy": self.accuracy, f"pass@{s.samples}": self.pass_at_k,
                "response_tokens": self.response_tokens, "truncated": self.truncated,
                "samples": self.samples, "reward_sum": self.reward_sum,
                "passed_prompts": self.passed_prompts,
                "response_tokens_total": self.response_tokens_total,
                "truncated_samples": self.truncated_samples}


def evaluate_set(engine, eval_set: EvalSet, decode: Callable[[List[int]], str], *,
                 stop_token_ids: Sequence[int], seed: Optional[int],
                 dp_group=None) -> SetResult:
    """Sample k responses to each of this rank's prompts of the set, score them, and sum the
    counts over `dp_group` (ranks with unequal shares still give the mean over all prompts).
    Every rank of the engine's model-parallel group calls it with the same prompts; every
    data-parallel rank calls it, with no prompts too (the SGLang engine's generate is
    collective)."""
    spec, prompts = eval_set.spec, eval_set.prompts
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p,
                            max_new_tokens=spec.max_new_tokens,
                            stop_token_ids=tuple(stop_token_ids), n=spec.samples)
    samples = engine.generate([p for p, _ in prompts], params, seed=seed)
    sums = torch.zeros(len(_COUNTS), dtype=torch.float64)
    sums[0] = len(prompts)
    if samples:
        rewards = eval_set.score([decode(s.output_ids) for s in samples],
                                 [prompts[s.prompt_index][1] for s in samples])
        passed = {s.prompt_index for s, r in zip(samples, rewards) if r > PASS_ABOVE}
        sums[1], sums[2], sums[3] = float(len(rewards)), float(sum(rewards)), float(len(passed))
        sums[4] = float(sum(len(s.output_ids) for s in samples))
        sums[5] = float(sum(s.finish_reason == "length" for s in samples))
    if dp_group is not None:
        dist.all_reduce(sums, group=dp_group)
    counts = dict(zip(_COUNTS, sums.tolist()))
    return SetResult(spec, reward_sum=counts.pop("reward_sum"),
                     **{k: int(v) for k, v in counts.items()})


def eval_record(results: Sequence[SetResult], law_metric: str = LAW_KEY) -> Dict[str, float]:
    """The metrics of an evaluation: each set's, eval/mean/accuracy (the weighted mean of the
    data.eval_sets accuracies) and eval_accuracy, the value of `law_metric`."""
    record: Dict[str, float] = {}
    for result in results:
        record.update(result.metrics())
    listed = [r for r in results if r.spec.listed]
    if listed:
        weight = sum(r.spec.weight for r in listed)
        record[MEAN_KEY] = sum(r.spec.weight * r.accuracy for r in listed) / weight
    source = law_source([r.spec for r in results], law_metric)
    if source not in record:
        raise KeyError(f"training.law_metric={law_metric!r}: the evaluation logged no "
                       f"{source!r} (it logs {', '.join(record)})")
    record[LAW_KEY] = record[source]
    return record


def run_evaluation(engine, sets: Sequence[EvalSet], decode: Callable[[List[int]], str], *,
                   stop_token_ids: Sequence[int], seed: int, dp_group=None,
                   law_metric: str = LAW_KEY) -> Tuple[List[SetResult], Dict[str, float]]:
    """Evaluate every set in order, one generate call each, each with the sampling seed
    derive_seed(seed, *spec.seed_parts) (`seed`: derive_seed(rollout.seed, step, DP rank, 7));
    returns the per-set results and the metrics record (eval_record)."""
    results = [evaluate_set(engine, s, decode, stop_token_ids=stop_token_ids,
                            seed=derive_seed(seed, *s.spec.seed_parts) if s.spec.seed_parts
                            else seed, dp_group=dp_group)
               for s in sets]
    return results, eval_record(results, law_metric)


def evaluate(engine, prompts: Sequence[Prompt], decode: Callable[[List[int]], str],
             score: Score, *, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
             avg_k: int = 0, temperature: float = 0.6, top_p: float = 1.0,
             seed: Optional[int] = None, dp_group=None, greedy: bool = True) -> Dict[str, float]:
    """{"eval_accuracy": greedy accuracy[, f"eval_avg@{avg_k}": sampled accuracy]} over the
    (prompt ids, answer) pairs of this data-parallel rank: the held-out sets of eval_specs
    (training.eval_greedy, eval_avg_k, eval_temperature) by evaluate_set, their aliases only.

    greedy=False: no greedy pass; "eval_accuracy" is then the avg@k itself (for tasks where the
    greedy answer hides what the policy does, e.g. a policy that is right at its mode but slips
    when it samples)."""
    if not greedy and avg_k < 1:
        raise ValueError("greedy=False needs avg_k >= 1 samples per prompt")
    specs = heldout_specs(max_new_tokens, "", greedy=greedy, avg_k=avg_k,
                          temperature=temperature, top_p=top_p)
    results = [evaluate_set(engine, EvalSet(spec, prompts, score), decode,
                            stop_token_ids=stop_token_ids, seed=seed, dp_group=dp_group)
               for spec in specs]
    return {r.spec.alias: r.accuracy for r in results}
