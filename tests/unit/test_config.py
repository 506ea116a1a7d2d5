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
