"""tools/convert_checkpoint.py against transformers: tiny random Qwen2 (tied embeddings, QKV bias),
Llama (untied, Llama-3 RoPE scaling, vocab needing padding) and Qwen3 (tied, per-head q/k norms,
head dim 32 != hidden / heads) models built with transformers' own classes go HF -> megatron
(imported for TP=1, TP=2 x PP=2 and PP=2), the megatron model loaded in TP=1, TP=2 and PP=2 gives
transformers' logits, and megatron -> HF gives back identical tensors that transformers loads,
with the same logits.

The conversions and the one torchrun launch that checks all layouts run once per module."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun import ROOT, run_torchrun

TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
WORKER = "tests/distributed/workers/convert_worker.py"
MODELS = ("qwen2", "llama", "qwen3")
# how each model is converted to megatron: (--tp, --pp)
IMPORT_LAYOUT = {"qwen2": (1, 1), "llama": (2, 2), "qwen3": (1, 2)}


def hf_model(kind):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    shared = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    if kind == "qwen2":
        config = Qwen2Config(vocab_size=500, tie_word_embeddings=True, rope_theta=1e6,
                             max_position_embeddings=256, **shared)
        model = Qwen2ForCausalLM(config)
    elif kind == "qwen3":
        config = Qwen3Config(vocab_size=400, tie_word_embeddings=True, rope_theta=1e6,
                             head_dim=32, max_position_embeddings=256, **shared)
        model = Qwen3ForCausalLM(config)
    else:
        # theta and scaling as in Llama-3.1, so that the scaling changes most RoPE frequencies
        config = LlamaConfig(vocab_size=300, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192},
                             max_position_embeddings=131072, **shared)
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(sum(map(ord, kind)))
    with torch.no_grad():  # random everywhere, QKV biases and norms (q/k norms too) included
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def write_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}, f)


def convert(*args):
    # PYTHONPATH: the script's own folder (tools/) heads sys.path, so without it an editable
    # install elsewhere (another checkout) would provide megatron_rl
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def read_safetensors(directory):
    from safetensors import safe_open

    tensors = {}
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{kind: dirs} after HF -> megatron -> HF, with transformers' reference logits."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for kind in MODELS:
        dirs = {name: root / f"{kind}_{name}" for name in ("hf", "megatron", "back")}
        dirs["reference"] = root / f"{kind}_logits.pt"
        model = hf_model(kind)
        model.save_pretrained(dirs["hf"], safe_serialization=True)
        write_tokenizer(dirs["hf"])
        tokens = torch.randint(0, model.config.vocab_size, (2, 16),
                               generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": model(tokens).logits}, dirs["reference"])
        tp, pp = IMPORT_LAYOUT[kind]
        rc, log = convert("hf-to-megatron", "--input", dirs["hf"], "--output", dirs["megatron"],
                          "--tp", tp, "--pp", pp)
        assert rc == 0, log[-5000:]
        # small shards for Qwen2, so that the index spans several files
        shard = ["--max-shard-size", "200KB"] if kind == "qwen2" else []
        rc, log = convert("megatron-to-hf", "--input", dirs["megatron"], "--output", dirs["back"],
                          *shard)
        assert rc == 0, log[-5000:]
        out[kind] = dirs
    return out


@pytest.fixture(scope="module")
def layout_report(converted):
    args = [a for kind in MODELS for a in (converted[kind]["megatron"],
                                           converted[kind]["reference"])]
    return run_torchrun(WORKER, 2, args, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", MODELS)
def test_megatron_logits_match_transformers_in_every_layout(kind, converted, layout_report):
    lines = [line for line in layout_report.splitlines()
             if f"{converted[kind]['megatron']} " in line]
    assert len(lines) == 3 and all(line.startswith("MATCH ") for line in lines), "\n".join(lines)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", MODELS)
def test_megatron_to_hf_round_trips_and_loads_in_transformers(kind, converted):
    from transformers import AutoModelForCausalLM

    dirs = converted[kind]
    original, back = read_safetensors(dirs["hf"]), read_safetensors(dirs["back"])
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((dirs["back"] / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in original.values())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) == (5 if kind == "qwen2" else 1)
    assert shard_files == {f for f in os.listdir(dirs["back"]) if f.endswith(".safetensors")}
    for file in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (dirs["back"] / file).read_bytes() == (dirs["hf"] / file).read_bytes(), file
    reference = torch.load(dirs["reference"])
    model = AutoModelForCausalLM.from_pretrained(dirs["back"]).eval()
    with torch.no_grad():
        logits = model(reference["tokens"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=0)


def test_hf_to_megatron_streams():
    """Peak memory of the import follows the largest tensor, not the model: tools/bench_convert.py
    on a 374 MB float32 model (16 layers; largest tensors the 66 MB embedding and output layer).
    Holding the model, as the import did before it streamed, takes over twice the model."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_convert.py"),
                           "--layers", "16", "--hidden", "512", "--ffn", "2048"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    above_imports = (result["hf_to_megatron"]["peak_rss_mb"]
                     - result["imports_only"]["peak_rss_mb"])
    assert result["model_mb"] > 350 and above_imports < 0.5 * result["model_mb"], result


def test_command_line_refuses_clearly(tmp_path):
    """The fixed command line exits 2 with a message naming the field (more refusals, without
    subprocesses, in tests/unit/test_hf_mapping.py)."""
    hf_dir = tmp_path / "hf"
    hf_model("qwen2").save_pretrained(hf_dir, safe_serialization=True)
    # 2 query groups do not split over TP=4
    rc, log = convert("hf-to-megatron", "--input", hf_dir, "--output", tmp_path / "m", "--tp", 4)
    assert rc == 2 and "model.num_query_groups=2 is not divisible by" in log, log[-3000:]
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config,
                                                    "architectures": ["MistralForCausalLM"]}))
    rc, log = convert("hf-to-megatron", "--input", hf_dir, "--output", tmp_path / "m")
    assert rc == 2 and "MistralForCausalLM is not supported" in log, log[-3000:]
    assert not (tmp_path / "m").exists()
