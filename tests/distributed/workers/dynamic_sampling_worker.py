"""Dynamic sampling at DP=2, where the ranks need different numbers of rounds: rank 0's regular
groups are all informative, rank 1's never are. Both ranks must run the same number of rounds
(all-reduced; rank 0 generating from an empty prompt list), rank 1 up to the cap; the step's
metrics count both ranks; the rest of the step (old log-probs, the DDP update) lines up.
Run under torchrun with 2 processes (gloo); rank 0 prints the OK line, any failure raises."""
import sys
import warnings

import torch.distributed as dist

from megatron_rl.config import load_config
from megatron_rl.training.trainer import RLTrainer

warnings.filterwarnings("ignore")
N, PROMPTS, CAP = 4, 4, 2


def main(out_dir):
    cfg = load_config("tests/configs/tiny_addition.yaml", [
        "training.sft_steps=0", "training.steps=1", "training.eval_interval=0",
        "training.probe_interval=0", f"rollout.prompts_per_step={PROMPTS}", f"algorithm.n={N}",
        "training.mini_batches=2", "training.micro_batch_size=2",
        "algorithm.filter_equal_groups=resample", f"algorithm.resample_max_rounds={CAP}",
        f"training.output_dir={out_dir}/run", f"training.cache_dir={out_dir}/cache"],
        world_size=2, on_this_host=True)
    trainer = RLTrainer(cfg)
    try:
        rank = trainer.info.dp_rank
        assert trainer.info.dp_size == 2
        # rank 0: [1, 0, 0, 0] for every group (informative); rank 1: all 0 (never)
        trainer.task.score = lambda responses, answers: [
            1.0 if rank == 0 and i % N == 0 else 0.0 for i in range(len(responses))]
        calls = []
        generate = trainer.engine.generate

        def counting(prompts, params, seed=None):
            calls.append(len(prompts))
            return generate(prompts, params, seed=seed)

        trainer.engine.generate = counting
        record = trainer.train_step(1)
        need = PROMPTS // 2
        assert calls == ([need, 0, 0] if rank == 0 else [need] * (1 + CAP)), calls
        assert record["rollout/resample_rounds"] == CAP, record
        assert record["rollout/prompts_drawn"] == PROMPTS + CAP * need, record
        assert record["rollout/informative_groups"] == need, record
        assert record["rollout/reward_mean_drawn"] == need / (N * (PROMPTS + CAP * need)), record
        assert trainer.step == 1 and record["num_tokens"] > 0, record
        # rank 1 trains on its regular groups (the first drawn), all masked
        regular = trainer.rank_prompts(1)
        batch = trainer.rollout(1)
        assert [batch.answers[g * N] for g in range(need)] == [a for _, a in regular]
        dist.barrier()
        if rank == 0:
            print("OK: dynamic sampling at DP=2 runs the same rounds on every rank", flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1])
