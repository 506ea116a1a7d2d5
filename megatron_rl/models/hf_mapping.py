"""The one name and layout mapping between megatron-core GPT weights and Hugging Face
Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM weights, plus ModelConfig <-> HF config.json.

Checkpoint conversion (megatron_rl.checkpointing.convert) and weight sync to SGLang both go through
`megatron_to_hf_tensors` (and its inverse `megatron_tensor_from_hf`), so the two cannot drift apart.

Megatron names are full (TP-gathered) tensors with global layer indices, as produced by
megatron_rl.parallel.gather.named_full_tensors; both the local-spec names
(decoder.layers.i.input_layernorm.weight) and the TransformerEngine names, where the norms are
fused into the next linear (decoder.layers.i.self_attention.linear_qkv.layer_norm_weight), are
accepted. Layouts:
  - linear_qkv: per query group [q heads of the group; k; v] rows (see tests/unit/test_model.py);
    HF keeps q_proj, k_proj, v_proj separate.
  - linear_fc1: [gate; up] rows; HF keeps gate_proj, up_proj separate.
  - Qwen3's q_norm / k_norm: megatron's q_layernorm / k_layernorm, one head_dim weight shared by
    all heads, the same tensor on both sides (replicated over TP, never split).
  - word embeddings / output layer: vocab padded to ModelConfig.padded_vocab_size(tp) rows; HF has
    exactly vocab_size rows. Padding rows are dropped on export; on import they are zero and left
    to the caller (the converter writes them as their own block, so that the largest tensors are
    never copied to pad them).
"""
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_rl.models.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the file or field."""


ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                 "Qwen3ForCausalLM": "qwen3"}
# Megatron's Llama-3 RoPE scaling (RotaryEmbedding._apply_scaling) fixes all but the factor.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
_DTYPE_NAMES = {"float32", "bfloat16", "float16"}

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron per-layer suffix (both layer-spec spellings) -> the HF suffix(es) inside model.layers.i.
_LAYER_SUFFIXES = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                       "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
_GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_settings(hf: dict, source: str) -> Tuple[float, Optional[float]]:
    """(rope theta, Llama-3 scaling factor or None) from transformers v5 `rope_parameters` or
    the v4 `rope_theta` + `rope_scaling` that most hub checkpoints still carry."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"{source}: RoPE scaling type {rope_type!r} is not supported "
                              f"(only 'default' and 'llama3')")
    for key, fixed in _LLAMA3_ROPE_FIXED.items():
        if key in params and float(params[key]) != fixed:
            raise ConversionError(f"{source}: rope {key}={params[key]} differs from {fixed}, "
                                  f"the only value megatron-core's Llama-3 RoPE scaling supports")
    return float(theta), float(params["factor"])


def model_config_from_hf(hf: dict, source: str = "config.json",
                         make_vocab_size_divisible_by: int = 128,
                         params_dtype: Optional[str] = None) -> ModelConfig:
    """ModelConfig for an HF config.json dict; refuses what the megatron model cannot express."""
    architectures = hf.get("architectures") or []
    if len(architectures) != 1:
        raise ConversionError(f"{source}: 'architectures' must name exactly one class, "
                              f"got {architectures}")
    architecture = architectures[0]
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"{source}: architecture {architecture} is not supported "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    arch = ARCHITECTURES[architecture]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError(f"{source}: attention_bias/mlp_bias are not supported for "
                              f"{architecture}")
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = _rope_settings(hf, source)
    dtype = params_dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPE_NAMES:
        raise ConversionError(f"{source}: dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
    try:
        return ModelConfig(
            arch=arch,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim * heads != hidden else None,
            vocab_size=hf["vocab_size"],
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            max_position_embeddings=hf["max_position_embeddings"],
            rotary_base=theta,
            rope_scaling_factor=scaling,
            norm_epsilon=hf["rms_norm_eps"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            params_dtype=dtype,
        )
    except KeyError as e:
        raise ConversionError(f"{source}: required field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """config.json for a model that has no original HF config (e.g. trained from scratch).
    Written in the transformers v4 spelling (rope_theta/rope_scaling), which v5 and SGLang read."""
    architecture = next(a for a, arch in ARCHITECTURES.items() if arch == cfg.arch)
    config = {
        "architectures": [architecture],
        "model_type": cfg.arch,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.params_dtype,
    }
    if cfg.rope_scaling_factor is not None:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                                  **_LLAMA3_ROPE_FIXED}
    if cfg.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if cfg.arch == "qwen3":
        config.update(attention_bias=False)
    return config


# ---------------------------------------------------------------------------------------------
# Tensors


def _attention_dims(cfg: ModelConfig) -> Tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return groups, cfg.num_attention_heads // groups, cfg.head_dim


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor the model has, with its shape (lm_head only when untied)."""
    groups, per_group, d = _attention_dims(cfg)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (groups * per_group * d, h),
        "self_attn.k_proj.weight": (groups * d, h), "self_attn.v_proj.weight": (groups * d, h),
        "self_attn.o_proj.weight": (h, groups * per_group * d),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if cfg.add_qkv_bias:
        layer.update({"self_attn.q_proj.bias": (groups * per_group * d,),
                      "self_attn.k_proj.bias": (groups * d,),
                      "self_attn.v_proj.bias": (groups * d,)})
    if cfg.qk_layernorm:
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def _canonical(name: str) -> str:
    while name.startswith("module."):  # DDP / Float16Module wrappers
        name = name[len("module."):]
    return name


def hf_names(name: str, cfg: ModelConfig) -> List[str]:
    """HF tensor names that megatron tensor `name` is made of (empty: none, i.e. the tied output
    layer, which HF does not store). Raises ConversionError for names it does not know."""
    name = _canonical(name)
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return []
    if name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[name]]
    match = _LAYER.match(name)
    if match is None or match.group(2) not in _LAYER_SUFFIXES:
        raise ConversionError(f"no Hugging Face counterpart for megatron tensor {name!r}")
    if match.group(2) == "self_attention.linear_qkv.bias" and not cfg.add_qkv_bias:
        raise ConversionError(f"{name}: model.arch={cfg.arch} has no QKV bias")
    if match.group(2) in _QK_NORMS and not cfg.qk_layernorm:
        raise ConversionError(f"{name}: model.arch={cfg.arch} has no q/k norm (only qwen3)")
    return [f"model.layers.{match.group(1)}.{s}" for s in _LAYER_SUFFIXES[match.group(2)]]


def megatron_to_hf_tensors(name: str, full_tensor: torch.Tensor,
                           cfg: ModelConfig) -> List[Tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one full megatron tensor: QKV and fc1 split, vocab padding
    dropped, the tied output layer skipped. Works on meta tensors (for planning shard files)."""
    names = hf_names(name, cfg)
    name = _canonical(name)
    if not names:
        return []
    if name in _VOCAB_ROWS:
        if full_tensor.shape[0] < cfg.vocab_size:
            raise ConversionError(f"{name}: {full_tensor.shape[0]} rows, fewer than "
                                  f"model.vocab_size={cfg.vocab_size}")
        return [(names[0], full_tensor[: cfg.vocab_size])]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        groups, per_group, d = _attention_dims(cfg)
        grouped = full_tensor.reshape(groups, per_group + 2, d, *full_tensor.shape[1:])
        q, k, v = grouped.split([per_group, 1, 1], dim=1)
        parts = [t.reshape(-1, *full_tensor.shape[1:]) for t in (q, k, v)]
        return list(zip(names, parts))
    if name.endswith("mlp.linear_fc1.weight"):
        return list(zip(names, full_tensor.chunk(2, dim=0)))
    return [(names[0], full_tensor)]


def megatron_tensor_from_hf(name: str, get_hf_tensor: Callable[[str], torch.Tensor],
                            cfg: ModelConfig) -> torch.Tensor:
    """The full megatron tensor `name`, built from HF tensors fetched one at a time with
    `get_hf_tensor(hf_name)` (each checked against the shape the config implies), except that
    vocabulary tensors have the vocab_size rows of HF, without megatron's zero padding rows. The
    tied output layer (held by the last pipeline stage) is the input embedding."""
    name = _canonical(name)
    names = hf_names(name, cfg) or ["model.embed_tokens.weight"]
    shapes = expected_hf_shapes(cfg)

    def fetch(hf_name):
        tensor = get_hf_tensor(hf_name)
        if tuple(tensor.shape) != shapes[hf_name]:
            raise ConversionError(f"{hf_name}: shape {tuple(tensor.shape)} does not match "
                                  f"{shapes[hf_name]} implied by the model config")
        return tensor

    parts = [fetch(n) for n in names]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        groups, per_group, d = _attention_dims(cfg)
        rest = parts[0].shape[1:]
        q, k, v = (p.reshape(groups, -1, d, *rest) for p in parts)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
