"""Math answer verification with the math-verify library (boxed answers, DAPO's "Answer:" lines,
LaTeX, plain numbers)."""
import re

from math_verify import parse, verify

# DAPO-Math-17k's instruction (and tools/prepare_math_data.py's, for the benchmarks): "The last
# line of your response should be of the form Answer: $Answer".
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)


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


def _last_answer_line(response: str) -> str | None:
    """The text after the response's last "Answer:" up to the end of that line, or None."""
    matches = list(_ANSWER_LINE.finditer(response))
    if not matches:
        return None
    return response[matches[-1].end():].split("\n", 1)[0].strip() or None


def _parse_ground_truth(answer: str):
    # Datasets store ground truths bare ("\frac34", "\{2, 5\}", "0.5"). math-verify reads bare
    # LaTeX only inside math delimiters and may misread it without them ("\{2, 5\}" -> 5), so the
    # delimited form is tried first.
    if "$" not in answer and r"\boxed" not in answer:
        return parse(f"${answer}$") or parse(answer)
    return parse(answer)


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer (its last box, else its last "Answer:" line, else its
    final number or expression) is mathematically equal to `answer`, else 0.0.

    An "Answer:" line is read as a ground truth is (bare LaTeX inside math delimiters): read
    from the whole text, "Answer: 3, 4" or "Answer: 2 \\sqrt{2}" parse as something else.

    math-verify bounds its own parsing/verification with signal-based timeouts (main thread only);
    the RewardPool's per-check timeout is what protects a training step.
    """
    gold = _parse_ground_truth(answer)
    box = _last_box(response)
    if box is not None:
        predicted = parse(box)
    else:
        line = _last_answer_line(response)
        predicted = _parse_ground_truth(line) if line is not None else parse(response)
    if not gold or not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted) else 0.0
