"""Time and peak memory of tools/convert_checkpoint.py in both directions on a random model.

    python tools/bench_convert.py [--layers 6 --hidden 1024 --ffn 3584 --vocab 32000
                                   --dtype float32 --shard-size 200MB --tp 1 --pp 1]

Writes a random Qwen2 HF folder (untied embeddings, GQA 16 heads / 4 groups, shards of
--shard-size) to a temporary directory, then runs, each as its own process, hf-to-megatron and
megatron-to-hf on it, and a bare interpreter that only imports torch and megatron-core (the floor
under both). Peak memory is /usr/bin/time's maximum resident set size. The defaults give a 589 MB
float32 model whose largest tensors are the 131 MB embedding and output layer. The last line is
JSON (MB = 10^6 bytes).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_rl.models.config import ModelConfig  # noqa: E402
from megatron_rl.models.hf_mapping import expected_hf_shapes, hf_config_from_model_config  # noqa: E402
from megatron_rl.checkpointing.convert import _DTYPES  # noqa: E402

IMPORTS_ONLY = ("from megatron_rl.compat import apply_cpu_patches; apply_cpu_patches(); "
                "import megatron.core.dist_checkpointing, megatron.core.models.gpt")


def write_random_hf(directory: str, cfg: ModelConfig, shard_bytes: int) -> int:
    """Random tensors in safetensors shards of about shard_bytes, one shard in memory at a time."""
    from safetensors.torch import save_file

    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from_model_config(cfg), f)
    dtype, generator = _DTYPES[cfg.params_dtype], torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in expected_hf_shapes(cfg).items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        current[name], size = tensor, size + tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            shards.append(current)
            save_file(current, os.path.join(directory, f"shard-{len(shards):05d}.safetensors"))
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, os.path.join(directory, f"shard-{len(shards):05d}.safetensors"))
    index = {f"shard-{i + 1:05d}.safetensors": shard for i, shard in enumerate(shards)}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {n: file for file, s in index.items() for n in s}}, f)
    return total


def measure(cmd) -> dict:
    """Wall seconds and peak RSS of one command, from /usr/bin/time: a child forked from this
    process would start with this process's peak RSS (Linux carries it over fork and exec)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return {"seconds": float(seconds), "peak_rss_mb": round(int(kib) * 1024 / 1e6)}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import parse_size

    cfg = ModelConfig(arch="qwen2", num_layers=args.layers, hidden_size=args.hidden,
                      ffn_hidden_size=args.ffn, num_attention_heads=16, num_query_groups=4,
                      vocab_size=args.vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False, params_dtype=args.dtype)
    tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
    with tempfile.TemporaryDirectory() as tmp:
        hf, megatron, back = (os.path.join(tmp, d) for d in ("hf", "megatron", "back"))
        model_bytes = write_random_hf(hf, cfg, parse_size(args.shard_size))
        largest = max(torch.Size(s).numel() for s in expected_hf_shapes(cfg).values()) * (
            torch.empty((), dtype=_DTYPES[args.dtype]).element_size())
        result = {"model_mb": round(model_bytes / 1e6), "largest_tensor_mb": round(largest / 1e6),
                  "imports_only": measure([sys.executable, "-c", IMPORTS_ONLY]),
                  "hf_to_megatron": measure(tool + ["hf-to-megatron", "--input", hf, "--output",
                                                    megatron, "--tp", str(args.tp),
                                                    "--pp", str(args.pp)]),
                  "megatron_to_hf": measure(tool + ["megatron-to-hf", "--input", megatron,
                                                    "--output", back])}
    for step in ("imports_only", "hf_to_megatron", "megatron_to_hf"):
        print(f"{step:15s} {result[step]['seconds']:7.1f} s  {result[step]['peak_rss_mb']:6d} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
