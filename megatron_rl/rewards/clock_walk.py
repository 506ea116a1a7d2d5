"""The built-in clock_walk check as a dataset verifier: `reward.fn:
megatron_rl.rewards.clock_walk:reward` (with the module in `reward.allowed_modules`) scores the
rows that tools/make_example_data.py writes. Their ground truth is "allowed start steps", e.g.
"2579 3 5": the prompt's problem and how many steps a right response takes, so one string holds
all the check needs. Any allowed path is right; the check itself is the task's own
(data/synthetic.py clock_walk_reward), which the built-in clock_walk task scores with."""
from megatron_rl.data.synthetic import clock_walk_reward


def ground_truth(allowed: str, start: int, steps: int) -> str:
    """The ground-truth string `reward` reads: "allowed start steps"."""
    return f"{allowed} {start} {steps}"


def reward(response: str, answer: str) -> float:
    """1.0 when `response` is a right walk for the ground truth `answer` ("allowed start steps",
    see `ground_truth`), else 0.0; a ground truth of another form raises ValueError (the
    reward pool scores it 0 and counts it as an error)."""
    fields = answer.split()
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        raise ValueError(f"clock_walk ground truth must be 'allowed start steps' "
                         f"(e.g. '2579 3 5'), got {answer!r}")
    allowed, start, steps = fields
    return clock_walk_reward(response, f"{allowed} {start}", steps=int(steps))
