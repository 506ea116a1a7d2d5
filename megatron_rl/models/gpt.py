"""megatron-core GPTModel for Qwen2/Qwen2.5, Qwen3 (dense) and Llama-3 style configs.

TransformerEngine's layer spec when TE imports (GPU hosts), megatron's local spec otherwise.
"""
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rl.models.config import ModelConfig
from megatron_rl.parallel.config import ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (e.g. a CPU torch) must not stop the CPU path
        return False
    return True


def use_transformer_engine(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    if cfg.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError("model.transformer_impl=transformer_engine but transformer_engine "
                               "does not import on this host")
        return True
    return transformer_engine_available() and torch.cuda.is_available()


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig):
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # CPU: weights are initialised full-size on the host and split, which also makes every
        # TP layout start from the same weights for a given seed.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # CPU/gloo: no batched isend/irecv sync, no fused kernels that need CUDA.
        batch_p2p_sync=on_gpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # RL micro-batches are padded to their own longest sequence, so pipeline stages exchange
        # each micro-batch's shape before its activations.
        variable_seq_lengths=parallel.pipeline_model_parallel_size > 1,
        moe_token_dispatcher_type="alltoall",  # megatron rejects variable lengths otherwise
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None,
    )


def layer_spec(cfg: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    # The spec decides which module q_layernorm/k_layernorm are (the config only switches them
    # on): TENorm, or with the local spec torch's RMSNorm, since normalization is RMSNorm.
    if use_transformer_engine(cfg):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                    qk_layernorm=cfg.qk_layernorm)


def sequence_parallel_unsupported(cfg: ModelConfig, parallel: ParallelConfig) -> Optional[str]:
    """Why parallel.sequence_parallel cannot run on this host, or None when it can (or is off)."""
    if parallel.sequence_parallel and not use_transformer_engine(cfg):
        # megatron's local spec builds torch norms, which assert against it: their weight
        # gradients would need a TP all-reduce that only TE's (and apex's) norms do.
        return ("parallel.sequence_parallel=true needs TransformerEngine layers (a GPU host "
                "with transformer-engine); megatron's local spec, used here, does not support it")
    return None


def build_gpt_model(cfg: ModelConfig, parallel: ParallelConfig, pre_process=None,
                    post_process=None):
    """Build this rank's part of the model (its TP shard of its PP stage).

    parallel_state must be initialised (megatron_rl.parallel.state.initialize)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    unsupported = sequence_parallel_unsupported(cfg, parallel)
    if unsupported:
        raise ValueError(unsupported)
    if pre_process is None:
        pre_process = mpu.is_pipeline_first_stage()
    if post_process is None:
        post_process = mpu.is_pipeline_last_stage()
    model = GPTModel(
        config=transformer_config(cfg, parallel),
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        # Llama-3.1 style frequency scaling (not linear position interpolation).
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
    )
    if torch.cuda.is_available():
        model.cuda()
    return model
