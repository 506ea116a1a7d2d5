"""The GPT builder gives Qwen2 / Qwen3 / Llama-3 style models with the right shapes, and its logits
equal a plain float64 re-implementation of the same architecture."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_rl.config import load_config
from megatron_rl.models.gpt import build_gpt_model, use_transformer_engine
from megatron_rl.parallel import state

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def single_process():
    cfg = load_config(None, [])
    state.initialize(cfg.parallel)
    yield
    state.destroy()


def build(overrides):
    cfg = load_config(None, overrides, world_size=1)
    state.initialize(cfg.parallel)
    return cfg, build_gpt_model(cfg.model, cfg.parallel)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, base):
    # x: [s, heads, d]; megatron's default rotates halves (non-interleaved), like HF Llama/Qwen2.
    s, _, d = x.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def reference_logits(model, cfg, tokens):
    """float64 forward of one sequence from the megatron weights (local-spec names),
    written out by hand."""
    m = cfg.model
    sd = {k: v.double() for k, v in model.state_dict().items() if v is not None and
          not k.endswith("_extra_state")}
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.head_dim
    x = sd["embedding.word_embeddings.weight"][tokens]
    s = tokens.shape[0]
    causal = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], m.norm_epsilon)
        qkv = h @ sd[p + "self_attention.linear_qkv.weight"].T
        if m.add_qkv_bias:
            qkv = qkv + sd[p + "self_attention.linear_qkv.bias"]
        # megatron's fused layout: per query group [q * (heads/groups), k, v]
        qkv = qkv.view(s, groups, heads // groups + 2, d)
        q = qkv[:, :, :-2].reshape(s, heads, d)
        k = qkv[:, :, -2].repeat_interleave(heads // groups, dim=1)
        v = qkv[:, :, -1].repeat_interleave(heads // groups, dim=1)
        if m.qk_layernorm:  # qwen3: RMSNorm over each head's d channels, before RoPE
            q = rms_norm(q, sd[p + "self_attention.q_layernorm.weight"], m.norm_epsilon)
            k = rms_norm(k, sd[p + "self_attention.k_layernorm.weight"], m.norm_epsilon)
        q, k = rope(q, m.rotary_base), rope(k, m.rotary_base)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(s, heads * d)
        x = x + o @ sd[p + "self_attention.linear_proj.weight"].T
        h = rms_norm(x, sd[p + "pre_mlp_layernorm.weight"], m.norm_epsilon)
        gate, up = (h @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = rms_norm(x, sd["decoder.final_layernorm.weight"], m.norm_epsilon)
    out_w = sd["embedding.word_embeddings.weight"] if m.tie_word_embeddings else sd[
        "output_layer.weight"]
    return x @ out_w.T


@pytest.mark.parametrize("arch, tied, head_dim", [("qwen2", True, 16), ("llama", False, 16),
                                                 ("qwen3", False, 32)])
def test_logits_match_float64_reference(arch, tied, head_dim):
    # hidden 64 / 4 heads = 16; qwen3 sets its head dim apart, as Qwen3 checkpoints do
    kv_channels = [f"model.kv_channels={head_dim}"] if head_dim != 16 else []
    cfg, model = build([f"model.arch={arch}", f"model.tie_word_embeddings={str(tied).lower()}",
                        "model.num_query_groups=2", "model.num_attention_heads=4", *kv_channels])
    names = dict(model.named_parameters())
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in names) == (arch == "qwen2")
    assert ("output_layer.weight" in names) == (not tied)
    for norm in ("q_layernorm", "k_layernorm"):
        name = f"decoder.layers.0.self_attention.{norm}.weight"
        assert (names[name].shape == (head_dim,)) if arch == "qwen3" else name not in names
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (4 + 2 * 2) * head_dim, cfg.model.hidden_size)
    assert names["embedding.word_embeddings.weight"].shape[0] == 512  # padded to 128 x TP
    with torch.no_grad():  # make the QKV bias and the q/k norms non-trivial so they are tested
        for n, p in names.items():
            if n.endswith("linear_qkv.bias"):
                p.normal_(0, 0.1)
            if n.endswith("q_layernorm.weight") or n.endswith("k_layernorm.weight"):
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).unsqueeze(0)
    got = model(tokens, pos, None).detach()[0].double()
    want = reference_logits(model, cfg, tokens[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    state.destroy()


def test_local_spec_without_transformer_engine():
    cfg = load_config(None, [])
    if not torch.cuda.is_available():
        assert not use_transformer_engine(cfg.model)
    cfg = load_config(None, ["model.transformer_impl=local"])
    assert not use_transformer_engine(cfg.model)


def test_sequence_parallel_without_transformer_engine_is_refused_clearly():
    from megatron_rl.compat import apply_cpu_patches

    if use_transformer_engine(load_config(None, []).model):
        pytest.skip("TransformerEngine layers support sequence parallelism")
    apply_cpu_patches()
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=true"], world_size=2)
    with pytest.raises(ValueError, match="sequence_parallel=true needs TransformerEngine"):
        build_gpt_model(cfg.model, cfg.parallel)
