"""Built-in synthetic verifiable tasks for CPU runs, on one character tokenizer (vocabulary 20),
so a tiny model learns them in minutes:

- `addition`: "12+34=" -> "46" (one short, deterministic answer);
- `clock_walk`: "2579 3 8=" -> "3+5=8 8+7=5 5+2=7 7+9=6 6+2=8": from the start digit, add `steps`
  digits from the allowed ones, writing each total mod 10, and land on the target. Many
  responses are right (every path whose sum hits the target), so a policy can stay diverse and
  still be correct: the room that entropy collapse and its control need. Responses are
  6 * steps tokens (30 at the default 5 steps); train and eval problems are disjoint sets.
"""
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Sequence, Tuple

import torch

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+=-*() "
VOCAB = ["<pad>", "<bos>", "<eos>"] + list(CHARS)


@dataclass(frozen=True)
class CharTokenizer:
    pad_id: int = PAD
    bos_id: int = BOS
    eos_id: int = EOS

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def encode(self, text: str) -> List[int]:
        try:
            return [VOCAB.index(c) for c in text]
        except ValueError as e:
            bad = next(c for c in text if c not in CHARS)
            raise ValueError(f"character {bad!r} is not in the synthetic tokenizer's "
                             f"vocabulary {CHARS!r}") from e

    def decode(self, ids) -> str:
        return "".join(VOCAB[i] for i in ids if i > EOS)


def addition_problems(n: int, digits: int, seed: int) -> List[Tuple[str, str]]:
    """n (prompt, answer) pairs like ("12+34=", "46"), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    hi = 10 ** digits
    a = torch.randint(0, hi, (n,), generator=g)
    b = torch.randint(0, hi, (n,), generator=g)
    return [(f"{x}+{y}=", str(x + y)) for x, y in zip(a.tolist(), b.tolist())]


def supervised_batch(problems, tokenizer: CharTokenizer, seq_length: int):
    """tokens, labels, loss_mask [n, seq_length]: <bos> prompt answer <eos>, padded; the loss
    covers the answer and <eos> only (the prompt is given)."""
    n = len(problems)
    tokens = torch.full((n, seq_length + 1), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_length + 1)
    for i, (prompt, answer) in enumerate(problems):
        p = [tokenizer.bos_id] + tokenizer.encode(prompt)
        ids = p + tokenizer.encode(answer) + [tokenizer.eos_id]
        if len(ids) > seq_length + 1:
            raise ValueError(f"problem {i} ({prompt}{answer}) needs {len(ids)} tokens, "
                             f"more than training.seq_length + 1 = {seq_length + 1}")
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(p): len(ids)] = 1.0
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask[:, 1:].contiguous()


def addition_prompts(count: int, digits: int, seed: int, tokenizer: CharTokenizer):
    """`count` RL prompts: (token ids of "<bos>a+b=", answer string)."""
    return [([tokenizer.bos_id] + tokenizer.encode(prompt), answer)
            for prompt, answer in addition_problems(count, digits, seed)]


# --- clock_walk -----------------------------------------------------------------------------
# "2579 3 8=" -> "3+5=8 8+7=5 5+2=7 7+9=6 6+2=8": from the start digit (3), add `steps` digits taken
# from the allowed ones (2579), writing each total mod 10, and land on the target (8). Each
# token is a lookup a two-layer model learns in a few hundred steps; choosing digits that keep
# the target reachable is planning it learns only roughly, so the warm start leaves room.


@lru_cache(maxsize=None)
def _walks(allowed: Tuple[int, ...], steps: int) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
    """All digit paths over `allowed`, grouped by their sum mod 10."""
    by_residue: List[List[Tuple[int, ...]]] = [[] for _ in range(10)]
    for path in itertools.product(allowed, repeat=steps):
        by_residue[sum(path) % 10].append(path)
    return tuple(tuple(paths) for paths in by_residue)


def clock_walk_problems(steps: int, num_allowed: int) -> List[Tuple[str, int, int]]:
    """Every solvable (allowed digits, start, target) of the task, in a fixed order."""
    return [("".join(map(str, allowed)), start, target)
            for allowed in itertools.combinations(range(1, 10), num_allowed)
            for start in range(10) for target in range(10)
            if _walks(allowed, steps)[(target - start) % 10]]


def clock_walk_split(steps: int, num_allowed: int, eval_count: int, eval_seed: int):
    """(train problems, eval problems): a seeded permutation of all problems cut in two, so the
    held-out eval set never shares a problem with training or the warm start."""
    problems = clock_walk_problems(steps, num_allowed)
    if not 0 < eval_count < len(problems):
        raise ValueError(f"data.eval_prompts={eval_count} must be in [1, {len(problems) - 1}] "
                         f"for clock_walk ({len(problems)} problems in all)")
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(eval_seed))
    return ([problems[i] for i in sorted(order[eval_count:].tolist())],
            [problems[i] for i in sorted(order[:eval_count].tolist())])


def clock_walk_prompt(allowed: str, start: int, target: int) -> str:
    return f"{allowed} {start} {target}="


def clock_walk_response(start: int, path: Sequence[int]) -> str:
    """Each step "t+d=t'" repeats the total t beside the digit it adds, so every token is a
    lookup of the two or three tokens just before it."""
    steps, total = [], start
    for d in path:
        new = (total + d) % 10
        steps.append(f"{total}+{d}={new}")
        total = new
    return " ".join(steps)


def clock_walk_demonstrations(problems: Sequence[Tuple[str, int, int]], count: int, steps: int,
                              seed: int, aim: float = 1.0) -> List[Tuple[str, str]]:
    """`count` (prompt, response) pairs for the supervised warm start: problems drawn from
    `problems`; with probability `aim` a path drawn uniformly from all right ones, otherwise
    one drawn uniformly from all paths over the allowed digits, written out honestly wherever it
    ends. Below 1, the warm start cannot learn to write the target as the last total whatever
    the arithmetic: it learns the arithmetic, and RL has to teach it to aim."""
    g = torch.Generator().manual_seed(seed + 1)
    pairs = []
    for allowed, start, target in draw(problems, count, seed):
        by_residue = _walks(tuple(map(int, allowed)), steps)
        if float(torch.rand((), generator=g)) < aim:
            paths = by_residue[(target - start) % 10]
        else:
            paths = tuple(itertools.chain.from_iterable(by_residue))
        path = paths[int(torch.randint(0, len(paths), (1,), generator=g))]
        pairs.append((clock_walk_prompt(allowed, start, target), clock_walk_response(start, path)))
    return pairs


_STEP = re.compile(r"([0-9])\+([1-9])=([0-9])")


def clock_walk_reward(response: str, answer: str, steps: int) -> float:
    """1.0 when `response` is exactly `steps` steps "t+d=t'" separated by single spaces, t is
    the previous total (the start first), d an allowed digit, t' = t + d mod 10, and the last
    total is the target; `answer` is the prompt's "allowed start target". Else 0.0."""
    allowed, start, target = answer.split()
    parts = response.strip().split(" ")
    if len(parts) != steps:
        return 0.0
    total = int(start)
    for part in parts:
        match = _STEP.fullmatch(part)
        if match is None or int(match.group(1)) != total or match.group(2) not in allowed:
            return 0.0
        total = (total + int(match.group(2))) % 10
        if int(match.group(3)) != total:
            return 0.0
    return 1.0 if total == int(target) else 0.0


def clock_walk_prompts(problems: Sequence[Tuple[str, int, int]], tokenizer: CharTokenizer
                       ) -> List[Tuple[List[int], str]]:
    """RL prompts: (token ids of "<bos>allowed start target=", "allowed start target")."""
    return [([tokenizer.bos_id] + tokenizer.encode(clock_walk_prompt(*p)), " ".join(map(str, p)))
            for p in problems]


def draw(items: Sequence, count: int, seed: int) -> List:
    """`count` items drawn uniformly with replacement, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [items[i] for i in torch.randint(0, len(items), (count,), generator=g).tolist()]
