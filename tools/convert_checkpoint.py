r"""Convert Hugging Face checkpoints to megatron distributed checkpoints and back.

  python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output MEGATRON_DIR \
      --tp N --pp M
  python tools/convert_checkpoint.py megatron-to-hf --input MEGATRON_DIR --output HF_DIR

Both run in one process and stream, one tensor (one layer's slice of it) at a time; --tp decides
the vocabulary padding, and --tp/--pp are checked to split the model. See docs/conversion.md.
"""
import argparse
import re
import sys

from megatron_rl.checkpointing.convert import export_hf_checkpoint, import_hf_checkpoint
from megatron_rl.console import silence_third_party_warnings
from megatron_rl.models.hf_mapping import ConversionError


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2) or " "))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="HF folder -> megatron checkpoint")
    to_megatron.add_argument("--input", required=True,
                             help="HF folder (config.json, *.safetensors)")
    to_megatron.add_argument("--output", required=True, help="megatron checkpoint directory (new)")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                             help="vocab is padded to a multiple of this x TP (megatron's rule)")
    to_megatron.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                             help="parameter dtype (default: config.json's dtype)")
    to_hf = commands.add_parser("megatron-to-hf", help="megatron checkpoint -> HF folder")
    to_hf.add_argument("--input", required=True, help="megatron checkpoint directory")
    to_hf.add_argument("--output", required=True, help="HF folder (new)")
    to_hf.add_argument("--model-config",
                       help="model config YAML, for checkpoints not written by hf-to-megatron "
                            "(default: INPUT/model_config.yaml)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB",
                       help="largest safetensors file (default 5GB)")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="cast tensors to this dtype (default: as stored)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "megatron-to-hf":
            files = export_hf_checkpoint(args.input, args.output, args.model_config,
                                         args.max_shard_size, args.dtype)
            print(f"wrote {len(files)} safetensors file(s) to {args.output}")
            return 0
        cfg = import_hf_checkpoint(args.input, args.output, args.tp, args.pp,
                                   args.make_vocab_size_divisible_by, args.dtype)
        print(f"wrote megatron checkpoint ({cfg.arch}, {cfg.num_layers} layers, padded vocab "
              f"{cfg.padded_vocab_size(args.tp)}, loadable with TP={args.tp} PP={args.pp} or any "
              f"layout with that padding) to {args.output}")
        return 0
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    silence_third_party_warnings()
    sys.exit(main())
