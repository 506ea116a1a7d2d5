"""The divergence guard (megatron_rl/training/guard.py) on hand-made metric records."""
import math

from megatron_rl.training.guard import DivergenceGuard


def run(guard, records):
    """The step (1-based) at which the guard stops, or None; the reasons it gave."""
    for step, record in enumerate(records, 1):
        reason = guard.unhealthy(record)
        if guard.observe(reason is not None, reason):
            return step, guard.reasons
    return None, guard.reasons


def test_zero_rewards_count_only_after_the_policy_was_solving():
    # a policy that has not found a reward yet is not diverged, nor one whose rare lucky step
    # is followed by zeros
    assert run(DivergenceGuard(3), [{"reward_mean": 0.0}] * 20)[0] is None
    lucky = [{"reward_mean": 0.0}] * 4 + [{"reward_mean": 0.2}] + [{"reward_mean": 0.0}] * 10
    assert run(DivergenceGuard(3), lucky)[0] is None
    # five steps averaging 0.1, then zeros
    records = [{"reward_mean": r} for r in (0.0, 0.1, 0.2, 0.1, 0.1)] + [{"reward_mean": 0.0}] * 5
    step, reasons = run(DivergenceGuard(3), records)
    assert step == 8 and reasons[0].startswith("every reward is 0")


def test_a_healthy_step_resets_the_streak():
    records = [{"reward_mean": 0.5}] + [{"reward_mean": 0.0}, {"reward_mean": 0.0},
                                        {"reward_mean": 0.1}] * 5
    guard = DivergenceGuard(3)
    assert run(guard, records)[0] is None and guard.streak == 0


def test_grad_norm_spike_against_the_median_of_healthy_steps():
    norms = [1.0, 1.2, 0.9, 1.1, 50.0, 60.0, 1.0]
    records = [{"reward_mean": 0.5, "grad_norm": g} for g in norms]
    guard = DivergenceGuard(2, grad_norm_ratio=10.0)
    step, reasons = run(guard, records)
    assert step == 6 and "grad norm 50" in reasons[0]
    # the spikes did not enter the baseline
    assert max(guard._grad_norms) < 2
    assert run(DivergenceGuard(2), records)[0] is None  # ratio 0: not checked


def test_entropy_jump_and_nan_entropy():
    records = [{"reward_mean": 0.5, "entropy": e} for e in (0.5, 0.45, 3.0, 2.9, 0.4)]
    step, reasons = run(DivergenceGuard(1, entropy_jump=1.0), records)
    assert step == 3 and "+2.550 nats" in reasons[0]
    nan = [{"reward_mean": 0.5, "entropy": math.nan}] * 5
    assert run(DivergenceGuard(1, entropy_jump=1.0), nan)[0] is None


def test_steps_zero_never_stops_and_other_ranks_count():
    guard = DivergenceGuard(0)
    assert not any(guard.observe(True, "x") for _ in range(100))
    guard = DivergenceGuard(2)
    assert not guard.observe(True, None)
    assert guard.observe(True, None) and guard.reasons == ["diverged on another rank"] * 2
