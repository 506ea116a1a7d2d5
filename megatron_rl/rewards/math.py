"""Math answer verification with the math-verify library (boxed answers, LaTeX, plain numbers)."""
from math_verify import parse, verify


def _last_box(response: str) -> str | None:
    r"""The last \boxed{...} of the response, command included, or None.

    math-verify itself may merge several boxes into one set answer ("\boxed{2} ... \boxed{5}" ->
    {2, 5}); a model that corrects itself should be scored on its final box only.
    """
    start = response.rfind(r"\boxed{")
    if start < 0:
        return None
    brace = start + len(r"\boxed")
    depth = 0
    for end in range(brace, len(response)):
        depth += {"{": 1, "}": -1}.get(response[end], 0)
        if depth == 0:
            return response[start:end + 1]
    return None  # unclosed box (truncated response): fall back to the whole text


def _parse_ground_truth(answer: str):
    # Datasets store ground truths bare ("\frac34", "\{2, 5\}", "0.5"). math-verify reads bare
    # LaTeX only inside math delimiters and may misread it without them ("\{2, 5\}" -> 5), so the
    # delimited form is tried first.
    if "$" not in answer and r"\boxed" not in answer:
        return parse(f"${answer}$") or parse(answer)
    return parse(answer)


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer (its last box, else its final number or expression)
    is mathematically equal to `answer`, else 0.0.

    math-verify bounds its own parsing/verification with signal-based timeouts (main thread only);
    the RewardPool's per-check timeout is what protects a training step.
    """
    gold = _parse_ground_truth(answer)
    box = _last_box(response)
    predicted = parse(box if box is not None else response)
    if not gold or not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted) else 0.0
