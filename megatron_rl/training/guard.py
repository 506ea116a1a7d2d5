"""Divergence beyond NaN: a run whose updates stay finite can still be ruined (a learning rate far
too high makes the weights huge but finite; every reward is then 0, every group is filtered, no
loss is computed, and nothing non-finite ever shows). The guard reads each step's metrics record
and calls the step unhealthy when
  - every reward is 0 after the policy had been solving: the mean reward over REWARD_WINDOW
    consecutive steps (fewer at the start) had reached SOLVING (a weak policy's chance
    zero-reward steps do not count),
  - the step's grad norm exceeds training.divergence_grad_norm_ratio times the median of the
    previous healthy steps' (a spike; 0 disables),
  - the token entropy moved by more than training.divergence_entropy_jump nats from the previous
    step (0 disables).
training.divergence_steps unhealthy steps in a row stop the job (0 disables the guard); while a
streak runs the trainer defers its periodic checkpoints, so the newest checkpoint is one from
before the divergence. The trainer all-reduces the verdict: every rank stops together.
"""
import math
import statistics
from typing import Dict, List, Optional

HISTORY = 10  # healthy steps whose grad norms make the spike's baseline
REWARD_WINDOW, SOLVING = 5, 0.1


class DivergenceGuard:
    def __init__(self, steps: int, grad_norm_ratio: float = 0.0, entropy_jump: float = 0.0):
        self.steps, self.grad_norm_ratio, self.entropy_jump = steps, grad_norm_ratio, entropy_jump
        self.streak = 0  # unhealthy steps in a row
        self.reasons: List[str] = []  # why, for each step of the streak
        self._rewards: List[float] = []  # the mean rewards of the last REWARD_WINDOW steps
        self._solving = False  # their mean has reached SOLVING
        self._grad_norms: List[float] = []
        self._entropy: Optional[float] = None

    def unhealthy(self, record: Dict) -> Optional[str]:
        """Why the step of `record` looks diverged, or None; updates the baselines."""
        reason = None
        reward = record.get("reward_mean")
        if reward is not None:
            self._rewards = (self._rewards + [reward])[-REWARD_WINDOW:]
            if sum(self._rewards) / len(self._rewards) >= SOLVING:
                self._solving = True
            if reward == 0 and self._solving:
                reason = (f"every reward is 0 (earlier the mean over {REWARD_WINDOW} steps had "
                          f"reached {SOLVING})")
        grad_norm = record.get("grad_norm")
        if grad_norm is not None and math.isfinite(grad_norm):
            if (self.grad_norm_ratio and len(self._grad_norms) >= 3 and grad_norm
                    > self.grad_norm_ratio * statistics.median(self._grad_norms)):
                reason = reason or (f"grad norm {grad_norm:.3g} is over "
                                    f"{self.grad_norm_ratio:g}x the median of the last "
                                    f"{len(self._grad_norms)} steps "
                                    f"({statistics.median(self._grad_norms):.3g})")
            elif reason is None:
                self._grad_norms = (self._grad_norms + [grad_norm])[-HISTORY:]
        entropy = record.get("entropy")
        if entropy is not None and math.isfinite(entropy):
            if (self.entropy_jump and self._entropy is not None
                    and abs(entropy - self._entropy) > self.entropy_jump):
                reason = reason or (f"entropy moved {entropy - self._entropy:+.3f} nats in one "
                                    f"step (limit {self.entropy_jump:g})")
            self._entropy = entropy
        return reason

    def observe(self, diverged_anywhere: bool, reason: Optional[str]) -> bool:
        """Count the step (healthy unless some rank saw divergence); True when the job must stop."""
        if not diverged_anywhere:
            self.streak, self.reasons = 0, []
            return False
        self.streak += 1
        self.reasons.append(reason or "diverged on another rank")
        return bool(self.steps) and self.streak >= self.steps
