"""Model architecture config: Qwen2/Qwen2.5, Qwen3 (dense) and Llama-3 style decoder-only
transformers."""
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_rl.errors import check_range


@dataclass
class ModelConfig:
    # "qwen2" turns on the QKV bias (Qwen2/Qwen2.5); "llama" has none (Llama-3); "qwen3" has no
    # QKV bias but an RMSNorm over each query and key head before RoPE (megatron's
    # qk_layernorm). All use RMSNorm, SwiGLU and RoPE.
    arch: Literal["qwen2", "llama", "qwen3"] = "qwen2"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = 2  # GQA; None means multi-head attention
    kv_channels: Optional[int] = None  # head dim; None means hidden_size / num_attention_heads
    vocab_size: int = 512  # the tokenizer's; padded below for the TP split
    make_vocab_size_divisible_by: int = 128  # padded vocab is a multiple of this x TP (megatron)
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama-3.1 style scaling when set
    norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "auto": TransformerEngine layer spec when TE imports, megatron's local spec otherwise.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    recompute_granularity: Optional[Literal["full", "selective"]] = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        check_range("model", self, "num_query_groups", 1, null="multi-head attention")
        check_range("model", self, "kv_channels", 1, null="hidden_size / num_attention_heads")
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            check_range("model", self, name, 0, low_open=True)
        check_range("model", self, "rope_scaling_factor", 1, null="no scaling")
        for name in ("attention_dropout", "hidden_dropout"):
            check_range("model", self, name, 0, 1, high_open=True)
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not "
                             f"divisible by model.num_query_groups={self.num_query_groups}")

    @property
    def add_qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def qk_layernorm(self) -> bool:
        return self.arch == "qwen3"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple
