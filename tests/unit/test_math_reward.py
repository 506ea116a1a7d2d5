"""math-verify rewards, the fault-tolerant RewardPool, and loading reward functions by import
path."""
import time

import pytest

import reward_fault_fns
from megatron_rl.rewards.math import math_reward
from megatron_rl.rewards.pool import RewardPool, load_reward_fn
from megatron_rl.rewards.synthetic import exact_answer_reward


@pytest.mark.parametrize("response,answer,reward", [
    (r"so the answer is $\boxed{\frac{1}{2}}$", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # equivalent forms
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"x = \boxed{\dfrac{3}{4}}", r"\frac34", 1.0),  # bare LaTeX ground truth
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("We add them: 19 + 23 = 42. The answer is 42", "42", 1.0),  # final number, no box
    ("The answer is 42", "41", 0.0),
    (r"first \boxed{2} but then I recheck and get \boxed{5}", "5", 1.0),  # the last box counts
    (r"first \boxed{5} but then I recheck and get \boxed{2}", "5", 0.0),
    (r"\boxed{2}, \boxed{5}", "5", 1.0),  # not the set {2, 5}
    (r"\boxed{2}, \boxed{5}", r"\{2, 5\}", 0.0),
    (r"\boxed{\{5, 2\}}", r"\{2, 5\}", 1.0),
    (r"so \boxed{\frac{1}{2", "0.5", 0.0),  # truncated box: no final answer
    (r"\boxed{\frac{1}{3}}", "0.33", 0.0),  # close is not equal
    ("I don't know", "7", 0.0),
    ("", "1", 0.0),
    # DAPO's "Answer:" line (the instruction of DAPO-Math-17k and tools/prepare_math_data.py),
    # read as a ground truth is: from the whole text these four parse as something else.
    ("The pairs are found.\nAnswer: 3, 4", "3, 4", 1.0),
    ("Answer: (1, 2)", "(1, 2)", 1.0),
    (r"So the side is 2 \sqrt{2}." + "\nAnswer: " + r"2 \sqrt{2}", r"2\sqrt{2}", 1.0),
    (r"Answer: \left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    ("Answer: 204", "204", 1.0),
    ("First Answer: 5, then I recheck.\nanswer: 7", "7", 1.0),  # the last line counts
    ("First Answer: 5, then I recheck.\nanswer: 7", "5", 0.0),
    ("Answer: 3, 4", "3", 0.0),
    (r"Answer: 3 but boxed \boxed{4}", "4", 1.0),  # a box wins over the line
    ("Answer:", "1", 0.0),  # nothing after it: the whole text (no number) is read
])
def test_math_reward(response, answer, reward):
    assert math_reward(response, answer) == reward


def test_load_reward_fn_builtins_and_allow_list():
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn("exact") is exact_answer_reward
    assert load_reward_fn("reward_fault_fns:length_reward",
                          ["reward_fault_fns"]) is reward_fault_fns.length_reward
    # A submodule of an allowed package is allowed; a sibling package with a common prefix is not.
    assert load_reward_fn("megatron_rl.rewards.math:math_reward",
                          ["megatron_rl.rewards"]) is math_reward
    with pytest.raises(PermissionError,
                       match="module 'megatron_rl.rewards_evil' is not in reward.allowed_modules"):
        load_reward_fn("megatron_rl.rewards_evil:f", ["megatron_rl.rewards"])
    with pytest.raises(PermissionError, match="module 'os' is not in reward.allowed_modules"):
        load_reward_fn("os:system", ["reward_fault_fns"])
    with pytest.raises(TypeError, match="is not callable"):
        load_reward_fn("reward_fault_fns:NOT_CALLABLE", ["reward_fault_fns"])
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_fn("reward_fault_fns:missing", ["reward_fault_fns"])
    with pytest.raises(ValueError, match="expected 'math', 'exact' or 'package.module:function'"):
        load_reward_fn("reward_fault_fns.length_reward", ["reward_fault_fns"])


def test_pool_normal_rewards_in_order():
    pairs = [("a" * i, "") for i in range(7)]
    with RewardPool(reward_fault_fns.length_reward, num_workers=2, timeout_s=5.0) as pool:
        assert pool.score(pairs) == ([float(i) for i in range(7)],
                                     {"timeout": 0, "error": 0, "memory": 0})
        assert pool.score([]) == ([], {"timeout": 0, "error": 0, "memory": 0})


def test_pool_math_reward_matches_direct_calls():
    pairs = [(r"\boxed{\frac{1}{2}}", "0.5"), ("The answer is 41", "42")]
    with RewardPool(math_reward, num_workers=1, timeout_s=30.0) as pool:
        assert pool.score(pairs)[0] == [1.0, 0.0]


def test_pool_hung_check_times_out_and_worker_is_replaced():
    with RewardPool(reward_fault_fns.hang_on_hang, num_workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        rewards, counts = pool.score([("ok", ""), ("hang", ""), ("ok", ""), ("ok", "")])
        # not the 60 s sleep; includes the replacement's start-up
        assert time.monotonic() - start < 15
        assert rewards == [1.0, 0.0, 1.0, 1.0]
        assert counts == {"timeout": 1, "error": 0, "memory": 0}
        # The replacement worker serves the next step.
        assert pool.score([("ok", "")] * 3) == ([1.0] * 3, {"timeout": 0, "error": 0, "memory": 0})


def test_pool_raising_check_is_counted_and_logged(caplog):
    with RewardPool(reward_fault_fns.raise_on_boom, num_workers=2, timeout_s=5.0) as pool:
        rewards, counts = pool.score([("ok", ""), ("boom", ""), ("ok", "")])
    assert rewards == [1.0, 0.0, 1.0]
    assert counts == {"timeout": 0, "error": 1, "memory": 0}
    assert "reward check 1 -> 0.0 (error: RuntimeError: verifier crashed)" in caplog.text


def test_pool_memory_limit():
    with RewardPool(reward_fault_fns.allocate_on_big, num_workers=1, timeout_s=10.0,
                    memory_limit_mb=256) as pool:
        rewards, counts = pool.score([("big", ""), ("ok", "")])
    assert rewards == [0.0, 1.0]
    assert counts == {"timeout": 0, "error": 0, "memory": 1}
