"""Typed job configuration: dataclasses per component, loaded from YAML with `key.sub=value`
command-line overrides, checked before any process group starts.

Each component owns its dataclass (models.config.ModelConfig, parallel.config.ParallelConfig, ...);
this module composes them into JobConfig and does the loading. Errors name the offending key by
its dotted path (`model.hidden_size`) and, for files, the file.
"""
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.data.config import DataConfig
from megatron_rl.errors import ConfigError, FieldError
from megatron_rl.models.config import ModelConfig
from megatron_rl.parallel.config import ParallelConfig
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.training.config import TrainingConfig


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-6 as a float (PyYAML's YAML 1.1 rules want 1.0e-6)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_YamlLoader)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self, world_size: int, on_this_host: bool = False) -> None:
        """Cross-component checks that need the world size (layout vs model shape, batch
        splits) or several sections (prompt + response vs the model's positions, the built-in
        tasks' vocabulary). on_this_host: also the checks that read this host (the tokenizer
        files' vocabulary, TransformerEngine for sequence parallelism); the entry points ask
        for them so every config error comes before any process group."""
        p, m = self.parallel, self.model
        p.resolve_data_parallel(world_size)
        if m.num_attention_heads % p.tensor_model_parallel_size:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}")
        groups = m.num_query_groups or m.num_attention_heads
        if groups % p.tensor_model_parallel_size:
            raise ConfigError(
                f"model.num_query_groups={groups} is not divisible by "
                f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}")
        if m.num_layers % p.pipeline_model_parallel_size:
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by "
                f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}")
        if self.data.task == "dataset" and self.training.sft_steps:
            raise ConfigError("training.sft_steps: the supervised warm start exists for the "
                              "built-in tasks only; set it to 0 with data.task=dataset")
        dp = p.data_parallel_size
        if self.rollout.prompts_per_step % dp:
            raise ConfigError(f"rollout.prompts_per_step={self.rollout.prompts_per_step} is not "
                              f"divisible by the data parallel size {dp}")
        sequences = self.rollout.prompts_per_step // dp * self.algorithm.n
        if sequences % self.training.mini_batches:
            raise ConfigError(
                f"rollout.prompts_per_step / DP x algorithm.n = {sequences} sequences per rank "
                f"is not divisible by training.mini_batches={self.training.mini_batches}")
        if p.sequence_parallel and p.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs "
                              "parallel.tensor_model_parallel_size > 1")
        if self.training.sft_steps and self.training.sft_batch_size % dp:
            raise ConfigError(f"training.sft_batch_size={self.training.sft_batch_size} is not "
                              f"divisible by the data parallel size {dp}")
        from megatron_rl.data.task import longest_prompt_tokens, task_vocab_size

        longest = longest_prompt_tokens(self.data)
        total = longest + self.rollout.max_new_tokens
        if total > m.max_position_embeddings:
            which = ("at least one prompt token" if self.data.task == "dataset" else
                     f"the longest data.task={self.data.task} prompt")
            raise ConfigError(
                f"rollout.max_new_tokens={self.rollout.max_new_tokens} + {longest} ({which}) "
                f"= {total} positions, over model.max_position_embeddings="
                f"{m.max_position_embeddings}")
        self._validate_evaluation()
        if self.data.task != "dataset" or on_this_host:
            vocab = task_vocab_size(self.data)
            if m.vocab_size < vocab:
                raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the "
                                  f"tokenizer's {vocab} (data.task={self.data.task})")
        if on_this_host:
            from megatron_rl.models.gpt import sequence_parallel_unsupported

            unsupported = sequence_parallel_unsupported(m, p)
            if unsupported:
                raise ConfigError(unsupported)

    def _validate_evaluation(self) -> None:
        """data.eval_sets against the model and reward sections; training.law_metric against
        the metrics the evaluation logs."""
        from megatron_rl.analysis.validation import eval_metric_keys
        from megatron_rl.rewards.pool import reward_fn_target

        positions = self.model.max_position_embeddings
        for index, entry in enumerate(self.data.eval_sets):
            key = f"data.eval_sets[{index}]"
            if entry.max_new_tokens is not None and entry.max_new_tokens + 1 > positions:
                raise ConfigError(
                    f"{key}.max_new_tokens={entry.max_new_tokens} + 1 (at least one prompt "
                    f"token) = {entry.max_new_tokens + 1} positions, over "
                    f"model.max_position_embeddings={positions}")
            if entry.reward is not None:
                try:
                    reward_fn_target(entry.reward, self.reward.allowed_modules)
                except (ValueError, PermissionError) as e:
                    raise ConfigError(f"{key}.reward: {e}") from None
        accuracies = [k for k in eval_metric_keys(self)
                      if not k.endswith(("/response_tokens", "/truncated"))]
        if self.training.law_metric not in accuracies:
            raise ConfigError(f"training.law_metric={self.training.law_metric!r} is not an "
                              f"accuracy this config logs; one of: {', '.join(accuracies)}")


# ---------------------------------------------------------------------------------------------
# Loading


def _aliases(cls) -> Dict[str, str]:
    """{alias: field name} from `dataclasses.field(metadata={"aliases": (...)})`."""
    out = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            out[alias] = f.name
    return out


def _type_name(tp) -> str:
    """How an error message names what a key accepts: "true/false or 'resample'", "a float or
    null"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(tp))
    names = {bool: "true/false", int: "an int", float: "a float", str: "a string",
             type(None): "null"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, List, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):  # YAML's .nan / .inf: no field means anything by them
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a nested mapping, rejecting unknown keys and wrong types."""
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = _aliases(cls)
    kwargs = {}
    for raw_key, value in data.items():
        key = aliases.get(raw_key, raw_key)
        dotted = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if key not in names:
            close = difflib.get_close_matches(str(raw_key), sorted(names | set(aliases)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        if key in kwargs:
            raise ConfigError(f"{dotted}: set twice (once through an alias)")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    for f in dataclasses.fields(cls):
        required = (f.init and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if required and f.name not in kwargs:
            raise ConfigError(f"{f'{prefix}.' if prefix else ''}{f.name} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as e:  # an entry of a list: its own key in front of the field's
        raise ConfigError(f"{where}.{e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """`["model.hidden_size=64", "parallel.sequence_parallel=true"]` -> nested dict.
    Values are parsed as YAML scalars, so 1e-6, true, null and [1, 2] mean what they look like."""
    tree: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item}: expected key.sub=value")
        dotted, raw = item.split("=", 1)
        if not dotted:
            raise ConfigError(f"override {item}: empty key")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item}: value is not valid YAML ({e})") from e
        _set_dotted(tree, dotted, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, data: dict, world_size: Optional[int], on_this_host: bool):
    cfg = from_dict(cls, data)
    if world_size is not None:
        cfg.validate(world_size, on_this_host=on_this_host)
    return cfg


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                world_size: Optional[int] = None, cls=JobConfig, on_this_host: bool = False):
    """Load `path` (YAML), apply overrides, build the dataclass and, given the world size,
    validate it (JobConfig.validate; on_this_host adds the checks that read this host).

    An error is the file's (`{path}: ...`) when the file alone has it; otherwise it is the
    override after which it first appears (`override key=value: ...`)."""
    data: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
    merged = _merge(data, parse_overrides(overrides))
    try:
        return _build(cls, merged, world_size, on_this_host)
    except ConfigError as e:
        error = str(e)
    # Replay the overrides one at a time from the file alone: the first source with this very
    # error is the one to blame (a file error an override fixes was never raised).
    for count in range(len(overrides) + 1):
        try:
            _build(cls, _merge(data, parse_overrides(overrides[:count])), world_size,
                   on_this_host)
        except Exception as e:  # a prefix may fail in other ways too: only a match counts
            if isinstance(e, ConfigError) and str(e) == error:
                break
    else:  # not reproduced source by source: blame no single one
        count = None
    if count:
        raise ConfigError(f"override {overrides[count - 1]}: {error}") from None
    raise ConfigError(f"{path}: {error}" if path and count == 0 else error) from None


def load_job_config(path: Optional[str], overrides: Sequence[str]):
    """What the entry points (train, evaluate) run: the config validated for this launch
    (WORLD_SIZE) and host, before any process group starts; None after printing the error
    ("config error: ...", naming the key) to stderr."""
    import os
    import sys

    try:
        return load_config(path, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                           on_this_host=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
