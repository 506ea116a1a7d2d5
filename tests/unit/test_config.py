import textwrap

import pytest

from megatron_rl.config import ConfigError, JobConfig, load_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, """
        model:
          hidden_size: 128
          num_attention_heads: 8
        training:
          lr: 1e-6
    """)
    cfg = load_config(path, ["model.num_layers=4", "parallel.tensor_model_parallel_size=2",
                             "training.lr=2e-6"], world_size=4)
    assert isinstance(cfg, JobConfig)
    assert cfg.model.hidden_size == 128 and cfg.model.num_layers == 4
    assert cfg.training.lr == 2e-6  # override wins; 1e-6 style floats parse as floats
    assert cfg.parallel.data_parallel_size == 2


@pytest.mark.parametrize("value, parsed", [("true", True), ("false", False),
                                           ("resample", "resample")])
def test_filter_equal_groups_is_a_switch_or_resample(value, parsed):
    assert load_config(None, [f"algorithm.filter_equal_groups={value}"],
                       world_size=1).algorithm.filter_equal_groups == parsed


def test_int_is_accepted_for_float():
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "unknown config key 'model.hiden_size' (did you mean 'hidden_size'?)"),
    ("modle.hidden_size=64", "unknown config key 'modle'"),
    ("model.hidden_size=abc", "model.hidden_size: expected an int, got str 'abc'"),
    ("model.hidden_size=1.5", "model.hidden_size: expected an int"),
    ("parallel.sequence_parallel=3", "parallel.sequence_parallel: expected true/false"),
    ("model.arch=gpt2", "model.arch: 'gpt2' is not one of ['qwen2', 'llama', 'qwen3']"),
    ("model.num_layers=-1", "model.num_layers must be positive"),
    ("algorithm.filter_equal_groups=mask",
     "algorithm.filter_equal_groups: expected true/false or 'resample', got 'mask'"),
    ("algorithm.filter_equal_groups=1",
     "algorithm.filter_equal_groups: expected true/false or 'resample', got 1"),
    ("algorithm.dual_clip_c=abc", "algorithm.dual_clip_c: expected a float or null, got 'abc'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor_model_parallel_size=3"], 4, "does not divide the world size 4"),
    (["parallel.tensor_model_parallel_size=2", "parallel.data_parallel_size=1"], 4,
     "parallel.data_parallel_size=1 = 2 != world size 4"),
    (["parallel.tensor_model_parallel_size=8", "model.num_attention_heads=4"], 8,
     "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=8"),
    (["parallel.tensor_model_parallel_size=4", "model.num_query_groups=2"], 4,
     "model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4"),
    (["parallel.pipeline_model_parallel_size=2", "model.num_layers=3"], 2,
     "model.num_layers=3 is not divisible by parallel.pipeline_model_parallel_size=2"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs"),
])
def test_impossible_layouts(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, world_size=world)
    assert message in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="job.yaml: unknown config key 'training.stepz'"):
        load_config(write(tmp_path, "training:\n  stepz: 3\n"))
    with pytest.raises(ConfigError, match="job.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_override_errors_name_the_override_and_file_errors_the_file(tmp_path):
    good = write(tmp_path, "training:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(good, ["model.num_layers=4", "training.lr=abc"])
    assert str(e.value) == ("override training.lr=abc: training.lr: expected a float, "
                            "got str 'abc'")
    with pytest.raises(ConfigError, match=r"^override training.stepz=3: unknown config key"):
        load_config(good, ["training.stepz=3"])
    # the error comes with the override that makes the config impossible
    with pytest.raises(ConfigError, match=r"^override parallel.tensor_model_parallel_size=8: "
                                          r"model.num_attention_heads=4 is not divisible"):
        load_config(good, ["model.num_attention_heads=4",
                           "parallel.tensor_model_parallel_size=8"], world_size=8)
    # a bad value in the file stays the file's, whatever the overrides
    bad = write(tmp_path, "training:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"^\S*job.yaml: training.lr: expected a float"):
        load_config(bad, ["model.num_layers=4"])
    # ... unless an override replaces it
    assert load_config(bad, ["training.lr=2e-3"]).training.lr == 2e-3
    # no file: the override still says it is one
    with pytest.raises(ConfigError, match=r"^override model.num_layers=-1: model: "):
        load_config(None, ["model.num_layers=-1"])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null"]) == {"a": {"b": 1, "c": [1, 2]},
                                                                  "d": None}
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["model.hidden_size"])


def test_aliases_map_to_fields():
    import dataclasses

    from megatron_rl.config import from_dict

    @dataclasses.dataclass
    class WithAlias:
        r: float = 2e-4
        beta: float = dataclasses.field(default=1.0, metadata={"aliases": ("ppo_kl_coef",)})

    assert from_dict(WithAlias, {"ppo_kl_coef": 0.5}).beta == 0.5
    with pytest.raises(ConfigError, match="set twice"):
        from_dict(WithAlias, {"ppo_kl_coef": 0.5, "beta": 1.0})


def test_lists_of_dataclasses_name_their_entries():
    import dataclasses
    from typing import List

    from megatron_rl.config import from_dict
    from megatron_rl.errors import FieldError, check_range

    @dataclasses.dataclass
    class Entry:
        name: str
        size: int = 1

        def __post_init__(self):
            check_range(None, self, "size", 1)
            if self.name == "x":
                raise FieldError("name 'x' is not allowed")

    @dataclasses.dataclass
    class Section:
        entries: List[Entry] = dataclasses.field(default_factory=list)

    section = from_dict(Section, {"entries": [{"name": "a"}, {"name": "b", "size": 3}]}, "s")
    assert section.entries == [Entry("a"), Entry("b", 3)]
    for entries, message in [
            ([{"name": "a"}, {"size": 2}], "s.entries[1].name is required"),
            ([{"name": "a", "sise": 2}], "unknown config key 's.entries[0].sise'"),
            ([{"name": "a", "size": "2"}], "s.entries[0].size: expected an int, got str '2'"),
            ([{"name": "a"}, {"name": "b", "size": 0}], "s.entries[1].size must be >= 1, got 0"),
            ([{"name": "x"}], "s.entries[0].name 'x' is not allowed"),
            ([["a"]], "s.entries[0]: expected a mapping")]:
        with pytest.raises(ConfigError) as e:
            from_dict(Section, {"entries": entries}, "s")
        assert str(e.value).startswith(message), str(e.value)


def test_padded_vocab():
    cfg = load_config(None, ["model.vocab_size=151936", "model.make_vocab_size_divisible_by=128"])
    assert cfg.model.padded_vocab_size(1) == 151936
    assert cfg.model.padded_vocab_size(8) == 152576


def test_algorithm_section_accepts_verl_names():
    cfg = load_config(None, ["algorithm.loss_mode=kl_cov", "algorithm.kl_cov_ratio=2e-4",
                             "algorithm.ppo_kl_coef=0.5", "algorithm.clip_cov_lb=0.5"])
    assert (cfg.algorithm.k, cfg.algorithm.beta, cfg.algorithm.omega_low) == (2e-4, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"algorithm: r \(clip_cov_ratio\) must be in \(0, 1\)"):
        load_config(None, ["algorithm.clip_cov_ratio=2"])


def test_sglang_host_names_an_interface_or_an_address():
    import psutil

    from megatron_rl.rollout.sglang_server import bind_address

    loopback = next(name for name, addrs in psutil.net_if_addrs().items()
                    if any(a.address == "127.0.0.1" for a in addrs))
    assert bind_address(loopback) == "127.0.0.1"  # an interface resolves to its IPv4 address
    assert bind_address("10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize("override, message", [
    # each was accepted and failed later: a ZeroDivisionError after step 1, a stop after the
    # first step, a sampler with nothing to draw from, an accuracy of 0 over no prompts
    ("training.log_interval=0", "training.log_interval must be >= 1, got 0"),
    ("training.max_nonfinite_steps=0", "training.max_nonfinite_steps must be >= 1, got 0"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_k=0", "rollout.top_k must be >= 1 (or -1: no top-k), got 0"),
    ("data.eval_prompts=0", "data.eval_prompts must be >= 1, got 0 (training.eval_interval=0 "
                            "turns evaluation off)"),
])
def test_values_that_failed_later_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tests/configs/tiny_addition.yaml", [override], world_size=1)
    assert str(e.value).startswith(f"override {override}: ") and message in str(e.value)


@pytest.mark.parametrize("task, longest", [(["data.task=addition", "data.digits=1"], 5),
                                           (["data.task=addition", "data.digits=3"], 9),
                                           (["data.task=clock_walk", "data.walk_digits=4"], 8),
                                           (["data.task=clock_walk", "data.walk_digits=8"], 12)])
def test_max_new_tokens_beyond_the_models_positions_is_refused(task, longest):
    from megatron_rl.data.task import build_task, longest_prompt_tokens

    cfg = load_config(None, task + ["model.max_position_embeddings=64",
                                    f"rollout.max_new_tokens={64 - longest}"], world_size=1)
    assert longest_prompt_tokens(cfg.data) == longest
    task_prompts = build_task(cfg).prompts_for_step
    assert max(len(ids) for step in range(20) for ids, _ in task_prompts(step, 64)) == longest
    with pytest.raises(ConfigError) as e:
        load_config(None, task + ["model.max_position_embeddings=64",
                                  f"rollout.max_new_tokens={65 - longest}"], world_size=1)
    name = task[0].split("=")[1]
    assert str(e.value) == (
        f"override rollout.max_new_tokens={65 - longest}: rollout.max_new_tokens="
        f"{65 - longest} + {longest} (the longest data.task={name} prompt) = 65 positions, "
        f"over model.max_position_embeddings=64")


def test_max_new_tokens_leaves_the_dataset_task_a_prompt_token(tmp_path):
    dataset = ["data.task=dataset", f"data.path={tmp_path}/x.jsonl",
               f"data.tokenizer_dir={tmp_path}", "training.sft_steps=0",
               "model.max_position_embeddings=64"]
    load_config(None, dataset + ["rollout.max_new_tokens=63"], world_size=1)
    with pytest.raises(ConfigError, match=r"max_new_tokens=64 \+ 1 \(at least one prompt token"):
        load_config(None, dataset + ["rollout.max_new_tokens=64"], world_size=1)


def test_sft_batch_splits_over_data_parallel_ranks():
    load_config(None, ["training.sft_steps=10", "training.sft_batch_size=6"], world_size=2)
    with pytest.raises(ConfigError, match="training.sft_batch_size=6 is not divisible by the "
                                          "data parallel size 4"):
        load_config(None, ["training.sft_steps=10", "training.sft_batch_size=6"], world_size=4)
    load_config(None, ["training.sft_steps=0", "training.sft_batch_size=6"], world_size=4)


def test_warm_start_rate_below_min_lr_is_no_error():
    from megatron_rl.training.sft import sft_training_config

    t = load_config(None, ["training.min_lr=1e-3", "training.lr=2e-3", "training.sft_lr=1e-4",
                           "training.sft_steps=5", "training.lr_decay_style=cosine"]).training
    assert sft_training_config(t).lr == 1e-4


# Every numeric config field with a value clearly out of its range (several where the range has
# two ends or a cross-field bound). A new numeric field fails test_every_numeric_field_is_listed
# until it is listed here, and then the next test until it has a check.
OUT_OF_RANGE = {
    "model.num_layers": [0], "model.hidden_size": [0], "model.ffn_hidden_size": [0],
    "model.num_attention_heads": [0], "model.num_query_groups": [0, 3],
    "model.kv_channels": [0], "model.vocab_size": [0], "model.make_vocab_size_divisible_by": [0],
    "model.max_position_embeddings": [0, 8], "model.rotary_base": [0],
    "model.rope_scaling_factor": [0, 0.5], "model.norm_epsilon": [0],
    "model.init_method_std": [0], "model.attention_dropout": [-0.1, 1],
    "model.hidden_dropout": [-0.1, 1],
    "parallel.tensor_model_parallel_size": [0], "parallel.pipeline_model_parallel_size": [0],
    "parallel.context_parallel_size": [0], "parallel.data_parallel_size": [0],
    "parallel.timeout_minutes": [0], "parallel.seed": [-1, 2 ** 32],
    "training.steps": [0], "training.micro_batch_size": [0], "training.seq_length": [0],
    "training.lr": [-1e-3], "training.min_lr": [-1e-5, 1], "training.lr_warmup_steps": [-1, 21],
    "training.weight_decay": [-0.1], "training.adam_beta1": [-0.1, 1],
    "training.adam_beta2": [-0.1, 1], "training.adam_eps": [0], "training.clip_grad": [-1],
    "training.seed": [-1, 2 ** 32], "training.log_interval": [0], "training.mini_batches": [0],
    "training.ppo_epochs": [0], "training.eval_interval": [-1], "training.eval_avg_k": [-1],
    "training.eval_temperature": [0], "training.probe_interval": [-1],
    "training.checkpoint_interval": [-1], "training.keep_checkpoints": [0],
    "training.max_nonfinite_steps": [0], "training.sft_steps": [-1], "training.sft_lr": [-1],
    "training.sft_batch_size": [0], "training.divergence_steps": [-1],
    "training.divergence_grad_norm_ratio": [-1], "training.divergence_entropy_jump": [-0.5],
    "algorithm.n": [0], "algorithm.gamma": [-0.1, 1.5], "algorithm.lam": [-0.1, 1.5],
    "algorithm.eps_low": [-0.1, 1.5], "algorithm.eps_high": [-0.1],
    "algorithm.dual_clip_c": [1], "algorithm.r": [0, 1], "algorithm.omega_low": [6],
    "algorithm.omega_high": [0.5], "algorithm.k": [0, 1], "algorithm.beta": [-1],
    "algorithm.seed": [-1, 2 ** 32], "algorithm.rollout_is_cap": [0.5],
    "algorithm.entropy_coef": [-0.01], "algorithm.kl_ref_coef": [-0.01],
    "algorithm.resample_max_rounds": [0, -1],
    "rollout.prompts_per_step": [0], "rollout.temperature": [0], "rollout.top_p": [0, 1.5],
    "rollout.top_k": [0, -2], "rollout.max_new_tokens": [0, 512], "rollout.seed": [-1, 2 ** 32],
    "rollout.sglang.engines_per_node": [0], "rollout.sglang.tp_size": [0],
    "rollout.sglang.mem_fraction_static": [0, 1], "rollout.sglang.max_total_tokens": [0],
    "rollout.sglang.bucket_mb": [0], "rollout.sglang.startup_timeout_s": [0],
    "rollout.sglang.request_timeout_s": [0], "rollout.sglang.max_restarts": [-1],
    "data.max_prompt_tokens": [0], "data.digits": [0, 7], "data.walk_steps": [1, 9],
    "data.walk_digits": [1, 9], "data.walk_slip": [-0.1, 1.5], "data.seed": [-1, 2 ** 32],
    "data.eval_prompts": [0], "data.eval_seed": [-1, 2 ** 32],
    "reward.workers": [0], "reward.timeout_s": [0], "reward.memory_limit_mb": [0],
    "reward.min_value": [-1e31], "reward.max_value": [-1, -2],
}


def numeric_fields(cls=JobConfig, prefix=""):
    """(dotted key, is a float) of every int / float / Optional[int or float] field."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{key}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if args[0] in (int, float):
            yield key, args[0] is float


def names_the_key(message, key):
    section, name = key.rsplit(".", 1)
    return key in message or f"{section}: {name} " in message  # algorithm: r (clip_cov_ratio)


def test_every_numeric_field_is_listed():
    keys = [key for key, _ in numeric_fields()]
    assert sorted(set(keys) - set(OUT_OF_RANGE)) == []
    assert sorted(set(OUT_OF_RANGE) - set(keys)) == []


@pytest.mark.parametrize("key, value", [(k, v) for k, values in OUT_OF_RANGE.items()
                                        for v in values])
def test_out_of_range_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"], world_size=1)
    assert names_the_key(str(e.value), key), str(e.value)
    assert str(e.value).startswith(f"override {key}={value}: ")


@pytest.mark.parametrize("key", [k for k, is_float in numeric_fields() if is_float])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"], world_size=1)
    assert names_the_key(str(e.value), key), str(e.value)


@pytest.mark.parametrize("overrides", [
    ["rollout.top_k=-1"], ["rollout.top_k=1"], ["rollout.top_p=1"], ["rollout.top_p=0.01"],
    ["training.eval_interval=0"], ["training.checkpoint_interval=0"], ["training.lr=0"],
    ["training.lr_warmup_steps=19", "training.lr_decay_style=cosine"],
    ["training.lr_warmup_steps=20"], ["training.min_lr=1e-3"], ["training.max_nonfinite_steps=1"],
    ["training.log_interval=1"], ["model.max_position_embeddings=15", "rollout.max_new_tokens=8"],
    ["rollout.sglang.mem_fraction_static=0.85"], ["reward.memory_limit_mb=null"],
    ["model.rope_scaling_factor=8"], ["algorithm.omega_low=-1"], ["parallel.seed=0"],
])
def test_values_at_the_edges_are_accepted(overrides):
    load_config(None, overrides, world_size=1)


# -- data.eval_sets ----------------------------------------------------------------------------

DATASET = ["data.task=dataset", "data.path=train.jsonl", "data.tokenizer_dir=tokenizer",
           "training.sft_steps=0"]


def eval_sets_override(*entries):
    return "data.eval_sets=[" + ", ".join("{" + e + "}" for e in entries) + "]"


# Every numeric field of a data.eval_sets entry with values out of its range, as OUT_OF_RANGE
# for the sections (an entry has no key of its own for key=value overrides, so the values go in
# through a whole data.eval_sets=[...] override and the error names data.eval_sets[0].<field>).
EVAL_SET_OUT_OF_RANGE = {
    "temperature": [-0.1], "samples": [0, -1], "top_p": [0, 1.5], "max_new_tokens": [0, 512],
    "weight": [-1], "max_prompts": [0],
}


def test_every_numeric_eval_set_field_is_listed():
    import dataclasses
    import typing

    from megatron_rl.data.config import EvalSetConfig

    keys = [key for key, _ in numeric_fields(EvalSetConfig)]
    assert sorted(keys) == sorted(EVAL_SET_OUT_OF_RANGE)

    def list_fields(cls, prefix=""):  # every list of dataclasses in JobConfig
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from list_fields(tp, f"{prefix}{f.name}.")
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(
                    typing.get_args(tp)[0]):
                yield f"{prefix}{f.name}", typing.get_args(tp)[0]

    assert dict(list_fields(JobConfig)) == {"data.eval_sets": EvalSetConfig}


@pytest.mark.parametrize("field, value", [(k, v) for k, values in EVAL_SET_OUT_OF_RANGE.items()
                                          for v in values])
def test_out_of_range_eval_set_values_are_refused_naming_the_key(field, value):
    extra = ", temperature: 1" if field == "samples" else ""
    override = eval_sets_override("name: a, path: a.jsonl", f"name: b, path: b.parquet, "
                                                             f"{field}: {value}{extra}")
    with pytest.raises(ConfigError) as e:
        load_config(None, DATASET + [override], world_size=1)
    assert str(e.value).startswith(f"override {override}: data.eval_sets[1].{field}"), \
        str(e.value)


@pytest.mark.parametrize("field", [k for k, is_float in numeric_fields(
    __import__("megatron_rl.data.config", fromlist=["EvalSetConfig"]).EvalSetConfig) if is_float])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_eval_set_floats_are_refused(field, value):
    with pytest.raises(ConfigError, match=rf"data\.eval_sets\[0\]\.{field}: expected a finite"):
        load_config(None, DATASET + [eval_sets_override(f"name: a, path: a.jsonl, "
                                                        f"{field}: {value}")], world_size=1)


def test_eval_sets_schema():
    cfg = load_config(None, DATASET + [eval_sets_override(
        "name: aime-24, path: aime.parquet, temperature: 0.6, samples: 32, weight: 2",
        "name: math_500.v1, path: math.jsonl, prompt_key: problem, max_prompts: 100, "
        "max_new_tokens: 64, reward: math")], world_size=1)
    aime, math_set = cfg.data.eval_sets
    assert (aime.name, aime.temperature, aime.samples, aime.top_p, aime.weight) == (
        "aime-24", 0.6, 32, 1.0, 2.0)
    assert (aime.prompt_key, aime.answer_key, aime.max_new_tokens, aime.reward,
            aime.max_prompts) == (None, None, None, None, None)
    assert (math_set.prompt_key, math_set.max_prompts, math_set.max_new_tokens,
            math_set.reward) == ("problem", 100, 64, "math")
    from megatron_rl.analysis.validation import eval_metric_keys

    assert eval_metric_keys(cfg) == [
        "eval/aime-24/accuracy", "eval/aime-24/pass@32", "eval/aime-24/response_tokens",
        "eval/aime-24/truncated", "eval/math_500.v1/accuracy", "eval/math_500.v1/pass@1",
        "eval/math_500.v1/response_tokens", "eval/math_500.v1/truncated", "eval/mean/accuracy",
        "eval_accuracy"]


@pytest.mark.parametrize("overrides, message", [
    ([eval_sets_override("path: a.jsonl")], "data.eval_sets[0].name is required"),
    ([eval_sets_override("name: a")], "data.eval_sets[0].path is required"),
    ([eval_sets_override("name: a, path: a.jsonl", "name: b, path: b.jsonl, tempreture: 1")],
     "unknown config key 'data.eval_sets[1].tempreture' (did you mean 'temperature'?)"),
    ([eval_sets_override("name: a, path: a.jsonl, samples: 1.5")],
     "data.eval_sets[0].samples: expected an int"),
    ([eval_sets_override("name: a, path: a.jsonl", "name: a, path: b.jsonl")],
     "data.eval_sets[1].name 'a' is already the name of data.eval_sets[0]"),
    ([eval_sets_override("name: a b, path: a.jsonl")],
     "data.eval_sets[0].name must be letters, digits"),
    ([eval_sets_override("name: mean, path: a.jsonl")],
     "data.eval_sets[0].name 'mean' is taken by eval/mean/accuracy"),
    ([eval_sets_override("name: a, path: a.csv")],
     "data.eval_sets[0].path must be a .jsonl or .parquet file"),
    ([eval_sets_override("name: a, path: a.jsonl, samples: 4")],
     "data.eval_sets[0].samples must be 1 when temperature is 0"),
    ([eval_sets_override("name: a, path: a.jsonl, weight: 0")],
     "data.eval_sets: every weight is 0"),
    ([eval_sets_override("name: a, path: a.jsonl, reward: evil.module:fn")],
     "data.eval_sets[0].reward: reward function 'evil.module:fn': module 'evil.module' is not "
     "in reward.allowed_modules"),
    ([eval_sets_override("name: a, path: a.jsonl, reward: 'math:'")],
     "data.eval_sets[0].reward: reward function 'math:': expected"),
    (["model.max_position_embeddings=64", eval_sets_override(
        "name: a, path: a.jsonl, max_new_tokens: 64")],
     "data.eval_sets[0].max_new_tokens=64 + 1 (at least one prompt token) = 65 positions, over "
     "model.max_position_embeddings=64"),
    (["data.eval_disjoint=true"], "data.eval_disjoint=true needs data.eval_sets"),
    ([eval_sets_override("name: a, path: a.jsonl"), "training.law_metric=eval/b/accuracy"],
     "training.law_metric='eval/b/accuracy' is not an accuracy this config logs; one of: "
     "eval/a/accuracy, eval/a/pass@1, eval/mean/accuracy, eval_accuracy"),
    ([eval_sets_override("name: a, path: a.jsonl"), "training.law_metric=eval/a/truncated"],
     "training.law_metric='eval/a/truncated' is not an accuracy"),
])
def test_eval_set_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, DATASET + overrides, world_size=1)
    assert message in str(e.value), str(e.value)


def test_eval_sets_need_the_dataset_task_and_law_metrics_follow_the_held_out_set():
    with pytest.raises(ConfigError, match=r"data.eval_sets needs data.task=dataset"):
        load_config(None, [eval_sets_override("name: a, path: a.jsonl")], world_size=1)
    from megatron_rl.analysis.validation import eval_metric_keys

    cfg = load_config(None, ["training.eval_avg_k=4", "training.law_metric=eval_avg@4"],
                      world_size=1)
    assert eval_metric_keys(cfg) == [
        "eval/heldout/accuracy", "eval/heldout/pass@1", "eval/heldout/response_tokens",
        "eval/heldout/truncated", "eval_accuracy", "eval/heldout_sampled/accuracy",
        "eval/heldout_sampled/pass@4", "eval/heldout_sampled/response_tokens",
        "eval/heldout_sampled/truncated", "eval_avg@4"]
    with pytest.raises(ConfigError, match="training.law_metric='eval_avg@8' is not an accuracy"):
        load_config(None, ["training.eval_avg_k=4", "training.law_metric=eval_avg@8"],
                    world_size=1)
