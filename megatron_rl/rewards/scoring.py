"""Scoring responses by a reward spec ("exact", "math", "package.module:function"): the
trainer's rewards, its evaluation sets', and every set of `python -m megatron_rl.evaluate`.
"exact" is the task's own check in this process, anything else runs in a RewardPool (timeouts,
crashes and memory faults score 0 and are counted), and a reward that is not a finite number in
[reward.min_value, reward.max_value] is a verifier fault: 0, counted as `invalid`, logged."""
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


class Scorer:
    """(responses, answers) -> rewards for one reward spec. `faults` counts timeout, error,
    memory and invalid rewards (pass a shared dict to count several scorers together)."""

    def __init__(self, spec: str, reward_cfg, exact: Callable[[Sequence[str], Sequence[str]],
                                                               List[float]],
                 faults: Optional[Dict[str, int]] = None):
        from megatron_rl.rewards.pool import load_reward_fn

        self.spec, self.cfg = spec, reward_cfg
        self.low, self.high = reward_cfg.min_value, reward_cfg.max_value
        self.exact, self.pool = exact, None
        self.faults = faults if faults is not None else {}
        for key in ("timeout", "error", "memory", "invalid"):
            self.faults.setdefault(key, 0)
        # imported now, so that a function that is not there fails at the start; the worker
        # processes start at the first call
        self.fn = None if spec == "exact" else load_reward_fn(spec, reward_cfg.allowed_modules)

    def __call__(self, responses: List[str], answers: List[str]) -> List[float]:
        if self.fn is None:
            rewards = self.exact(responses, answers)
        else:
            if self.pool is None:
                from megatron_rl.rewards.pool import RewardPool

                c = self.cfg
                self.pool = RewardPool(self.fn, c.workers, c.timeout_s, c.memory_limit_mb)
            rewards, counts = self.pool.score(list(zip(responses, answers)))
            for key, value in counts.items():
                if key in self.faults:
                    self.faults[key] += value
        checked = []
        for index, reward in enumerate(rewards):
            valid = isinstance(reward, (int, float)) and math.isfinite(reward) \
                and self.low <= reward <= self.high
            if not valid:
                self.faults["invalid"] += 1
                logger.warning("reward (%s) of response %d is %r, outside [%g, %g] or not "
                               "finite: scored 0", self.spec, index, reward, self.low, self.high)
            checked.append(float(reward) if valid else 0.0)
        return checked

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class Scorers:
    """One Scorer per reward spec, made at its first use (`scorers(spec)`), all counting their
    faults in one dict: the trainer's rewards and evaluation sets, the evaluator's sets."""

    def __init__(self, reward_cfg, exact: Callable[[Sequence[str], Sequence[str]], List[float]],
                 faults: Optional[Dict[str, int]] = None):
        self.cfg, self.exact = reward_cfg, exact
        self.faults = faults if faults is not None else {}
        self._by_spec: Dict[str, Scorer] = {}

    def __call__(self, spec: str) -> Scorer:
        if spec not in self._by_spec:
            self._by_spec[spec] = Scorer(spec, self.cfg, self.exact, self.faults)
        return self._by_spec[spec]

    def close(self) -> None:
        for scorer in self._by_spec.values():
            scorer.close()
