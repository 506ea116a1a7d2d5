"""Built-in synthetic verifiable tasks for CPU runs, on one character tokenizer (vocabulary 20),
so a tiny model learns them in minutes:

- `addition`: "12+34=" -> "46" (one short, deterministic answer);
- `clock_walk`: "2579 3=" -> "3+5=8 8+7=5 5+2=7 7+9=6 6+2=8": from the start digit, add `steps`
  digits from the allowed ones, writing each total mod 10. Many responses are right (any
  allowed path), so a policy can stay diverse and still be correct: the room that entropy
  collapse and its control need. Responses are 6 * steps tokens (30 at the default 5 steps);
  train and eval problems are disjoint sets.
"""
import itertools
import re
from dataclasses import dataclass
from typing import List, Sequence, Set, Tuple

import torch

from megatron_rl.seeds import derive_seed

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


def addition_prompt_tokens(digits: int) -> int:
    """Tokens of the longest addition prompt: <bos> and the widest "a+b="."""
    largest = 10 ** digits - 1
    return 1 + len(f"{largest}+{largest}=")


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


def addition_prompts_outside(count: int, digits: int, seed: int, held_out: Set[str],
                             tokenizer: CharTokenizer):
    """`count` RL prompts like addition_prompts', none of whose texts ("a+b=") is in
    `held_out`: `seed`'s problems in order, skipping held-out ones (chunk c of `count` problems
    from derive_seed(seed, c)). At least one problem must be outside `held_out`."""
    if len(held_out) >= 10 ** (2 * digits):
        raise ValueError(f"every {digits}-digit addition problem is held out")
    out, chunk = [], 0
    while len(out) < count:
        for prompt, answer in addition_problems(count, digits, derive_seed(seed, chunk)):
            if prompt not in held_out and len(out) < count:
                out.append(([tokenizer.bos_id] + tokenizer.encode(prompt), answer))
        chunk += 1
    return out


# --- clock_walk -----------------------------------------------------------------------------
# "2579 3=" -> "3+5=8 8+7=5 5+2=7 7+9=6 6+2=8": from the start digit (3), add `steps` digits
# taken from the allowed ones (2579), writing each total mod 10 beside its inputs. Every token is
# a lookup of the few tokens before it (a 4-layer model learns it in a few hundred steps); any of
# the len(allowed) ** steps paths is right. The warm start imitates a sloppy demonstrator whose
# totals slip more often the larger the digit it adds, so RL has two things to do: stop slipping
# (sharpen the totals) and, if it pays, prefer the digits it slips on less (a narrower choice):
# the exploitation that collapses entropy in the paper.


def clock_walk_problems(num_allowed: int) -> List[Tuple[str, int]]:
    """Every (allowed digits, start) problem of the task, in a fixed order."""
    return [("".join(map(str, allowed)), start)
            for allowed in itertools.combinations(range(1, 10), num_allowed)
            for start in range(10)]


def clock_walk_split(num_allowed: int, eval_count: int, eval_seed: int):
    """(train problems, eval problems): a seeded permutation of all problems cut in two, so the
    held-out eval set never shares a problem with training or the warm start."""
    problems = clock_walk_problems(num_allowed)
    if not 0 < eval_count < len(problems):
        raise ValueError(f"data.eval_prompts={eval_count} must be in [1, {len(problems) - 1}] "
                         f"for clock_walk with data.walk_digits={num_allowed} "
                         f"({len(problems)} problems in all)")
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(eval_seed))
    return ([problems[i] for i in sorted(order[eval_count:].tolist())],
            [problems[i] for i in sorted(order[:eval_count].tolist())])


def clock_walk_prompt(allowed: str, start: int) -> str:
    return f"{allowed} {start}="


def clock_walk_prompt_tokens(num_allowed: int) -> int:
    """Tokens of every clock_walk prompt: <bos> "allowed start=" (all are the same length)."""
    return 1 + len(clock_walk_prompt("1" * num_allowed, 0))


def clock_walk_slip(digit: int, slip: float) -> float:
    """How often the demonstrator writes a wrong total when it adds `digit`: 0 for 1, rising
    linearly to `slip` for 9."""
    return slip * (digit - 1) / 8


def clock_walk_demonstrations(problems: Sequence[Tuple[str, int]], count: int, steps: int,
                              seed: int, slip: float = 0.0) -> List[Tuple[str, str]]:
    """`count` (prompt, response) pairs for the supervised warm start: problems drawn from
    `problems`, digits drawn uniformly from the allowed ones; each total is right, except with
    probability clock_walk_slip(digit, slip), when it is one of the 9 wrong digits (and the walk
    goes on from what was written, as a demonstrator who believes it would)."""
    g = torch.Generator().manual_seed(seed + 1)
    pairs = []
    for allowed, start in draw(problems, count, seed):
        written, total = [], start
        for _ in range(steps):
            d = int(allowed[int(torch.randint(0, len(allowed), (1,), generator=g))])
            new = (total + d) % 10
            if float(torch.rand((), generator=g)) < clock_walk_slip(d, slip):
                new = (new + int(torch.randint(1, 10, (1,), generator=g))) % 10
            written.append(f"{total}+{d}={new}")
            total = new
        pairs.append((clock_walk_prompt(allowed, start), " ".join(written)))
    return pairs


_STEP = re.compile(r"([0-9])\+([1-9])=([0-9])")


def clock_walk_reward(response: str, answer: str, steps: int) -> float:
    """1.0 when `response` is exactly `steps` steps "t+d=t'" separated by single spaces, t is
    the previous total (the start first), d an allowed digit and t' = t + d mod 10; `answer` is
    the prompt's "allowed start". Else 0.0."""
    allowed, start = answer.split()
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
    return 1.0


def clock_walk_prompts(problems: Sequence[Tuple[str, int]], tokenizer: CharTokenizer
                       ) -> List[Tuple[List[int], str]]:
    """RL prompts: (token ids of "<bos>allowed start=", "allowed start")."""
    return [([tokenizer.bos_id] + tokenizer.encode(clock_walk_prompt(*p)), " ".join(map(str, p)))
            for p in problems]


def draw(items: Sequence, count: int, seed: int) -> List:
    """`count` items drawn uniformly with replacement, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [items[i] for i in torch.randint(0, len(items), (count,), generator=g).tolist()]
