"""Built-in synthetic verifiable task for CPU runs: multi-digit addition ("123+45=168").

Its own character tokenizer keeps the vocabulary tiny, so the tiny model learns it in minutes.
"""
from dataclasses import dataclass
from typing import List, Tuple

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
