"""The Qwen2.5 recipes load at the world size their launch scripts use and carry the authors'
settings (their scripts recipe/dapo/{7b,32b}_{baseline,clip_cov,kl_cov}.sh in
PRIME-RL/Entropy-Mechanism-of-RL, DAPO's clip_ratio_high=0.28 for clip-higher, and arXiv
2505.22617 Sec. 4), the Qwen2.5 architectures, SGLang engines that fill each node's GPUs, and
DAPO's dynamic sampling."""
import glob
import os

import pytest

from megatron_rl.config import load_config

QWEN25 = {  # layers, hidden, ffn, heads, KV groups, rms eps
    "7b": (28, 3584, 18944, 28, 4, 1e-6),
    "32b": (64, 5120, 27648, 40, 8, 1e-5),
}
LAYOUT = {  # world size of the launch script, TP, PP, resulting DP
    "7b": (8, 4, 1, 2),  # 1 node x 8 GPUs
    "32b": (32, 8, 2, 2),  # examples/slurm_qwen2.5_32b.sbatch: 4 nodes x 8 GPUs
}
LR = {"7b": 5e-7, "32b": 1e-6}
KL_COV_K = {"7b": 2e-3, "32b": 2e-4}  # the scripts' k_percent 0.2 / 0.02 (percent)
# clip_ratio_low / clip_ratio_high: 1 / 1 in the Clip-Cov scripts, DAPO's 0.2 / 0.28 for
# clip-higher, 0.2 / 0.2 elsewhere
EPS = {"grpo": (0.2, 0.2), "clip_higher": (0.2, 0.28), "clip_cov": (1.0, 1.0),
       "kl_cov": (0.2, 0.2)}
LOSS_MODE = {"grpo": "ppo_clip", "clip_higher": "ppo_clip", "clip_cov": "clip_cov",
             "kl_cov": "kl_cov"}
GPUS_PER_NODE = 8
# (temperature, samples): avg@32 at 0.6 for AIME and AMC, greedy for the others (paper, Sec. 4)
TABLE2 = {"aime24": (0.6, 32), "aime25": (0.6, 32), "amc": (0.6, 32), "math500": (0.0, 1),
          "omni_math": (0.0, 1), "olympiadbench": (0.0, 1), "minerva": (0.0, 1)}


@pytest.mark.parametrize("size", ["7b", "32b"])
@pytest.mark.parametrize("method", list(LOSS_MODE))
def test_recipe_loads_with_paper_settings(size, method):
    world, tp, pp, dp = LAYOUT[size]
    cfg = load_config(f"examples/qwen2.5-{size}/{method}.yaml", [], world_size=world)
    m, p, t, r, a = cfg.model, cfg.parallel, cfg.training, cfg.rollout, cfg.algorithm
    layers, hidden, ffn, heads, groups, eps = QWEN25[size]
    assert (m.arch, m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups) == ("qwen2", layers, hidden, ffn, heads, groups)
    assert (m.vocab_size, m.padded_vocab_size(tp)) == (152064, 152064)
    assert (m.rotary_base, m.norm_epsilon, m.tie_word_embeddings, m.params_dtype) == \
        (1e6, eps, False, "bfloat16")
    assert m.max_position_embeddings >= t.seq_length == 2048 + 8192
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
            p.data_parallel_size) == (tp, pp, dp)
    assert (r.prompts_per_step, a.n, r.temperature, r.max_new_tokens) == (256, 8, 1.0, 8192)
    assert (r.top_p, r.top_k) == (1.0, -1)
    assert (t.mini_batches, t.ppo_epochs, t.lr, t.eval_temperature) == (8, 1, LR[size], 0.6)
    assert (t.lr_warmup_steps, t.lr_decay_style, t.weight_decay, t.clip_grad) == \
        (0, "constant", 0.0, 1.0)
    assert a.advantage_estimator == "grpo" and a.norm_by_std
    # DAPO's filter_groups with max_num_gen_batches=10: 10 generation rounds, 9 of them extra
    assert (a.filter_equal_groups, a.resample_max_rounds) == ("resample", 9)
    # Colocated SGLang engines, one per trainer TP group, filling each node's GPUs
    s = r.sglang
    assert (r.engine, s.placement, s.weight_sync, s.dtype) == \
        ("sglang", "colocated", "tensor", "bfloat16")
    assert s.tp_size == tp and s.engines_per_node * s.tp_size == GPUS_PER_NODE
    assert 0.5 <= s.mem_fraction_static <= 0.9
    # The paper's Table 2 benchmarks with its protocol, from tools/prepare_math_data.py's files
    d = cfg.data
    assert d.path == "data/math/dapo_math_17k.parquet"
    assert {e.name: (e.path, e.temperature, e.samples, e.weight) for e in d.eval_sets} == {
        name: (f"data/math/{name}.jsonl", *protocol, 1.0) for name, protocol in TABLE2.items()}
    assert t.law_metric == "eval/mean/accuracy"
    assert a.loss_mode == LOSS_MODE[method]
    assert (a.eps_low, a.eps_high, a.dual_clip_c) == (*EPS[method], None)
    assert (a.aggregation, a.entropy_coef, a.kl_ref_coef) == ("token-mean", 0.0, 0.0)
    if method == "clip_cov":
        assert (a.r, a.omega_low, a.omega_high) == (2e-4, 1.0, 5.0)
    if method == "kl_cov":
        assert (a.k, a.beta) == (KL_COV_K[size], 1.0)
    assert t.output_dir == f"runs/qwen2.5-{size}/{method}"


def test_every_shipped_recipe_is_tested_and_none_says_a_feature_is_missing():
    shipped = sorted(os.path.relpath(p) for p in glob.glob("examples/qwen2.5-*/*.yaml"))
    assert shipped == sorted(f"examples/qwen2.5-{size}/{method}.yaml"
                             for size in QWEN25 for method in LOSS_MODE)
    for path in shipped + ["examples/README.md"]:
        text = open(path).read()
        for stale in ("Not expressible", "not yet expressible", "Not yet expressible",
                      "no refill"):
            assert stale not in text, f"{path} says {stale!r}"


def test_32b_also_loads_on_two_nodes():
    cfg = load_config("examples/qwen2.5-32b/grpo.yaml", [], world_size=16)
    assert cfg.parallel.data_parallel_size == 1


def test_slurm_script_launches_the_world_size_the_test_assumes():
    text = open("examples/slurm_qwen2.5_32b.sbatch").read()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
