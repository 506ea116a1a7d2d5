"""The memory planner: parameter counts equal the built model's, the activation formula reduces to
Korthikanti et al.'s, a layout that does not fit is refused, and the planned total matches the
peak memory of a real forward/backward/optimizer step on CPU within 20%."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_rl.config import load_config
from megatron_rl.parallel.memory_plan import (GIB, layer_activation_bytes, layer_params,
                                              micro_batches_per_step, model_params, plan_memory)

# Large enough that the step's memory (~2 GB) dwarfs allocator noise; small enough for ~20 s.
MEASURED_MODEL = [
    "model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1408",
    "model.num_attention_heads=8", "model.num_query_groups=2", "model.vocab_size=32000",
    "model.tie_word_embeddings=false", "model.max_position_embeddings=256",
    "model.transformer_impl=local", "model.params_dtype=float32",
    "training.seq_length=256", "training.micro_batch_size=8", "training.clip_grad=0.0",
    "rollout.prompts_per_step=1", "algorithm.n=8",
]


def qwen7b(*overrides, world_size=8):
    return load_config("examples/qwen2.5-7b/grpo.yaml", list(overrides), world_size=world_size)


def test_layer_params_hand_count():
    cfg = load_config(None, ["model.hidden_size=8", "model.ffn_hidden_size=16",
                             "model.num_attention_heads=4", "model.num_query_groups=2"])
    # qkv: 8 x (4 + 2 x 2) x 2 head dim = 8 x 16 weights + 16 bias; proj 8 x 8; fc1 32 x 8;
    # fc2 8 x 16; two norms of 8.
    assert layer_params(cfg, tp=1) == 128 + 16 + 64 + 256 + 128 + 16
    # TP=2 halves the matrices and the bias, not the norms.
    assert layer_params(cfg, tp=2) == (128 + 16 + 64 + 256 + 128) // 2 + 16


def test_qwen25_7b_has_7_6b_params():
    assert model_params(qwen7b()) == pytest.approx(7.62e9, rel=0.005)


def test_activation_formula_reduces_to_korthikanti():
    s, b, h, a = 128, 2, 64, 4
    paper = dict(seq=s, micro_batch=b, hidden=h, heads=a, groups=a, head_dim=h // a, ffn=4 * h,
                 gated_mlp=False, dropout=True, element_bytes=2)
    sbh = s * b * h
    none = layer_activation_bytes(tp=1, sequence_parallel=False, recompute="none", **paper)
    assert none == sbh * (34 + 5 * a * s // h)
    assert layer_activation_bytes(tp=4, sequence_parallel=False, recompute="none", **paper) == \
        sbh * 10 + sbh * (24 + 5 * a * s // h) // 4
    assert layer_activation_bytes(tp=4, sequence_parallel=True, recompute="selective",
                                  **paper) == sbh * 34 // 4
    assert layer_activation_bytes(tp=4, sequence_parallel=True, recompute="full",
                                  **paper) == sbh * 2 // 4


def test_optimizer_state_sharded_by_distributed_optimizer():
    cfg = qwen7b()  # TP=4 on 8 GPUs: DP=2
    plain = plan_memory(cfg, 80, distributed_optimizer=False)
    sharded = plan_memory(cfg, 80, distributed_optimizer=True)
    n = plain.item("weights").bytes // 2
    assert plain.item("grad_buffer").bytes == 4 * n
    assert plain.item("main_params").bytes == 4 * n
    assert plain.item("optimizer_state").bytes == 8 * n
    assert sharded.item("main_params").bytes == 2 * n
    assert sharded.item("optimizer_state").bytes == 4 * n
    assert sharded.item("grad_buffer").bytes == plain.item("grad_buffer").bytes


def test_reference_policy_adds_a_copy_of_the_weights():
    plain = plan_memory(qwen7b(), 80)
    with_ref = plan_memory(qwen7b("algorithm.kl_ref_coef=0.001"), 80)
    weights = plain.item("weights").bytes
    assert with_ref.item("reference_weights").bytes == weights
    assert with_ref.peak_bytes == plain.peak_bytes + weights
    with pytest.raises(KeyError):
        plain.item("reference_weights")


def test_chunked_logprobs_and_recompute_shrink_their_items():
    cfg = qwen7b("training.micro_batch_size=8")
    full = plan_memory(cfg, 80, chunked_logprobs=False, recompute="none")
    light = plan_memory(cfg, 80, chunked_logprobs=True, recompute="full")
    # one bf16 [81920, 38016] logits copy (the gradient overwrites it) vs two fp32 blocks and the
    # fp32 grad_weight / grad_hidden accumulators
    assert light.item("logits").bytes < full.item("logits").bytes / 3
    assert light.item("activations").bytes < full.item("activations").bytes / 5


def test_logprob_chunking_choice_is_the_plans_default():
    """"auto" chunks when that at least halves the planned logits memory; explicit values win;
    the plan assumes what the trainer will run; the block is the op's default."""
    import inspect

    from megatron_rl.ops import output_layer_logprobs_entropy
    from megatron_rl.parallel.memory_plan import (TOKEN_CHUNK, VOCAB_CHUNK,
                                                  logprob_chunking_choice)

    defaults = inspect.signature(output_layer_logprobs_entropy).parameters
    assert (defaults["token_chunk"].default, defaults["vocab_chunk"].default) == (
        TOKEN_CHUNK, VOCAB_CHUNK)
    tiny = load_config("examples/tiny_cpu.yaml", [], world_size=1)
    assert qwen7b().training.logprob_chunking == tiny.training.logprob_chunking == "auto"
    # one logits copy of the 7B recipe (10240 x 38016 bf16 at TP=4: 0.85 GiB) against chunked
    # (0.77 GiB): not worth the recomputation; at 8 sequences per micro-batch it is (5.9 vs 1.7)
    assert not logprob_chunking_choice(qwen7b()) and not logprob_chunking_choice(tiny)
    assert logprob_chunking_choice(qwen7b("training.micro_batch_size=8"))
    assert not logprob_chunking_choice(qwen7b("training.micro_batch_size=8",
                                              "training.logprob_chunking=false"))
    assert logprob_chunking_choice(load_config("examples/tiny_cpu.yaml",
                                               ["training.logprob_chunking=true"], world_size=1))
    for cfg in (qwen7b(), qwen7b("training.micro_batch_size=8"),
                qwen7b("training.micro_batch_size=8", "training.logprob_chunking=false"), tiny):
        plan = plan_memory(cfg, 80)
        assert plan.settings["chunked_logprobs"] == logprob_chunking_choice(cfg)
        assert plan.item("logits").detail.startswith("chunked") == logprob_chunking_choice(cfg)
    with pytest.raises(Exception, match="training.logprob_chunking"):
        load_config(None, ["training.logprob_chunking=sometimes"])


def test_pipeline_first_stage_holds_more_micro_batches():
    cfg = load_config("examples/qwen2.5-32b/grpo.yaml", [], world_size=16)
    assert micro_batches_per_step(cfg) >= 2
    # 1F1B: stage 0 of 2 keeps two micro-batches' activations, the last stage one; without
    # recompute that outweighs the last stage's logits, so stage 0 is the one planned.
    plan = plan_memory(cfg, 80, recompute="none", chunked_logprobs=False, colocated_rollout=False)
    assert plan.stage == 0
    assert "2 micro-batch(es) in flight" in plan.item("activations").detail


def test_refuses_what_does_not_fit():
    cfg = qwen7b("parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
                 world_size=1)
    plan = plan_memory(cfg, 80, distributed_optimizer=False)
    assert not plan.fits
    with pytest.raises(MemoryError, match="optimizer_state") as err:
        plan.raise_if_not_fits()
    assert "distributed optimizer" in str(err.value)
    plan_memory(qwen7b(), 80, recompute="full").raise_if_not_fits()  # the recipe's layout fits


def test_tool_exit_codes():
    ok = subprocess.run([sys.executable, "tools/memory_plan.py", "--config",
                         "examples/qwen2.5-7b/grpo.yaml", "--world-size", "8",
                         "--gpu-memory-gib", "80", "--recompute", "full"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "optimizer_state" in ok.stdout
    refused = subprocess.run([sys.executable, "tools/memory_plan.py", "--config",
                              "examples/qwen2.5-7b/grpo.yaml", "--world-size", "8",
                              "--gpu-memory-gib", "24"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "does not fit" in refused.stderr.lower() or "more than" in refused.stderr


def test_tool_summary_rows_are_the_plans():
    """--summary (the README's tables): one row per recompute setting and log-prob path, each
    the plan_memory numbers of that setting."""
    out = subprocess.run([sys.executable, "tools/memory_plan.py", "--config",
                          "examples/qwen2.5-7b/grpo.yaml", "--world-size", "8", "--summary"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (recompute, chunked) for recompute in ("none", "selective", "full")
        for chunked in ("no", "yes")]
    for recompute, chunked, activations, logits, train, rollout, fits in rows:
        plan = plan_memory(qwen7b(), 80, recompute=recompute.strip(),
                           chunked_logprobs=chunked.strip() == "yes")
        assert float(logits) == round(plan.item("logits").bytes / GIB, 2)
        assert float(activations) == round(plan.item("activations").bytes / GIB, 1)
        assert float(train) == round(plan.train_bytes / GIB, 1)
        assert fits.strip() == f"{'yes' if plan.fits else 'no'} (stage {plan.stage})"


def measure_step_rss() -> dict:
    """One forward/backward/Adam step of MEASURED_MODEL in this (fresh) process: the increase of
    peak RSS over the RSS after imports and process-group start.

    The peak is /proc/self/status VmHWM, reset at the start: getrusage's ru_maxrss carries the
    parent's high-water mark over fork/exec, so a pytest process that once held 6 GB made this
    step measure 6 GB too."""
    import os
    import re
    import warnings

    warnings.filterwarnings("ignore")
    import psutil
    import torch

    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state
    from megatron_rl.training.actor import OutputLayerLogprobs
    from megatron_rl.training.optimizer import build_optimizer, wrap_ddp

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, MEASURED_MODEL, world_size=1)
    state.initialize(cfg.parallel)
    b, s, vocab = cfg.training.micro_batch_size, cfg.training.seq_length, cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (b, s))
    targets = torch.randint(0, vocab, (b, s))
    position_ids = torch.arange(s).expand(b, s)
    baseline = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.training)
    optimizer.zero_grad()
    model.zero_grad_buffer()
    # the trainer's logits path: the op on the output layer's logits, gradient written over them
    logprobs, entropy = model(
        tokens, position_ids, None,
        output_processor=OutputLayerLogprobs(1.0, vocab, inplace_backward=True),
        output_processor_context=SimpleNamespace(targets=targets))
    (-(logprobs.mean()) - 1e-3 * entropy.mean()).backward()
    optimizer.step()
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    plan = plan_memory(cfg, 1024, distributed_optimizer=False, colocated_rollout=False,
                       chunked_logprobs=False, runtime_overhead_gib=0)
    state.destroy()
    return dict(measured=peak - baseline, planned=plan.train_bytes,
                items={i.name: i.bytes for i in plan.items})


def test_plan_matches_cpu_peak_within_20_percent():
    # A fresh process: its peak RSS must hold this step and nothing else.
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    measured, planned = result["measured"], result["planned"]
    assert measured > 0.5 * GIB  # the model is big enough for the comparison to mean something
    assert abs(planned - measured) <= 0.2 * measured, result


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_measured_model_params_match_planner(arch):
    """The planner's count equals the built model's parameter count (vocab padding included;
    qwen3's q/k norms, with a head dim apart from hidden / heads)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_rl.models.gpt import build_gpt_model
    from megatron_rl.parallel import state

    qwen3 = ["model.arch=qwen3", "model.kv_channels=128"] if arch == "qwen3" else []
    cfg = load_config(None, MEASURED_MODEL[:-6] + ["model.num_layers=2", "model.vocab_size=1000",
                                                   *qwen3], world_size=1)
    state.initialize(cfg.parallel)
    try:
        model = build_gpt_model(cfg.model, cfg.parallel)
        assert sum(p.numel() for p in model.parameters()) == model_params(cfg)
    finally:
        state.destroy()


if __name__ == "__main__":
    print(json.dumps(measure_step_rss()))
