"""Prompt datasets from jsonl / parquet files (verl / DAPO layout) and local HF tokenizers.

A row holds a prompt (plain text or a list of chat messages) and a ground-truth answer, e.g. verl's
{"prompt": [{"role": "user", "content": "..."}], "reward_model": {"ground_truth": "42"}}.
Prompts are tokenized once at load time; the trainer samples them with `PromptDataset.batch`.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch

from megatron_rl.seeds import derive_seed

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A prompt file or row that cannot be used; the message names file, row/line and field."""


class _RowError(Exception):
    """Internal: a bad row, before the file/row location is attached."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PromptDataset:
    examples: list[tuple[list[int], str]]  # (prompt token ids, ground-truth answer)
    skipped: Counter = field(default_factory=Counter)  # skip reason -> rows (on_invalid="skip")
    source: str = ""
    locations: list[str] = field(default_factory=list)  # each example's "line N" / "row N"

    def __len__(self) -> int:
        return len(self.examples)

    def _epoch_order(self, seed: int, epoch: int) -> list[int]:
        # One epoch's permutation depends only on (seed, epoch), so a resumed run at step s sees
        # exactly the prompts the original run saw; the last epoch is cached because consecutive
        # steps almost always share it.
        cached = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == (seed, epoch):
            return cached[1]
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        self._order_cache = ((seed, epoch), order)
        return order

    def batch(self, step: int, count: int, seed: int) -> list[tuple[list[int], str]]:
        """The `count` examples of training step `step`: positions step*count .. step*count+count-1
        of the stream of shuffled epochs (wrapping into the next epoch's order mid-batch)."""
        if not self.examples:
            raise DataError(f"{self.source}: no usable prompts")
        if step < 0 or count < 1:
            raise ValueError(f"batch needs step >= 0 and count >= 1, "
                             f"got step={step}, count={count}")
        size = len(self.examples)
        out = []
        for position in range(step * count, (step + 1) * count):
            epoch, offset = divmod(position, size)
            out.append(self.examples[self._epoch_order(seed, epoch)[offset]])
        return out


def verl_parquet_schema(extra_info: list):
    """The parquet schema of a verl / DAPO prompt file as the tools write it (chat-message
    prompts, a rule ground truth); `extra_info` is its list of (field, pyarrow type)."""
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct(extra_info)),
    ])


def load_tokenizer(model_dir: str | os.PathLike):
    """The HF tokenizer (with its chat template) saved in a local model folder; never downloads."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"tokenizer folder {model_dir} does not exist "
                                "(only local folders are supported)")
    return AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)


def _undecodable(line: str) -> _RowError | None:
    """The first byte that is not UTF-8, as surrogateescape decoding leaves it (U+DC80..U+DCFF;
    a JSON escape such as \\udc80 is six ASCII characters, never one of these)."""
    for column, char in enumerate(line, start=1):
        if "\udc80" <= char <= "\udcff":
            return _RowError("malformed", f"not valid UTF-8 (byte 0x{ord(char) - 0xdc00:02x} "
                                          f"at column {column})")
    return None


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    # surrogateescape: a byte that is not UTF-8 spoils its own line (named, or skipped and
    # counted), not the whole file with a UnicodeDecodeError that names neither
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a doubled trailing newline) carry no row
            bad_bytes = _undecodable(line)
            if bad_bytes is not None:
                yield f"line {line_number}", bad_bytes
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {line_number}", _RowError(
                    "malformed", f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            yield f"line {line_number}", row


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    row_index = 0
    # Record batches keep memory bounded for large files; nested structs come back as dicts.
    for record_batch in parquet_file.iter_batches():
        for row in record_batch.to_pylist():
            yield f"row {row_index}", row
            row_index += 1


def _lookup(row: dict, key: str) -> Any:
    """`row[key]`, where a dotted key walks nested dicts unless the row has the literal key."""
    if key in row:
        value = row[key]
    else:
        value = row
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise _RowError("missing_field", f"field '{key}' missing")
            value = value[part]
    if value is None:
        raise _RowError("missing_field", f"field '{key}' missing")
    return value


def _answer_text(row: dict, answer_key: str) -> str:
    answer = _lookup(row, answer_key)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _RowError("invalid_field", f"field '{answer_key}' must be a string or number, "
                                         f"got {type(answer).__name__}")
    answer = str(answer)
    if not answer.strip():
        raise _RowError("invalid_field", f"field '{answer_key}' is empty")
    return answer


def _chat_messages(prompt: Any, prompt_key: str) -> list[dict] | None:
    """The prompt as chat messages, or None when it is plain text."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _RowError("empty_prompt", f"field '{prompt_key}' is empty")
        return None
    if not isinstance(prompt, list):
        raise _RowError("invalid_field", f"field '{prompt_key}' must be a string or a list of "
                                         f"chat messages, got {type(prompt).__name__}")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _RowError("invalid_field", f"field '{prompt_key}' message {i} must have "
                                             "string 'role' and 'content'")
    if not any(message["content"].strip() for message in prompt):
        raise _RowError("empty_prompt", f"field '{prompt_key}' is empty")
    # Only role/content go to the template: parquet structs add null columns for absent keys.
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def load_prompt_dataset(
    path: str | os.PathLike,
    tokenizer,
    *,
    max_prompt_tokens: int,
    prompt_key: str = "prompt",
    answer_key: str = "reward_model.ground_truth",
    on_invalid: Literal["error", "skip"] = "error",
    apply_chat_template: bool = True,
    max_positions: int | None = None,
    max_new_tokens: int = 0,
    max_new_tokens_key: str = "rollout.max_new_tokens",
) -> PromptDataset:
    """Tokenize every row of a .jsonl or .parquet prompt file.

    A bad row (malformed JSON or a line that is not UTF-8, missing/mistyped field, empty
    prompt, prompt longer than `max_prompt_tokens`, or than the `max_positions` of the model
    less the `max_new_tokens` of a response) raises DataError naming file, line (jsonl, 1-based)
    or row (parquet, 0-based) and field; with on_invalid="skip" it is dropped and counted in
    `skipped` by reason. `max_new_tokens_key`: the config key the too-long message names.
    Prompts are never truncated. A plain-text prompt becomes a single user message when the
    tokenizer has a chat template and `apply_chat_template`; chat-message prompts need one.
    """
    path = os.fspath(path)
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if path.endswith(".jsonl"):
        rows = _iter_jsonl(path)
    elif path.endswith(".parquet"):
        rows = _iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported prompt file type (expected .jsonl or .parquet)")
    use_template = apply_chat_template and getattr(tokenizer, "chat_template", None) is not None

    dataset = PromptDataset(examples=[], source=path)
    for location, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError("malformed", f"row must be a JSON object, got {type(row).__name__}")
            prompt = _lookup(row, prompt_key)
            messages = _chat_messages(prompt, prompt_key)
            answer = _answer_text(row, answer_key)
            if messages is not None and not use_template:
                # A configuration problem, not a bad row: skipping would drop every row.
                raise DataError(
                    f"{path} {location}: field '{prompt_key}' holds chat messages, which need a "
                    "tokenizer chat template and apply_chat_template=True")
            if use_template:
                ids = tokenizer.apply_chat_template(
                    messages or [{"role": "user", "content": prompt}],
                    add_generation_prompt=True, tokenize=True, return_dict=False)
            else:
                ids = tokenizer.encode(prompt)
            if len(ids) > max_prompt_tokens:
                raise _RowError("too_long", f"field '{prompt_key}' is {len(ids)} tokens, over "
                                            f"max_prompt_tokens={max_prompt_tokens}")
            if max_positions is not None and len(ids) + max_new_tokens > max_positions:
                raise _RowError("too_long", f"field '{prompt_key}' is {len(ids)} tokens + "
                                            f"{max_new_tokens_key}={max_new_tokens} = "
                                            f"{len(ids) + max_new_tokens} positions, over "
                                            f"model.max_position_embeddings={max_positions}")
        except _RowError as e:
            if on_invalid == "error":
                raise DataError(f"{path} {location}: {e}") from None
            dataset.skipped[e.reason] += 1
            continue
        dataset.examples.append((list(ids), answer))
        dataset.locations.append(location)

    if dataset.skipped:
        logger.warning("%s: skipped %d invalid rows (%s); kept %d", path,
                       sum(dataset.skipped.values()),
                       ", ".join(f"{k}={v}" for k, v in sorted(dataset.skipped.items())),
                       len(dataset.examples))
    if not dataset.examples:
        raise DataError(f"{path}: no usable prompts")
    return dataset
