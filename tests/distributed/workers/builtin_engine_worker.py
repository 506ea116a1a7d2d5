"""The built-in engine gives the same tokens and log-probs with TP=2 and PP=2 as in one process
(weights shared through a distributed checkpoint), also while finished sequences leave the decode
batch (the third params: 32 rows, many stop tokens). Run under torchrun with 2 processes."""
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_rl.checkpointing.model import load_model, save_model  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402
from megatron_rl.models.gpt import build_gpt_model  # noqa: E402
from megatron_rl.parallel import state  # noqa: E402
from megatron_rl.rollout import SamplingParams  # noqa: E402
from megatron_rl.rollout.builtin import BuiltinEngine  # noqa: E402

VOCAB = 250
PROMPTS = [[5, 17, 3], [9], [4, 4, 4, 4, 4, 8], [200, 1]]
PARAMS = [SamplingParams(temperature=0.0, max_new_tokens=6),
          SamplingParams(temperature=0.8, top_k=50, max_new_tokens=6, n=2, stop_token_ids=(7,)),
          SamplingParams(temperature=1.0, max_new_tokens=10, n=8,
                         stop_token_ids=tuple(range(3, VOCAB, 6)))]


def build(tp, pp):
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", "model.num_layers=4",
                             "model.make_vocab_size_divisible_by=64",
                             f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}"],
                      world_size=dist.get_world_size())
    state.initialize(cfg.parallel)
    return build_gpt_model(cfg.model, cfg.parallel)


def generate(model):
    """Each params' samples and the decode batch's rows step by step."""
    engine = BuiltinEngine(model, vocab_size=VOCAB, seed=11)
    return [(engine.generate(PROMPTS, p, seed=5), engine._decode_rows) for p in PARAMS]


def main():
    ckpt = sys.argv[1]
    dist.init_process_group("gloo")
    model = build(1, 1)
    save_model(model, ckpt)
    reference = generate(model)
    failures = [] if len(set(reference[2][1])) > 2 else [
        f"rows did not leave the decode batch at several steps: {reference[2][1]}"]
    for tp, pp in ((2, 1), (1, 2)):
        model = build(tp, pp)
        load_model(model, ckpt)
        for params, (want, want_rows), (got, got_rows) in zip(PARAMS, reference,
                                                              generate(model)):
            if got_rows != want_rows:
                failures.append(f"tp{tp}pp{pp} T={params.temperature}: decode batches "
                                f"{got_rows} != {want_rows}")
            for w, g in zip(want, got):
                if g.output_ids != w.output_ids or g.finish_reason != w.finish_reason:
                    failures.append(f"tp{tp}pp{pp} T={params.temperature}: tokens "
                                    f"{g.output_ids} != {w.output_ids}")
                elif not torch.allclose(torch.tensor(g.output_logprobs),
                                        torch.tensor(w.output_logprobs), atol=1e-4):
                    failures.append(f"tp{tp}pp{pp} T={params.temperature}: log-probs differ")
    state.destroy()
    if failures:
        print("\n".join(failures), flush=True)
        sys.exit(1)
    if int(os.environ["RANK"]) == 0:
        print("OK: built-in engine TP=2 and PP=2 match one process", flush=True)


if __name__ == "__main__":
    main()
