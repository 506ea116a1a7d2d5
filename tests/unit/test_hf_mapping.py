"""The HF <-> megatron mapping on random tensors (layouts written out independently here), the
config translation, and the refusals of the conversion library. Against transformers' own models:
tests/integration/test_convert_checkpoint.py."""
import json

import pytest
import torch

from megatron_rl.checkpointing.convert import (export_hf_checkpoint, import_hf_checkpoint,
                                               prepare_import)
from megatron_rl.models.config import ModelConfig
from megatron_rl.models.hf_mapping import (
    ConversionError, expected_hf_shapes, hf_config_from_model_config, hf_names,
    megatron_tensor_from_hf, megatron_to_hf_tensors, model_config_from_hf)

CFG = ModelConfig(arch="qwen2", num_layers=2, hidden_size=32, ffn_hidden_size=48,
                  num_attention_heads=4, num_query_groups=2, vocab_size=100,
                  tie_word_embeddings=False)


def random_hf_tensors(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g)
            for name, shape in expected_hf_shapes(cfg).items()}


def megatron_names(cfg, te_names=False):
    norms = (["self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"]
             if te_names else ["input_layernorm.weight", "pre_mlp_layernorm.weight"])
    suffixes = norms + ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                        "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if cfg.add_qkv_bias:
        suffixes.append("self_attention.linear_qkv.bias")
    if cfg.qk_layernorm:
        suffixes += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    names += [f"decoder.layers.{i}.{s}" for i in range(cfg.num_layers) for s in suffixes]
    return names + ([] if cfg.tie_word_embeddings else ["output_layer.weight"])


@pytest.mark.parametrize("te_names", [False, True])
@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("llama", True), ("qwen3", True)])
def test_hf_to_megatron_to_hf_is_the_identity(arch, tied, te_names):
    # qwen3 with a head dim (16) other than hidden / heads (8), as Qwen3 checkpoints have
    kv_channels = 16 if arch == "qwen3" else None
    cfg = ModelConfig(**{**CFG.__dict__, "arch": arch, "tie_word_embeddings": tied,
                         "kv_channels": kv_channels})
    hf = random_hf_tensors(cfg)
    assert ("model.layers.1.self_attn.q_norm.weight" in hf) == (arch == "qwen3")
    back = {}
    for name in megatron_names(cfg, te_names):
        full = megatron_tensor_from_hf(name, hf.__getitem__, cfg)
        if full.shape[0] == cfg.vocab_size:  # what the converter does: zero padding rows
            full = torch.cat([full, full.new_zeros(cfg.padded_vocab_size(2) - len(full),
                                                   *full.shape[1:])])
        back.update(megatron_to_hf_tensors("module.module." + name, full, cfg))
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_fused_layouts_are_megatrons():
    hf = random_hf_tensors(CFG)
    p = "model.layers.1."
    qkv = megatron_tensor_from_hf("decoder.layers.1.self_attention.linear_qkv.weight",
                                  hf.__getitem__, CFG)
    # per query group g: its 2 query heads, then its key head, then its value head (head dim 8)
    q, k, v = (hf[p + f"self_attn.{x}_proj.weight"].view(-1, 8, 32) for x in "qkv")
    want = torch.cat([torch.cat([q[2 * g], q[2 * g + 1], k[g], v[g]]) for g in range(2)])
    assert torch.equal(qkv, want)
    bias = megatron_tensor_from_hf("decoder.layers.1.self_attention.linear_qkv.bias",
                                   hf.__getitem__, CFG)
    qb, kb, vb = (hf[p + f"self_attn.{x}_proj.bias"].view(-1, 8) for x in "qkv")
    assert torch.equal(bias, torch.cat([qb[0], qb[1], kb[0], vb[0], qb[2], qb[3], kb[1], vb[1]]))
    fc1 = megatron_tensor_from_hf("decoder.layers.1.mlp.linear_fc1.weight", hf.__getitem__, CFG)
    assert torch.equal(fc1, torch.cat([hf[p + "mlp.gate_proj.weight"],
                                       hf[p + "mlp.up_proj.weight"]]))
    embedding = megatron_tensor_from_hf("embedding.word_embeddings.weight", hf.__getitem__, CFG)
    assert torch.equal(embedding, hf["model.embed_tokens.weight"])  # padding: the converter's


def test_tied_output_layer_is_not_exported_and_imports_the_embedding():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    hf = random_hf_tensors(cfg)
    assert "lm_head.weight" not in hf
    assert megatron_to_hf_tensors("output_layer.weight", torch.zeros(128, 32), cfg) == []
    out = megatron_tensor_from_hf("output_layer.weight", hf.__getitem__, cfg)
    assert torch.equal(out, hf["model.embed_tokens.weight"])


def test_config_round_trip_and_rope_settings():
    qwen3 = ModelConfig(arch="qwen3", num_layers=2, hidden_size=64, num_attention_heads=4,
                        num_query_groups=2, kv_channels=32, rotary_base=1e6)
    for cfg in (CFG, qwen3, ModelConfig(arch="llama", num_layers=3, hidden_size=64,
                                        num_attention_heads=4, num_query_groups=1, kv_channels=32,
                                        rotary_base=5e5, rope_scaling_factor=8.0,
                                        tie_word_embeddings=False, params_dtype="bfloat16")):
        assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg
    hf = hf_config_from_model_config(qwen3)
    assert (hf["architectures"], hf["model_type"], hf["head_dim"], hf["attention_bias"]) == (
        ["Qwen3ForCausalLM"], "qwen3", 32, False)
    # transformers v5 spelling
    v5 = {**hf_config_from_model_config(CFG), "rope_parameters": {"rope_type": "default",
                                                                  "rope_theta": 1e6}}
    del v5["rope_theta"], v5["rope_scaling"]
    assert model_config_from_hf(v5).rotary_base == 1e6


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]},
     "supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "low_freq_factor=2.0"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 5},
     "num_attention_heads=5 is not divisible by model.num_query_groups"),
])
def test_config_refusals_name_the_field(change, message):
    with pytest.raises(ConversionError, match="my/config.json") as excinfo:
        model_config_from_hf({**hf_config_from_model_config(CFG), **change}, "my/config.json")
    assert message in str(excinfo.value)


def test_unknown_megatron_name_is_refused():
    with pytest.raises(ConversionError, match="decoder.layers.0.mlp.router.weight"):
        hf_names("decoder.layers.0.mlp.router.weight", CFG)
    with pytest.raises(ConversionError, match="model.arch=qwen2 has no q/k norm"):
        hf_names("decoder.layers.0.self_attention.q_layernorm.weight", CFG)


def write_hf_folder(directory, cfg, tensors, index=None):
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config_from_model_config(cfg)))
    save_file(tensors, str(directory / "model-00001-of-00001.safetensors"))
    if index is not None:
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_import_refusals(tmp_path, monkeypatch):
    hf = random_hf_tensors(CFG)
    good = tmp_path / "good"
    write_hf_folder(good, CFG, hf)
    prepare_import(str(good), str(tmp_path / "out"), tp=2, pp=2)  # fits
    with pytest.raises(ConversionError, match="model.num_layers=2 is not divisible by "
                                              "parallel.pipeline_model_parallel_size=3"):
        prepare_import(str(good), str(tmp_path / "out"), tp=1, pp=3)
    with pytest.raises(ConversionError, match="num_attention_heads=4 is not divisible by "
                                              "parallel.tensor_model_parallel_size=8"):
        prepare_import(str(good), str(tmp_path / "out"), tp=8, pp=1)
    with pytest.raises(ConversionError, match="exists and is not an empty directory"):
        prepare_import(str(good), str(good), tp=1, pp=1)
    with monkeypatch.context() as env:  # launched with torchrun: it needs no ranks
        env.setenv("WORLD_SIZE", "4")
        with pytest.raises(ConversionError, match="runs in one process whatever --tp/--pp"):
            import_hf_checkpoint(str(good), str(tmp_path / "out"), tp=2, pp=2)

    index = {"weight_map": {**{n: "model-00001-of-00002.safetensors" for n in hf},
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    missing_shard = tmp_path / "missing_shard"
    write_hf_folder(missing_shard, CFG, hf, index)
    with pytest.raises(ConversionError, match="missing: model-00001-of-00002.safetensors, "
                                              "model-00002-of-00002.safetensors"):
        prepare_import(str(missing_shard), str(tmp_path / "out"), tp=1, pp=1)

    wrong_shape = tmp_path / "wrong_shape"
    write_hf_folder(wrong_shape, CFG,
                    {**hf, "model.layers.1.mlp.up_proj.weight": torch.zeros(40, 32)})
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight has shape "
                                              r"\(40, 32\), the config implies \(48, 32\)"):
        prepare_import(str(wrong_shape), str(tmp_path / "out"), tp=1, pp=1)

    missing_tensor = tmp_path / "missing_tensor"
    write_hf_folder(missing_tensor, CFG, {n: t for n, t in hf.items() if n != "lm_head.weight"})
    with pytest.raises(ConversionError, match="tensors missing from the safetensors shards: "
                                              "lm_head.weight"):
        prepare_import(str(missing_tensor), str(tmp_path / "out"), tp=1, pp=1)

    extra = tmp_path / "extra"
    write_hf_folder(extra, CFG, {**hf, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(ConversionError, match="no place for: model.layers.0.self_attn.q_norm"):
        prepare_import(str(extra), str(tmp_path / "out"), tp=1, pp=1)


def test_export_refusals(tmp_path):
    with pytest.raises(ConversionError, match="model_config.yaml: not found"):
        export_hf_checkpoint(str(tmp_path), str(tmp_path / "hf"))
    (tmp_path / "model_config.yaml").write_text("num_layers: 2\n")
    with pytest.raises(ConversionError, match="not a megatron torch_dist checkpoint"):
        export_hf_checkpoint(str(tmp_path), str(tmp_path / "hf"))
