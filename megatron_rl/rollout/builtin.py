"""The built-in rollout engine: batched sampling on the megatron model itself, with a KV cache,
for CPU runs and tests. No weight sync: it reads the training weights directly, so it has nothing
to prefetch or shut down either (its RolloutEngine methods for those do nothing).

Prompts of different lengths share one batch. On CPU they are left-padded to the longest and the
whole batch is prefilled at once, with an attention mask that hides the padding from every query
(rotary attention depends only on relative positions, so the shift changes nothing but float
round-off). Elsewhere the fused softmax kernels and TransformerEngine attend with the causal mask
type and would ignore a padding mask, so there the batch is prefilled up to the shortest prompt,
then every step feeds each sequence its next prompt token while it is still in its prompt, and a
sampled token afterwards (megatron's static-batch scheme), which costs one decode step per token
of length difference.

Decode steps do not go through GPTModel.forward: on CPU its per-step cost is mostly Python and
small ops around the matmuls (megatron's static cache keeps keys before RoPE, so every step
rotates the whole key cache in every layer, and repeats it over the query heads of each group).
`_decode_stage` runs one token per sequence through the same modules -- embedding, norms, QKV
projection with its split and q/k norms, megatron's RoPE, output projection, MLP, output layer,
so tensor parallelism stays theirs -- and only the attention over the cache is written here, on
a cache of rotated keys laid out [batch, group, position, head dim] so each group's queries
attend to its keys with one batched matmul. The prompt pass is GPTModel.forward with megatron's
StaticInferenceContext; its keys are rotated once into that cache. With megatron's local layer
spec (every CPU run), `_decode_direct` does the same operations on the modules' own tensors
(weights, norm parameters, RoPE's cos/sin once per call) instead of calling the modules and their
autograd Functions, which cost more than the matmuls at small batches; the logits are the same
to the bit. Other modules (TransformerEngine's) run through `_decode_stage`.

On CPU, finished sequences leave the decode batch: once a multiple of COMPACT_ROWS (8) rows
have finished, the live rows past the new size move into finished rows' places and the cache
keeps only that many rows (some finished ones fill a multiple of 8), so later steps do not run
those rows through the model. The samples stay those of the static batch decoded to the
longest response, token for token: every step still draws the random numbers of the whole
batch and each row uses its own (`sample_from`'s rows), and a row's logits do not depend on the
rows beside it or on its place among them at these batch sizes (see COMPACT_ROWS). What it
saves is the finished rows' share of a step, not the step's fixed cost, so the per-step
bookkeeping covers only the decode batch and the direct decode loop runs in inference mode:
1.48x tokens/s (median of 14 runs) on the main job's model with random weights (responses of
18 tokens on average, 34 at most), 1.07x after its warm start (30 of 34), docs/rollout.md. On
CPU a prompt's n samples also share one prompt pass, and the cache's memory stays with the
engine between calls (generate).

Tensor parallel: logits come out split over the vocabulary; they are gathered on every TP rank
and every rank samples with the same seeded generator, so all ranks agree on the tokens.
Pipeline parallel: each step's hidden states go stage to stage (send/recv), the last stage
samples, and it broadcasts the new tokens and their log-probs to the other stages.
"""
import contextlib
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_rl.models.unwrap import unwrap_model
from megatron_rl.seeds import derive_seed
from megatron_rl.rollout.types import Sample, SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the top_k logits and the smallest set with mass >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token when the mass strictly before it is < top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


# Finished sequences leave the decode batch this many rows at a time, and only from a batch of a
# multiple of it: on CPU, float32 GEMMs give a row the same bits at every row count that is a
# multiple of 4 (MKL, 1-16 threads), but not in a batch of 1-3 rows or in rows past a multiple
# of 4 (2 or more threads), so any other compaction could change sampled tokens
# (test_builtin_engine.py compares the two token for token). On GPUs cuBLAS picks its kernels
# by shape and this was not checked there: their decode batch stays whole.
COMPACT_ROWS = 8
SAMPLE_BLOCK = 1024  # vocabulary entries per block of the two-level inverse-CDF draw
RACE_MAX_WIDTH = 2048  # up to here the exponential race's 3 ops beat the inverse CDF's ~20


def sample_from(probs: torch.Tensor, generator: torch.Generator,
                rows: Optional[torch.Tensor] = None, batch: Optional[int] = None) -> torch.Tensor:
    """One index per row, drawn with probability probs[row, i] / probs[row].sum(); entries of
    probability 0 are never drawn.

    rows, batch: probs holds rows `rows` (indices) of a batch of `batch` rows. The draws are
    those of the whole batch, and each row uses its own: a row gets the same sample whichever
    other rows are present (the engine drops finished sequences from its decode batch).

    Narrow rows: the exponential race argmax_i p_i / E_i with E_i = -log U_i ~ Exp(1) (the
    Gumbel-max trick), computed as argmax_i log(U_i) / p_i (U < 1, so p = 0 scores -inf). It
    draws a uniform per entry: 2.6 ms a step at 32 rows x 8192, 43 ms at 32 x 152k.
    Wide rows: inverse CDF with one uniform per row, first a block of SAMPLE_BLOCK entries by
    the float64 running sum of block masses, then an entry of that block by its own float64
    running sum (0.3 ms and 0.6 ms there). A float32 running sum over the whole row would
    round away entries below its last bit (~6e-8 of the mass: a vocabulary of 152k has many),
    and one in float64 takes 10x as long."""
    if probs.shape[-1] <= RACE_MAX_WIDTH:
        uniform = torch.rand(probs.shape if rows is None else (batch, probs.shape[1]),
                             generator=generator, dtype=probs.dtype, device=probs.device)
        if rows is not None:
            uniform = uniform[rows]
        return (uniform.log_() / probs).argmax(-1)
    count, width = probs.shape
    full = width // SAMPLE_BLOCK
    # block masses in float32 (each off by ~1e-7 of itself), their running sum in float64
    masses = (probs.unfold(1, SAMPLE_BLOCK, SAMPLE_BLOCK).sum(-1) if full  # a view, no copy
              else probs.new_zeros(count, 0))
    if width % SAMPLE_BLOCK:
        masses = torch.cat([masses, probs[:, full * SAMPLE_BLOCK:].sum(-1, keepdim=True)], 1)
    block_cdf = masses.double().cumsum(-1)
    uniform = torch.rand(count if rows is None else batch, 1, generator=generator,
                         dtype=torch.float64, device=probs.device)
    target = (uniform if rows is None else uniform[rows]) * block_cdf[:, -1:]
    # right=True: the first block whose running sum exceeds the target, so one with mass
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * SAMPLE_BLOCK + torch.arange(SAMPLE_BLOCK, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=width - 1)).masked_fill_(columns >= width, 0.0)
    entry = torch.searchsorted(inside.double().cumsum(-1), target - before, right=True)
    # round-off can put the target at the block's very end: take its last entry with mass
    last = SAMPLE_BLOCK - 1 - (inside > 0).flip(-1).int().argmax(-1, keepdim=True)
    return (block * SAMPLE_BLOCK + torch.minimum(entry, last))[:, 0]


def _rope(attn, tensor: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on [s, b, heads, dim] as megatron's Attention `attn` applies it (its mscale and CP
    group): to the prompt pass's cached keys once, and to each decode step's query and key."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return apply_rotary_pos_emb(tensor, freqs, attn.config, mscale=attn._yarn_concentration_factor,
                                cp_group=attn.pg_collection.cp)


class _DirectLayer(NamedTuple):
    """One transformer layer's tensors as `_decode_direct` reads them: a norm as torch.rms_norm's
    (normalized_shape, weight, eps), a linear as its weight transposed (the view megatron
    multiplies by)."""
    input_norm: Tuple
    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    q_norm: Optional[Tuple]  # qwen3's per-head norms
    k_norm: Optional[Tuple]
    proj_weight: torch.Tensor
    mlp_norm: Tuple
    fc1_weight: torch.Tensor
    fc2_weight: torch.Tensor


class _DirectStage(NamedTuple):
    """This pipeline stage's tensors for `_decode_direct`, read once per generate() (the
    optimizer updates the weights in place between calls, so the views stay current)."""
    layers: List[_DirectLayer]
    # the first stage's word embeddings when LanguageModelEmbedding's forward is only their rows
    # (one TP rank, no position embeddings or scaling, dropout off in eval), else None
    embedding_weight: Optional[torch.Tensor]
    final_norm: Optional[Tuple]  # the last stage's, else None
    output_weight: Optional[torch.Tensor]
    cos: torch.Tensor  # [position, head dim]: RoPE's cos, as megatron computes it per call
    sin_signed: torch.Tensor  # its sin with the first half negated (see _rotate)
    softmax_scale: float
    glu_offset: float
    tp_group: object  # the row-parallel linears' all-reduce group


def _norm_args(norm) -> Optional[Tuple]:
    """torch.rms_norm's arguments after the input for torch.nn.RMSNorm `norm` (its forward's
    call), or None when `norm` is something else (TransformerEngine's, a LayerNorm)."""
    if type(norm) is not torch.nn.RMSNorm:
        return None
    return norm.normalized_shape, norm.weight, norm.eps


def _direct_stage(model, freqs: torch.Tensor) -> Optional[_DirectStage]:
    """The tensors `_decode_direct` reads on this stage, or None where it would not compute what
    megatron's modules do: modules other than the local spec's (TransformerEngine fuses norms
    into linears), sequence parallelism, more TP ranks than key/value groups (megatron gathers
    the QKV output), biases on the other linears, partial or interleaved RoPE, another MLP
    activation. Then `_decode_stage` runs the modules."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    config = model.config
    if (config.sequence_parallel or config.rotary_interleaved or config.multi_latent_attention
            or not config.gated_linear_unit or config.activation_func is not F.silu
            or config.bias_activation_fusion or config.use_te_activation_func
            or config.activation_func_clamp_value is not None
            or getattr(model, "position_embedding_type", None) != "rope"):
        return None

    def plain(linear, kind, bias=False):  # megatron's own linear on its whole weight shard
        return (type(linear) is kind and getattr(linear, "gtp_remat_size", 1) == 1
                and (bias or linear.bias is None))

    layers = []
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        norms = [_norm_args(n) for n in (layer.input_layernorm, layer.pre_mlp_layernorm)]
        qk_norms = [None if n is None else _norm_args(n)
                    for n in (attn.q_layernorm, attn.k_layernorm)]
        if (None in norms or (attn.q_layernorm is not None and None in qk_norms)
                or (attn.q_layernorm is None) != (attn.k_layernorm is None)
                or config.num_query_groups < attn.world_size
                or freqs.shape[-1] != attn.hidden_size_per_attention_head
                or not plain(attn.linear_qkv, ColumnParallelLinear, bias=True)
                or not plain(attn.linear_proj, RowParallelLinear)
                or not plain(mlp.linear_fc1, ColumnParallelLinear)
                or not plain(mlp.linear_fc2, RowParallelLinear)):
            return None
        qkv = attn.linear_qkv
        layers.append(_DirectLayer(
            norms[0], qkv.weight.t(), None if qkv.skip_bias_add else qkv.bias, *qk_norms,
            attn.linear_proj.weight.t(), norms[1], mlp.linear_fc1.weight.t(),
            mlp.linear_fc2.weight.t()))
    embedding_weight = None
    if model.pre_process:
        embedding = model.embedding
        if (type(embedding.word_embeddings) is VocabParallelEmbedding
                and embedding.word_embeddings.tp_group.size() == 1
                and getattr(embedding.word_embeddings, "gtp_remat_size", 1) == 1
                and not embedding.reduce_scatter_embeddings
                and not embedding.add_position_embedding and embedding.tokentype_embeddings is None
                and not (config.use_mup and config.mup_embedding_mult != 1.0)
                and not config.fp32_residual_connection):
            embedding_weight = embedding.word_embeddings.weight
    final_norm = output_weight = None
    if model.post_process:
        final_norm = _norm_args(model.decoder.final_layernorm)
        # gather_output: megatron's GPTModel keeps the logits split (generate() gathers them)
        if (final_norm is None or not plain(model.output_layer, ColumnParallelLinear)
                or model.output_layer.gather_output):
            return None
        output_weight = (model.shared_embedding_or_output_weight()
                         if model.share_embeddings_and_output_weights
                         else model.output_layer.weight).t()
    if not layers:  # a stage without layers has nothing to save
        return None
    attn = model.decoder.layers[0].self_attention
    # megatron's _apply_rotary_pos_emb_bshd computes these from freqs[t] at every call
    cos = (torch.cos(freqs) * attn._yarn_concentration_factor).to(config.params_dtype)
    sin = (torch.sin(freqs) * attn._yarn_concentration_factor).to(config.params_dtype)
    cos, sin = cos.flatten(1), sin.flatten(1)  # [position, 1, 1, dim] -> [position, dim]
    half = sin.shape[1] // 2
    return _DirectStage(
        layers, embedding_weight, final_norm, output_weight, cos,
        torch.cat([-sin[:, :half], sin[:, half:]], 1),
        config.softmax_scale or 1.0 / math.sqrt(attn.hidden_size_per_attention_head),
        config.glu_linear_offset, attn.linear_proj.tp_group)


def _rotate(tensor: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """megatron's unfused RoPE, tensor * cos + cat(-second half, first half) * sin, with the sign
    moved onto sin: (-x) * s and x * (-s) round alike, so the bits are the same and a negation
    per call is saved."""
    half = tensor.shape[-1] // 2
    return tensor * cos + torch.cat((tensor[..., half:], tensor[..., :half]), -1) * sin_signed


def _move_rows(tensor: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
               count: int, dim: int = 0) -> torch.Tensor:
    """`tensor`'s first `count` rows along `dim` (a view) after its rows `sources` are copied
    onto its rows `targets`: how a decode batch sheds its finished rows (generate). Only the
    moved rows are copied, where an index_select of the rows kept copied the whole cache at
    every compaction (~0.5 ms each, ~11 a call on the main job)."""
    tensor.index_copy_(dim, targets, tensor.index_select(dim, sources))
    return tensor.narrow(dim, 0, count)


class BuiltinEngine:
    """RolloutEngine (rollout/types.py) on this rank's shard of the policy model.

    Every rank of the model-parallel group must call generate with the same arguments (they run
    the model together); data-parallel ranks call it with their own prompts.
    """

    weight_version: int  # RolloutEngine's: the trainer's completed steps

    def __init__(self, model, vocab_size: int, seed: int = 0, weight_version: int = 0,
                 compact: bool = True, direct: bool = True):
        self.model = model
        self.vocab_size = vocab_size  # the tokenizer's; padded vocab columns are never sampled
        self.seed = seed  # generate()'s draws without a seed of their own derive from it
        self.weight_version = weight_version  # a resumed job passes its checkpoint's step
        # False: decode the static batch to its longest response, finished sequences included
        # (the same samples, slower; for the tests and tools/bench_rollout.py)
        self._compact = compact
        # False: decode steps through megatron's modules (`_decode_stage`), not their tensors
        # directly (`_decode_direct`): the same logits, slower; for the tests
        self._direct = direct
        self._decode_rows: List[int] = []  # the last generate()'s decode batch, step by step
        self._cache_memory: Optional[torch.Tensor] = None  # on CPU: generate's KV cache
        self._calls = 0

    def update_weights(self) -> None:
        """The engine reads the training weights in place; only the version moves."""
        self.weight_version += 1

    def prefetch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Nothing to start early: generating runs the model being trained, on the trainer's
        own ranks, so it cannot overlap training (and rollout.async_rollout, which would call
        this, is refused at config load for this engine). generate() does the work."""

    def shutdown(self) -> None:
        """Releases the KV cache's memory kept between calls; the engine holds no process,
        server or group of its own."""
        self._cache_memory = None

    def _pipeline(self, model, stage, batch, width):
        """Run stage(hidden_in) on this pipeline stage: hidden_in is None on the first stage, the
        previous stage's output [width, batch, hidden] elsewhere. Returns the last stage's
        output, None on the others."""
        from megatron.core import parallel_state as mpu

        if mpu.get_pipeline_model_parallel_world_size() == 1:
            return stage(None)
        hidden = None
        if not mpu.is_pipeline_first_stage():
            hidden = torch.empty(width, batch, model.config.hidden_size,
                                 dtype=model.config.pipeline_dtype,
                                 device=next(model.parameters()).device)
            torch.distributed.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
        output = stage(hidden)
        if not mpu.is_pipeline_last_stage():
            torch.distributed.send(output.contiguous(),
                                   dst=mpu.get_pipeline_model_parallel_next_rank())
            return None
        return output

    @staticmethod
    def _prefill_stage(model, hidden, tokens, positions, mask, context):
        """GPTModel.forward over the prompts: logits [b, s, V/TP] on the last stage."""
        if hidden is not None:
            model.set_input_tensor(hidden)
        return model(tokens, positions, mask, inference_context=context)

    @staticmethod
    def _rotated_cache(model, context, prompt_width, total, freqs, prompts=None, samples=1,
                       memory=None):
        """This stage's cache, [layer, keys / values, b, groups, total, head dim]: per layer the
        prompt pass's keys (rotated here: megatron caches them unrotated) and values in columns
        < prompt_width, and nothing set in the others (a decode step writes column t before it
        reads it, so zeroing them was a pass over the whole cache for nothing). Rows
        p * samples to (p + 1) * samples - 1 hold the pass's row p, of its first `prompts` rows
        (None: all). One tensor, so that a compaction moves the rows of every layer at once.

        Laid out in `memory` (a flat tensor) when it has room, else in a new one; returns the
        cache and the tensor it is laid out in."""
        layers = model.decoder.layers
        if len(layers) == 0:  # a pipeline stage without layers
            return [], memory
        cache = None
        for i, layer in enumerate(layers):
            attn = layer.self_attention
            keys, values = context.key_value_memory_dict[layer.layer_number]
            keys = _rope(attn, keys[:prompt_width], freqs[:prompt_width]).permute(1, 2, 0, 3)
            values = values[:prompt_width].permute(1, 2, 0, 3)
            keys, values = keys[:prompts], values[:prompts]
            if cache is None:
                count, groups, _, dim = keys.shape
                shape = (len(layers), 2, count, samples, groups, total, dim)
                size = math.prod(shape)
                if (memory is None or memory.numel() < size or memory.dtype != keys.dtype
                        or memory.device != keys.device):
                    memory = keys.new_empty(size)
                cache = memory[:size].view(shape)
            # one copy from the pass's rows to all their samples' rows
            cache[i, 0, :, :, :, :prompt_width] = keys[:, None]
            cache[i, 1, :, :, :, :prompt_width] = values[:, None]
        return cache.flatten(2, 3), memory

    @staticmethod
    def _decode_stage(model, hidden, ids, t, cache, freqs, hidden_keys):
        """One token per sequence at column t through this stage's layers, with the cache of
        columns < t; writes column t of the cache. hidden_keys: [b, 1, 1, t + 1] True where a
        key is padding, or None. Logits [b, 1, V/TP] on the last stage, [1, b, h] elsewhere."""
        if hidden is None:
            hidden = model.embedding(input_ids=ids[:, None], position_ids=None)
        freq = freqs[t: t + 1]
        batch = ids.shape[0]
        for layer, (keys, values) in zip(model.decoder.layers, cache):
            attn = layer.self_attention
            query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden))
            query = _rope(attn, query, freq)
            keys[:, :, t] = _rope(attn, key, freq)[0]
            values[:, :, t] = value[0]
            heads, groups, dim = query.shape[2], keys.shape[1], query.shape[3]
            # [b, groups, heads per group, dim] x [b, groups, dim, t + 1]: GQA without a repeat
            scores = torch.matmul(query[0].view(batch, groups, heads // groups, dim),
                                  keys[:, :, : t + 1].transpose(-1, -2))
            scores *= attn.config.softmax_scale or 1.0 / math.sqrt(dim)
            if hidden_keys is not None:
                scores.masked_fill_(hidden_keys, float("-inf"))
            context = torch.matmul(scores.softmax(-1), values[:, :, : t + 1])
            out, bias = attn.linear_proj(context.reshape(1, batch, heads * dim))
            hidden = hidden + (out if bias is None else out + bias)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
        if not model.post_process:
            return hidden
        hidden = model.decoder.final_layernorm(hidden)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        logits, _ = model.output_layer(hidden, weight=weight)
        return logits.transpose(0, 1)

    @staticmethod
    def _decode_direct(model, stage: _DirectStage, hidden, ids, t, cache, hidden_keys):
        """`_decode_stage` with each module's tensors read directly (`stage`, from
        `_direct_stage`) instead of through megatron's modules and autograd Functions, and RoPE
        from tables: the same operations on the same tensors in the same order, so the same
        logits to the bit (test_builtin_engine.py compares the two). What it saves is most of a
        step's cost that does not depend on its rows (docs/rollout.md, session 4). Hidden states
        are [b, h] here (megatron's [1, b, h] less the sequence dimension: its matmuls fold it
        away too)."""
        if hidden is not None:  # the previous pipeline stage's
            hidden = hidden[0]
        elif stage.embedding_weight is not None:
            hidden = F.embedding(ids, stage.embedding_weight)
        else:
            hidden = model.embedding(input_ids=ids[:, None], position_ids=None)[0]
        batch = hidden.shape[0]
        cos, sin = stage.cos[t], stage.sin_signed[t]
        reduce = stage.tp_group is not None and stage.tp_group.size() > 1
        for layer, (keys, values) in zip(stage.layers, cache):
            dim = keys.shape[3]
            qkv = torch.mm(torch.rms_norm(hidden, *layer.input_norm), layer.qkv_weight)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            # megatron's layout: per key/value group its queries, then its key, then its value
            qkv = qkv.view(batch, keys.shape[1], -1, dim)
            per_group = qkv.shape[2] - 2
            if layer.q_norm is None:  # queries and key rotated together: RoPE is elementwise
                rotated = _rotate(qkv[:, :, : per_group + 1], cos, sin)
                query, key = rotated[:, :, :per_group], rotated[:, :, per_group]
            else:
                query = _rotate(torch.rms_norm(qkv[:, :, :per_group], *layer.q_norm), cos, sin)
                key = _rotate(torch.rms_norm(qkv[:, :, per_group], *layer.k_norm), cos, sin)
            keys[:, :, t] = key
            values[:, :, t] = qkv[:, :, per_group + 1]
            scores = torch.matmul(query, keys[:, :, : t + 1].transpose(-1, -2))
            scores *= stage.softmax_scale
            if hidden_keys is not None:
                scores.masked_fill_(hidden_keys, float("-inf"))
            context = torch.matmul(scores.softmax(-1), values[:, :, : t + 1])
            out = torch.mm(context.view(batch, -1), layer.proj_weight)
            if reduce:  # RowParallelLinear's
                torch.distributed.all_reduce(out, group=stage.tp_group)
            hidden = hidden + out
            gate, linear = torch.chunk(
                torch.mm(torch.rms_norm(hidden, *layer.mlp_norm), layer.fc1_weight), 2, dim=-1)
            out = torch.mm(F.silu(gate) * (linear + stage.glu_offset), layer.fc2_weight)
            if reduce:
                torch.distributed.all_reduce(out, group=stage.tp_group)
            hidden = hidden + out
        if stage.output_weight is None:
            return hidden[None]
        logits = torch.mm(torch.rms_norm(hidden, *stage.final_norm), stage.output_weight)
        return logits[:, None]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: Optional[int] = None) -> List[Sample]:
        from megatron.core import parallel_state as mpu
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if not prompts:  # a data-parallel rank with no evaluation prompts left
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        model = unwrap_model(self.model)
        device = next(model.parameters()).device
        expanded = [list(p) for p in prompts for _ in range(params.n)]
        batch = len(expanded)
        width = max(len(p) for p in expanded)
        total = width + params.max_new_tokens
        if total > model.max_sequence_length:
            raise ValueError(f"prompt ({width} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) exceeds the model's "
                             f"max_position_embeddings={model.max_sequence_length}")
        # row i holds its prompt in columns [pad[i], prompt_end[i])
        pads = [width - len(p) if device.type == "cpu" else 0 for p in expanded]
        tokens = torch.tensor([[0] * left + p + [0] * (total - left - len(p))
                               for left, p in zip(pads, expanded)], device=device)
        pad = torch.tensor(pads, device=device)
        prompt_end = pad + torch.tensor([len(p) for p in expanded], device=device)
        columns = torch.arange(total, device=device)
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # learned position tables
        # True = hidden: padding keys; queries see no key after their own (causal)
        hidden = columns[None, :] < pad[:, None] if any(pads) else None
        logprobs = torch.zeros(batch, total, device=device)
        end = prompt_end + params.max_new_tokens  # exclusive end of each sequence
        stop_ids = torch.tensor(list(params.stop_token_ids), dtype=torch.long, device=device)

        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(self.seed, self._calls) if seed is None else seed)
        self._calls += 1

        was_training = model.training
        model.eval()
        start = int(prompt_end.min())
        # On CPU a prompt's n samples share one prompt pass, over the prompts padded (with the
        # first one) to a multiple of COMPACT_ROWS rows, when the batch is a multiple of it
        # too: then both passes multiply [width x rows, hidden] matrices whose rows come out
        # with the same bits (see COMPACT_ROWS), and so do the per-sequence attention matmuls.
        # `prefill_rows`: the batch's rows the pass runs; row i's cache and first logits are
        # those of the pass's row i // n.
        prefill_rows, shared = slice(None), None
        padded = -(-len(prompts) // COMPACT_ROWS) * COMPACT_ROWS
        if device.type == "cpu" and batch % COMPACT_ROWS == 0 and padded < batch:
            prefill_rows = torch.tensor([p * params.n for p in range(len(prompts))]
                                        + [0] * (padded - len(prompts)), device=device)
            shared = torch.arange(batch, device=device) // params.n
        prefill_batch = batch if shared is None else padded
        try:
            context = StaticInferenceContext(prefill_batch, start)
            mask = None if hidden is None else (
                hidden[prefill_rows, None, None, :start]
                | torch.ones(start, start, dtype=torch.bool, device=device).triu(1))
            logits = self._pipeline(model, lambda h: self._prefill_stage(
                model, h, tokens[prefill_rows, :start], positions[prefill_rows, :start], mask,
                context), prefill_batch, start)
            if logits is not None and shared is not None:
                logits = logits[shared]
            freqs = model.rotary_pos_emb(total)
            # On CPU the engine keeps the cache's memory from call to call: fresh memory costs a
            # page fault per 4 KiB there (the main job's 11 MB: ~3000 faults, a few ms a call).
            # Off the CPU the caching allocator already reuses it.
            cache, memory = self._rotated_cache(
                model, context, start, total, freqs, *(() if shared is None else
                                                       (len(prompts), params.n)),
                memory=self._cache_memory if device.type == "cpu" else None)
            if device.type == "cpu":
                self._cache_memory = memory
            # each layer's (keys, values) views, taken once per cache shape, not at every step
            layer_caches = [tuple(kv.unbind()) for kv in cache]
            direct = _direct_stage(model, freqs) if self._direct else None
            # frees the prefill KV cache (not `del`: the prefill lambda above names it)
            context = None
            # The decode batch: the batch's rows `rows` (None: all, in order), the cache's rows,
            # and `ends`, their `end` (t + 1 once a stop token is sampled at t), in its order. A
            # row is done once t reaches its end. Finished sequences leave it COMPACT_ROWS at a
            # time; a batch of another size, or one off the CPU, stays whole (see COMPACT_ROWS).
            rows, hidden_rows, ends = None, hidden, end.clone()
            compact = self._compact and device.type == "cpu" and batch % COMPACT_ROWS == 0
            gather = mpu.get_tensor_model_parallel_world_size() > 1
            self._decode_rows = []
            # The direct decode loop runs in inference mode: no version counters or view
            # tracking on each of its small ops (~10% of a call on the main job). The prompt
            # pass and RoPE's table stay out of it: megatron keeps the table (lru_cache) for
            # training, which cannot use inference tensors. So do the module path's steps
            # (TransformerEngine's modules may create state lazily, which training would then
            # find to be inference tensors).
            # (not inference_mode(False): that turns grad mode back on)
            with torch.inference_mode() if direct is not None else contextlib.nullcontext():
                for t in range(start, total):
                    count = batch if rows is None else rows.numel()
                    if t > start:  # feed column t - 1, get the logits for column t
                        ids = tokens[:, t - 1] if rows is None else tokens[rows, t - 1]
                        keys_hidden = None if hidden is None else hidden_rows[:, None, None, :t]
                        if direct is not None:
                            logits = self._pipeline(model, lambda h: self._decode_direct(
                                model, direct, h, ids, t - 1, layer_caches, keys_hidden), count, 1)
                        else:
                            logits = self._pipeline(model, lambda h: self._decode_stage(
                                model, h, ids, t - 1, layer_caches, freqs, keys_hidden),
                                count, 1)
                        self._decode_rows.append(count)
                    if logits is not None:  # the last pipeline stage samples
                        logits = logits[:, -1].float()
                        if gather:
                            logits = gather_from_tensor_model_parallel_region(logits)
                        logits = logits[:, : self.vocab_size]
                        # x / 1 is x: T = 1 skips the division
                        scaled = (logits / params.temperature
                                  if params.temperature not in (0, 1) else logits)
                        log_probs = torch.log_softmax(scaled, dim=-1)
                        if params.temperature > 0:
                            filtered = (scaled if params.top_k <= 0 and params.top_p >= 1.0
                                        else filter_logits(scaled, params.top_k, params.top_p))
                            probs = log_probs.exp() if filtered is scaled else filtered.softmax(-1)
                            next_ids = sample_from(probs, generator, rows, batch)
                        else:
                            next_ids = logits.argmax(-1)
                        next_logprobs = log_probs.gather(-1, next_ids[:, None])[:, 0]
                    else:
                        next_ids = torch.empty(count, dtype=torch.long, device=device)
                        next_logprobs = torch.empty(count, device=device)
                    if mpu.get_pipeline_model_parallel_world_size() > 1:
                        last = mpu.get_pipeline_model_parallel_last_rank()
                        group = mpu.get_pipeline_model_parallel_group()
                        torch.distributed.broadcast(next_ids, src=last, group=group)
                        torch.distributed.broadcast(next_logprobs, src=last, group=group)
                    # Column t of every row in the decode batch: done rows' columns past their end
                    # are never read (their samples end there, and their rows' outputs do not touch
                    # the others'), only rows still in their prompts keep column t. Those exist only
                    # while t < width, off the CPU, where the batch stays whole.
                    generating = t < ends
                    if t < width:
                        past_prompt = t >= prompt_end
                        generating &= past_prompt
                        next_ids = torch.where(past_prompt, next_ids, tokens[:, t])
                    if rows is None:
                        tokens[:, t] = next_ids
                        logprobs[:, t] = next_logprobs
                    else:
                        tokens[rows, t] = next_ids
                        logprobs[rows, t] = next_logprobs
                    if stop_ids.numel():
                        ends = torch.where(generating & torch.isin(next_ids, stop_ids), t + 1, ends)
                    if int(ends.max()) <= t + 1:  # every sequence is done
                        break
                    if compact and t + 1 < total:  # a decode step follows
                        live = ends > t + 1
                        live_count = int(live.sum())
                        keep_count = -(-live_count // COMPACT_ROWS) * COMPACT_ROWS
                        if keep_count < count:
                            if rows is None:
                                rows = torch.arange(batch, device=device)
                            end[rows] = ends  # final for the rows about to leave
                            # the live rows past the first keep_count take finished rows' places
                            # before it; the finished rows left there make up the count
                            sources = live[keep_count:].nonzero()[:, 0] + keep_count
                            targets = (~live[:keep_count]).nonzero()[: sources.numel(), 0]
                            if len(cache):  # (none on a pipeline stage without layers)
                                cache = _move_rows(cache, sources, targets, keep_count, dim=2)
                                layer_caches = [tuple(kv.unbind()) for kv in cache]
                            rows, ends = (_move_rows(x, sources, targets, keep_count)
                                          for x in (rows, ends))
                            hidden_rows = None if hidden is None else hidden[rows]
            if rows is None:
                end = ends
            else:
                end[rows] = ends
        finally:
            model.train(was_training)

        stops = set(params.stop_token_ids)
        samples = []
        for i, (p, left, row, row_logprobs, hi) in enumerate(zip(
                expanded, pads, tokens.tolist(), logprobs.tolist(), end.tolist())):
            output = row[left + len(p): hi]
            samples.append(Sample(prompt_ids=p, output_ids=output,
                                  output_logprobs=row_logprobs[left + len(p): hi],
                                  # a sequence that samples a stop token ends with it
                                  finish_reason="stop" if output[-1] in stops else "length",
                                  weight_version=self.weight_version,
                                  prompt_index=i // params.n))
        return samples
