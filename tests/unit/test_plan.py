"""python -m megatron_rl.plan: FLOPs and decode time against hand computations, the micro-batch
search against plan_memory, every assumption named in the report, each Qwen2.5 recipe planned at
its launch size, a layout that cannot fit and bad flags refused with exit 2."""
import glob
import math

import pytest

from megatron_rl import plan
from megatron_rl.config import load_config
from megatron_rl.parallel.memory_plan import GIB

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1000",
        "model.make_vocab_size_divisible_by=8", "model.tie_word_embeddings=false",
        "model.params_dtype=bfloat16", "model.recompute_granularity=full",
        "rollout.prompts_per_step=4", "algorithm.n=2", "rollout.max_new_tokens=16",
        "training.seq_length=32", "model.max_position_embeddings=64"]


def tiny(*overrides):
    return load_config(None, TINY + list(overrides), world_size=1)


def test_training_flops_hand_count():
    cfg = tiny()
    a = plan.Assumptions(mean_prompt_tokens=6, mean_response_tokens=10)
    # Per layer: qkv 64 x (4 + 2 x 2) x 16 + bias 128, proj 64 x 64, mlp 3 x 64 x 128, norms 2 x 64
    layer = 64 * 128 + 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    n = 2 * layer + 64 + 1000 * 64  # + final norm + output layer (the embedding does no matmul)
    assert plan.matmul_params(cfg) == n
    seqs, s = 4 * 2, 16
    attention = seqs * 2 * (2 * s * s * 4 * 16)  # 2 layers, causal QK^T + AV
    forward = 2 * n * seqs * s + attention
    flops = dict(plan.training_flops(cfg, a))
    assert flops == {"forward + backward": 3 * forward, "full recompute (forward again)": forward,
                     "old log-probs (forward)": forward}
    with_ref = dict(plan.training_flops(tiny("algorithm.kl_ref_coef=0.1",
                                             "training.ppo_epochs=2",
                                             "model.recompute_granularity=selective"), a))
    assert with_ref == {"forward + backward": 6 * forward,
                        "selective recompute (attention again)": 2 * attention,
                        "old log-probs (forward)": forward,
                        "reference log-probs (forward)": forward}
    assert plan.trained_tokens(cfg, a) == seqs * s
    assert plan.flops_seconds(1e15, 4, a) == pytest.approx(1e15 / 4 / (989e12 * 0.35))


def test_decode_time_hand_count():
    cfg = tiny("rollout.engine=sglang", "rollout.sglang.tp_size=1",
               "rollout.sglang.placement=colocated", "algorithm.filter_equal_groups=resample",
               "algorithm.resample_max_rounds=9")
    a = plan.Assumptions(mean_prompt_tokens=6, mean_response_tokens=10, decode_efficiency=0.5,
                         informative_fraction=0.3)
    engines = plan.rollout_engines(cfg, 1)
    assert (engines.count, engines.tp) == (1, 1)
    kv_per_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads, head_dim 16, bf16
    # 8 sequences, KV for 3 at 16 tokens each: waves of 3, 3, 2; the last runs 16 steps.
    roll = plan.rollout_time(cfg, a, engines, kv_tokens=3 * 16)
    assert (roll.sequences_per_engine, roll.concurrent, roll.waves) == (8, 3, 3)
    assert roll.decode_steps == 2 * 10 + 16
    weights = plan.engine_weight_bytes(cfg, 1)
    assert weights == 2 * (plan.matmul_params(cfg) + 1000 * 64)
    kv_read = 8 * (10 * 6 + 10 * 10 // 2) * kv_per_token
    assert roll.kv_read_bytes == kv_read
    assert roll.round_seconds == pytest.approx((36 * weights + kv_read) / (3.35e12 * 0.5))
    assert roll.rounds == math.ceil(1 / 0.3) == 4
    assert plan.rollout_rounds(cfg, plan.Assumptions(informative_fraction=0.01)) == 10  # 1 + 9


def test_largest_micro_batch_fits_and_one_more_does_not():
    cfg = load_config("examples/qwen2.5-7b/grpo.yaml", ["model.recompute_granularity=selective"],
                      world_size=8)
    a = plan.Assumptions()
    engines = plan.rollout_engines(cfg, 8)
    size = plan.largest_micro_batch(cfg, a, engines)
    assert 1 <= size < plan.micro_batch_cap(cfg)
    assert plan.memory_plan(cfg, a, engines, size).train_bytes <= 80 * GIB
    assert plan.memory_plan(cfg, a, engines, size + 1).train_bytes > 80 * GIB


def test_report_names_every_assumption(capsys):
    assert plan.main(["--config", "examples/qwen2.5-7b/grpo.yaml"]) == 0
    out = capsys.readouterr().out
    for flag in ("--gpu", "--mfu", "--decode-efficiency", "--mean-prompt-tokens",
                 "--mean-response-tokens", "--informative-fraction", "--kv-cache-fraction"):
        assert f"| {flag}" in out or f"{flag}, " in out, flag
    for words in ("3.35 TB/s", "989 TFLOP/s", "| 0.35 |", "| 0.5 |", "| 256 |",
                  "2048 (max_new_tokens / 4)", "Largest micro-batch", "Largest KV cache",
                  "mem_fraction_static=0.8 gives", "**step**", "300 steps"):
        assert words in out, words


@pytest.mark.parametrize("recipe", sorted(glob.glob("examples/qwen2.5-*/*.yaml")))
def test_each_recipe_plans_at_its_launch_size(recipe, capsys):
    size = plan.launch_world_size(recipe)
    assert size == (8 if "7b" in recipe else 32)
    assert plan.main(["--config", recipe]) == 0
    out = capsys.readouterr().out
    assert f"on {size} x H100" in out and "fits (pipeline stage" in out
    assert "## Limitations" not in out  # engine TP = trainer TP, colocated: plan_memory applies


def test_engine_tp_mismatch_and_disaggregated_are_named():
    cfg = load_config("examples/qwen2.5-7b/grpo.yaml", ["rollout.sglang.tp_size=2",
                                                         "rollout.sglang.engines_per_node=4"],
                      world_size=8)
    assert "differs from the trainer's TP=4" in plan.rollout_engines(cfg, 8).notes[0]
    text, _ = plan.report(cfg, "x.yaml", 8, plan.Assumptions())
    assert "## Limitations" in text


def test_layout_that_cannot_fit_exits_2(capsys):
    # 32B on 2 nodes: DP=1, the whole Adam state and an 80 GiB KV item on each GPU.
    assert plan.main(["--config", "examples/qwen2.5-32b/grpo.yaml", "--world-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "Try:" in err and "kv_cache_fraction" in err
    assert plan.main(["--config", "examples/qwen2.5-7b/grpo.yaml", "--gpu-memory-gib", "20"]) == 2


@pytest.mark.parametrize("flag,value", [("--mfu", "-0.1"), ("--decode-efficiency", "1.5"),
                                        ("--informative-fraction", "0"),
                                        ("--mean-prompt-tokens", "-5")])
def test_bad_flags_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        plan.main(["--config", "examples/qwen2.5-7b/grpo.yaml", flag, value])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err
