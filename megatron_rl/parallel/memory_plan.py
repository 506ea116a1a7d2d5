"""Per-GPU memory of a job config, computed before any GPU is touched.

`plan_memory(cfg, gpu_memory_gib, ...)` returns a MemoryPlan with the bytes of each item on the
worst pipeline stage and whether it fits; `plan.raise_if_not_fits()` refuses a layout that won't,
naming the biggest items and what would shrink them.

Assumptions (docs/memory_plan.md repeats them next to the numbers):
- Parameters: megatron-core GPTModel with the layout of megatron_rl.models.gpt: RMSNorm (weight
  only, replicated over TP; arch=qwen3 adds per-head q/k norms), QKV with bias for arch=qwen2, no
  other linear biases, SwiGLU MLP
  (fc1 is [2 x ffn, h]), RoPE (no position table). The vocabulary is padded to a multiple of
  make_vocab_size_divisible_by x TP; embedding and output layer are split over TP by rows, layers
  over PP and their matrices over TP. The first stage holds the embedding, the last the final norm
  and the output layer (with tied embeddings and PP > 1 the last stage keeps its own copy, as
  megatron does; with PP = 1 a tied output layer costs nothing).
- Training state per parameter: weights in params_dtype; a gradient buffer in fp32 (megatron DDP
  with grad_reduce_in_fp32, what megatron_rl.training.optimizer.wrap_ddp sets); for 16-bit params
  an fp32 main copy; Adam m and v in fp32. The distributed optimizer shards the main copy and m, v
  over DP (the gradient buffer stays whole). fp32 params have no main copy. With
  algorithm.kl_ref_coef > 0 the frozen reference policy adds its weights (params_dtype, same
  layout, no gradient or optimizer state).
- Activations, per layer and micro-batch, follow Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"): with 16-bit activations, s*b*h*(34 + 5*a*s/h) bytes,
  of which 10*s*b*h are replicated over TP without sequence parallelism and the rest divided by TP;
  with sequence parallelism everything is divided by TP. The terms are written out so that they
  also hold for GQA (K, V are num_query_groups x head_dim wide) and a SwiGLU MLP (its fc1 output is
  2 x ffn wide, the activation output ffn): for MHA, a 4h non-gated MLP and dropout on they give the
  paper's 34 + 5as/h exactly. Dropout masks (1 byte per element) count only when dropout > 0; the
  attention dropout output (a second copy of the softmax) likewise. Elements are params_dtype wide.
  "selective" recompute drops the a*s*s terms (core attention recomputed; flash attention, as
  TransformerEngine uses on GPUs, stores none of them either); "full" keeps each layer's input and
  the working set of the one layer being recomputed. 1F1B keeps min(PP - stage, micro-batches)
  micro-batches in flight on a stage; without PP it is one. The last stage adds the final norm's
  input and output.
- Logits and entropy (last stage): without the chunked extension the output layer writes
  [s*b, V/TP] logits in params_dtype, which the vocab-parallel op saves for its backward and then
  overwrites with their gradient (inplace_backward), which the output layer's backward reads in
  that layout (no transposed copy: training.actor.OutputLayerLogprobs): one copy in all, plus the
  PyTorch fallback's fp32 temporaries (2 x 2^24 elements, megatron_rl.ops.reference). With the
  chunked extension (megatron_rl.ops.fused_output) only one [token_chunk, vocab_chunk] fp32 block
  and its gradient live, plus fp32 accumulators for grad_weight [V/TP, h] and grad_hidden [b*s, h].
  Which one the trainer runs is training.logprob_chunking, "auto" resolved by
  logprob_chunking_choice; plan_memory plans that path unless told otherwise.
- Colocated SGLang: during rollout the trainer keeps weights, gradient buffer and optimizer state
  resident (no offload); the engine (one per TP group, TP = the trainer's, whole model, no PP)
  adds its own params_dtype weights and a KV cache of 2 * layers * kv_heads/TP * head_dim * bytes
  per token, for kv_cache_fraction of the engine's rollout sequences (prompts_per_step x n / number
  of engines) at full length (training.seq_length). During training the engine has released both
  (release_memory_occupation), so the peak is the larger of the two phases.
- runtime_overhead_gib covers the CUDA context, NCCL buffers and allocator fragmentation.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, get_args

GIB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Elements per chunk of the PyTorch vocab-parallel phase ops (megatron_rl.ops.reference).
_OP_CHUNK_ELEMENTS = 1 << 24
# Copies of the [tokens, V/TP] logits alive at the peak without the chunked extension (see above).
_UNCHUNKED_LOGITS_COPIES = 1
# Block of megatron_rl.ops.output_layer_logprobs_entropy (its token_chunk / vocab_chunk defaults).
TOKEN_CHUNK, VOCAB_CHUNK = 1024, 16384

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_SETTINGS = get_args(Recompute)
Phase = Literal["both", "train", "rollout"]


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    phase: Phase  # "both": resident in training and rollout
    detail: str


@dataclass
class MemoryPlan:
    items: List[MemoryItem]
    stage: int  # the pipeline stage the items are for (the one with the highest peak)
    gpu_memory_bytes: int
    settings: Dict[str, object] = field(default_factory=dict)

    def phase_bytes(self, phase: Phase) -> int:
        return sum(i.bytes for i in self.items if i.phase in ("both", phase))

    @property
    def train_bytes(self) -> int:
        return self.phase_bytes("train")

    @property
    def rollout_bytes(self) -> int:
        return self.phase_bytes("rollout")

    @property
    def peak_bytes(self) -> int:
        return max(self.train_bytes, self.rollout_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes

    def item(self, name: str) -> MemoryItem:
        for i in self.items:
            if i.name == name:
                return i
        raise KeyError(f"no {name!r} on pipeline stage {self.stage}")

    def table(self) -> str:
        """Markdown table: one row per item, then the two phases and the verdict."""
        rows = ["| item | GiB | phase | what |", "|---|---:|---|---|"]
        rows += [f"| {i.name} | {i.bytes / GIB:.2f} | {i.phase} | {i.detail} |" for i in self.items]
        rows.append(f"| **training peak** | **{self.train_bytes / GIB:.2f}** | train | |")
        if any(i.phase == "rollout" for i in self.items):
            rows.append(f"| **rollout peak** | **{self.rollout_bytes / GIB:.2f}** | rollout | |")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"| **GPU** | **{self.gpu_memory_bytes / GIB:.2f}** | | {verdict} "
                    f"(pipeline stage {self.stage}) |")
        return "\n".join(rows)

    def raise_if_not_fits(self) -> None:
        if self.fits:
            return
        phase = "train" if self.train_bytes >= self.rollout_bytes else "rollout"
        biggest = sorted((i for i in self.items if i.phase in ("both", phase)),
                         key=lambda i: -i.bytes)[:3]
        named = ", ".join(f"{i.name} {i.bytes / GIB:.1f} GiB" for i in biggest)
        hints = [_SUGGESTIONS[i.name] for i in biggest if i.name in _SUGGESTIONS]
        raise MemoryError(
            f"the {phase} phase needs {self.peak_bytes / GIB:.1f} GiB per GPU on pipeline stage "
            f"{self.stage}, more than the {self.gpu_memory_bytes / GIB:.1f} GiB available; "
            f"biggest: {named}. Try: " + "; ".join(dict.fromkeys(hints)))


_SUGGESTIONS = {
    "weights": "raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size",
    "reference_weights": "raise parallel.tensor_model_parallel_size or "
                         "pipeline_model_parallel_size",
    "grad_buffer": "raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size",
    "main_params": "use the distributed optimizer (shards main params and Adam state over DP) "
                   "or add data-parallel ranks",
    "optimizer_state": "use the distributed optimizer (shards main params and Adam state over "
                       "DP) or add data-parallel ranks",
    "activations": "recompute (selective, then full), lower training.micro_batch_size, or turn "
                   "on parallel.sequence_parallel",
    "logits": "use the chunked log-prob extension or lower training.micro_batch_size",
    "sglang_weights": "raise parallel.tensor_model_parallel_size",
    "kv_cache": "lower kv_cache_fraction (fewer concurrent rollout sequences)",
    "runtime_overhead": "a bigger GPU",
}


# ---------------------------------------------------------------------------------------------
# Parameters


def layer_params(cfg, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    m = cfg.model
    head_dim = m.head_dim
    groups = m.num_query_groups or m.num_attention_heads
    qkv_width = (m.num_attention_heads + 2 * groups) * head_dim
    h = m.hidden_size
    qkv = (h * qkv_width + (qkv_width if m.add_qkv_bias else 0)) // tp
    proj = m.num_attention_heads * head_dim * h // tp
    mlp = 3 * h * m.ffn_hidden_size // tp  # fc1 [2f, h] (gate and up) + fc2 [h, f]
    norms = 2 * h  # input and pre-MLP RMSNorm weights, replicated over TP
    if m.qk_layernorm:  # arch=qwen3: one head_dim RMSNorm weight each for q and k, replicated
        norms += 2 * head_dim
    return qkv + proj + mlp + norms


def stage_params(cfg, stage: int) -> int:
    """Parameters on one TP rank of pipeline stage `stage`."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vocab_rows = m.padded_vocab_size(tp) // tp * m.hidden_size
    n = m.num_layers // pp * layer_params(cfg, tp)
    if stage == 0:
        n += vocab_rows
    if stage == pp - 1:
        n += m.hidden_size  # final norm
        if not (m.tie_word_embeddings and pp == 1):
            n += vocab_rows
    return n


def model_params(cfg) -> int:
    """Parameters of the whole model (all stages, all TP ranks, padded vocabulary at TP=1)."""
    return stage_params(_with_layout(cfg, tp=1, pp=1), 0)


# ---------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(*, seq: int, micro_batch: int, hidden: int, heads: int, groups: int,
                           head_dim: int, ffn: int, gated_mlp: bool, dropout: bool,
                           element_bytes: int, tp: int, sequence_parallel: bool,
                           recompute: Recompute) -> int:
    """Activation bytes one transformer layer keeps for its backward, for one micro-batch on one
    TP rank (Korthikanti et al. 2022, term by term; see the module docstring)."""
    sb = seq * micro_batch
    sbh = sb * hidden
    e = element_bytes
    replicated_div = tp if sequence_parallel else 1
    if recompute == "full":  # only the layer input is kept
        return sbh * e // replicated_div
    mask = 1 if dropout else 0
    # Tensors the TP split does not divide unless sequence parallel: the two norm inputs, the
    # QKV and fc1 inputs (norm outputs), the two post-block dropout masks.
    replicated = 4 * sbh * e + 2 * sbh * mask
    # Divided by TP: Q and K for QK^T, V, the projection input, the MLP's activation input and
    # fc2 input.
    q_width, kv_width = heads * head_dim, groups * head_dim
    split = sb * (q_width + kv_width) * e + sb * kv_width * e + sb * q_width * e
    split += sb * (2 * ffn if gated_mlp else ffn) * e + sb * ffn * e
    if recompute == "none":  # softmax output, dropout mask and dropout output: a*s*s*b each
        split += heads * seq * sb * (e + (mask + e if dropout else 0))
    return replicated // replicated_div + split // tp


def _activation_bytes_per_micro_batch(cfg, recompute: Recompute, layers: int) -> int:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    head_dim = m.head_dim
    common = dict(seq=t.seq_length // p.context_parallel_size, micro_batch=t.micro_batch_size,
                  hidden=m.hidden_size, heads=m.num_attention_heads,
                  groups=m.num_query_groups or m.num_attention_heads, head_dim=head_dim,
                  ffn=m.ffn_hidden_size, gated_mlp=True,
                  dropout=m.hidden_dropout > 0 or m.attention_dropout > 0,
                  element_bytes=_DTYPE_BYTES[m.params_dtype], tp=p.tensor_model_parallel_size,
                  sequence_parallel=p.sequence_parallel)
    per_layer = layer_activation_bytes(recompute=recompute, **common)
    if recompute == "full":  # plus the one layer being recomputed in the backward
        return layers * per_layer + layer_activation_bytes(recompute="none", **common)
    return layers * per_layer


# ---------------------------------------------------------------------------------------------
# The plan


def micro_batches_per_step(cfg) -> int:
    """Micro-batches per optimizer step on one DP rank (what 1F1B can keep in flight)."""
    p, t = cfg.parallel, cfg.training
    dp = p.data_parallel_size or 1
    sequences = cfg.rollout.prompts_per_step // dp * cfg.algorithm.n // t.mini_batches
    return max(1, -(-sequences // t.micro_batch_size))


def logprob_chunking_choice(cfg, token_chunk: int = TOKEN_CHUNK,
                            vocab_chunk: int = VOCAB_CHUNK) -> bool:
    """Whether the trainer computes log-probs from hidden states in [token_chunk, vocab_chunk]
    blocks (megatron_rl.ops.output_layer_logprobs_entropy): training.logprob_chunking, with
    "auto" on when that at least halves the planned `logits` item. The chunked path recomputes
    the output layer's matmul in its backward and keeps fp32 grad_weight / grad_hidden
    accumulators, while the logits path holds one logits copy (the gradient overwrites it), so
    it pays only where the logits dwarf the accumulators (many tokens per micro-batch against
    the hidden size). The trainer and plan_memory both decide here."""
    choice = cfg.training.logprob_chunking
    if choice != "auto":
        return bool(choice)
    return (_logits_item(cfg, False, token_chunk, vocab_chunk).bytes
            > 2 * _logits_item(cfg, True, token_chunk, vocab_chunk).bytes)


def _logits_item(cfg, chunked: bool, token_chunk: int, vocab_chunk: int) -> MemoryItem:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp = p.tensor_model_parallel_size
    tokens = t.micro_batch_size * t.seq_length // p.context_parallel_size
    vocab_local = m.padded_vocab_size(tp) // tp
    e = _DTYPE_BYTES[m.params_dtype]
    if chunked:
        block = min(tokens, token_chunk) * min(vocab_local, vocab_chunk)
        n = 2 * block * 4 + vocab_local * m.hidden_size * 4 + tokens * m.hidden_size * 4
        detail = (f"chunked: 2 fp32 blocks [{min(tokens, token_chunk)}, "
                  f"{min(vocab_local, vocab_chunk)}] + fp32 grad_weight and grad_hidden")
    else:
        logits = tokens * vocab_local
        n = _UNCHUNKED_LOGITS_COPIES * logits * e + 2 * min(logits, _OP_CHUNK_ELEMENTS) * 4
        detail = (f"{_UNCHUNKED_LOGITS_COPIES} x [{tokens}, {vocab_local}] {m.params_dtype} "
                  f"logits + op temporaries")
    return MemoryItem("logits", n, "train", detail)


def plan_memory(cfg, gpu_memory_gib: float, *, distributed_optimizer: bool = True,
                recompute: Recompute = "none", chunked_logprobs: Optional[bool] = None,
                kv_cache_fraction: float = 0.25, colocated_rollout: bool = True,
                runtime_overhead_gib: float = 2.0, token_chunk: int = TOKEN_CHUNK,
                vocab_chunk: int = VOCAB_CHUNK) -> MemoryPlan:
    """Per-GPU memory of `cfg` (a JobConfig validated for its world size, so that
    parallel.data_parallel_size is set) on the worst pipeline stage. See the module docstring
    for what is counted and how. chunked_logprobs None: the path the trainer takes for `cfg`
    (logprob_chunking_choice)."""
    if chunked_logprobs is None:
        chunked_logprobs = logprob_chunking_choice(cfg, token_chunk, vocab_chunk)
    if recompute not in RECOMPUTE_SETTINGS:
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if not 0.0 <= kv_cache_fraction <= 1.0:
        raise ValueError(f"kv_cache_fraction must be in [0, 1], got {kv_cache_fraction}")
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = p.data_parallel_size or 1
    e = _DTYPE_BYTES[m.params_dtype]
    fp32_params = m.params_dtype == "float32"
    shard = dp if distributed_optimizer else 1
    layers = m.num_layers // pp
    in_flight_total = micro_batches_per_step(cfg)
    settings = dict(distributed_optimizer=distributed_optimizer, recompute=recompute,
                    chunked_logprobs=chunked_logprobs, kv_cache_fraction=kv_cache_fraction,
                    colocated_rollout=colocated_rollout, runtime_overhead_gib=runtime_overhead_gib)

    engines = max(1, (p.data_parallel_size or 1) * pp)  # world / TP
    engine_sequences = cfg.rollout.prompts_per_step * cfg.algorithm.n / engines
    kv_tokens = int(kv_cache_fraction * engine_sequences) * t.seq_length
    kv_per_token = kv_bytes_per_token(cfg, tp)

    plans = []
    for stage in range(pp):
        n = stage_params(cfg, stage)
        in_flight = min(pp - stage, in_flight_total)
        act = in_flight * _activation_bytes_per_micro_batch(cfg, recompute, layers)
        if stage == pp - 1:  # final norm input and output
            act += 2 * t.micro_batch_size * t.seq_length * m.hidden_size * e // (
                tp if p.sequence_parallel else 1)
        items = [
            MemoryItem("weights", n * e, "both",
                       f"{n / 1e9:.3f}B params x {e} B ({m.params_dtype})"),
            MemoryItem("grad_buffer", n * 4, "both", "fp32 DDP gradient buffer"),
            MemoryItem("main_params", 0 if fp32_params else n * 4 // shard, "both",
                       "none (fp32 params)" if fp32_params else
                       f"fp32 copy{f' / DP={dp}' if shard > 1 else ''}"),
            MemoryItem("optimizer_state", n * 8 // shard, "both",
                       f"Adam m, v fp32{f' / DP={dp}' if shard > 1 else ''}"),
            MemoryItem("activations", act, "train",
                       f"{layers} layers x {in_flight} micro-batch(es) in flight, "
                       f"recompute={recompute}"),
        ]
        if cfg.algorithm.kl_ref_coef > 0:
            items.append(MemoryItem("reference_weights", n * e, "both",
                                    "frozen reference policy (algorithm.kl_ref_coef > 0)"))
        if stage == pp - 1:
            items.append(_logits_item(cfg, chunked_logprobs, token_chunk, vocab_chunk))
        if colocated_rollout:
            items.append(MemoryItem("sglang_weights", engine_weight_bytes(cfg, tp), "rollout",
                                    f"engine copy, TP={tp}, all {m.num_layers} layers"))
            items.append(MemoryItem("kv_cache", kv_tokens * kv_per_token, "rollout",
                                    f"{kv_tokens / 1e6:.2f}M tokens x {kv_per_token} B"))
        if runtime_overhead_gib:
            items.append(MemoryItem("runtime_overhead", int(runtime_overhead_gib * GIB), "both",
                                    "CUDA context, NCCL, fragmentation"))
        plans.append(MemoryPlan(items, stage, int(gpu_memory_gib * GIB), settings))
    return max(plans, key=lambda plan: plan.peak_bytes)


def engine_weight_bytes(cfg, tp: int) -> int:
    """One GPU's share of the weights of an engine with tensor parallelism `tp`: the whole model
    (all layers, an engine has no PP) in params_dtype."""
    return stage_params(_with_layout(cfg, tp=tp, pp=1), 0) * _DTYPE_BYTES[cfg.model.params_dtype]


def kv_bytes_per_token(cfg, tp: int) -> int:
    """KV-cache bytes per token on one GPU of an engine with tensor parallelism `tp`: K and V for
    every layer, the KV heads split over TP (replicated when there are fewer heads than ranks)."""
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    return 2 * m.num_layers * max(1, groups // tp) * m.head_dim * _DTYPE_BYTES[m.params_dtype]


def _with_layout(cfg, *, tp: int, pp: int):
    from dataclasses import replace

    return replace(cfg, parallel=replace(cfg.parallel, tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp))
