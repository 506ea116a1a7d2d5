"""At TP=2 the actor's chunked log-prob path (hidden states -> output_layer_logprobs_entropy on
each rank's output-layer shard, training.logprob_chunking) gives the logits path's old log-probs,
update metrics and updated weights (every rank's shards); the logits path itself matches one
process (megatron_layouts_worker). Blocks of 8 tokens x 100 columns: several per shard, one
across the padded vocabulary (500 of 512 columns). Run under torchrun with 2 processes (gloo).
"""
import functools
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_rl.algorithms import AlgorithmConfig  # noqa: E402
from megatron_rl.config import load_config  # noqa: E402
from megatron_rl.models.gpt import build_gpt_model  # noqa: E402
from megatron_rl.parallel import state  # noqa: E402
from megatron_rl.training import actor  # noqa: E402
from megatron_rl.training.optimizer import build_optimizer, wrap_ddp  # noqa: E402
from megatron_rl.training.rl_batch import MicroBatch  # noqa: E402

VOCAB, TEMPERATURE = 500, 0.9
TOL = dict(rtol=1e-4, atol=2e-6)


def main():
    dist.init_process_group("gloo")
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160",
        "model.num_attention_heads=4", "model.num_query_groups=2", f"model.vocab_size={VOCAB}",
        "model.make_vocab_size_divisible_by=128", "model.tie_word_embeddings=false",
        "parallel.tensor_model_parallel_size=2", "training.adam_eps=1e-5"], world_size=2)
    state.initialize(cfg.parallel)
    actor.HiddenStateLogprobs = functools.partial(actor.HiddenStateLogprobs, token_chunk=8,
                                                  vocab_chunk=100)
    first = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    second = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    second.module.load_state_dict(first.module.state_dict())  # each rank its own shard
    alg = AlgorithmConfig(loss_mode="ppo_clip", entropy_coef=0.01, kl_ref_coef=0.1)
    runs = []
    for model, chunked in ((first, False), (second, True)):
        optimizer = build_optimizer([model], cfg.training)
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(2):
            tokens = torch.randint(0, VOCAB, (2, 13), generator=g)
            mask = (torch.rand(2, 12, generator=g) > 0.2).float()
            batches.append(MicroBatch(tokens=tokens[:, :-1], targets=tokens[:, 1:],
                                      loss_mask=mask,
                                      advantages=torch.randn(2, 1, generator=g) * mask,
                                      rollout_logprobs=torch.zeros(2, 12)))
        old = actor.compute_logprobs(model, batches, TEMPERATURE, VOCAB, chunked=chunked)
        for mb, lp in zip(batches, old):
            # a stand-in reference: the old log-probs a little off, so the KL term has gradient
            mb.old_logprobs, mb.ref_logprobs = lp, lp - 0.05
        metrics = actor.train_mini_batch(model, optimizer, batches, alg, TEMPERATURE, VOCAB,
                                         seed=0, chunked=chunked)
        runs.append((torch.cat(old), metrics, [p.detach().clone() for p in model.parameters()]))
    failures = []
    (old_a, metrics_a, weights_a), (old_b, metrics_b, weights_b) = runs
    if not torch.allclose(old_b, old_a, **TOL):
        failures.append(f"old log-probs differ by {(old_b - old_a).abs().max().item():.3e}")
    if metrics_a.get("update_ok") != 1.0 or metrics_b.get("update_ok") != 1.0:
        failures.append(f"an update was skipped: {metrics_a} {metrics_b}")
    for key in metrics_a:
        a, b = torch.tensor(metrics_a[key]), torch.tensor(metrics_b[key])
        if not torch.allclose(b, a, **TOL):
            failures.append(f"metric {key}: {metrics_b[key]} vs {metrics_a[key]}")
    for index, (a, b) in enumerate(zip(weights_a, weights_b)):
        if not torch.allclose(b, a, **TOL):
            failures.append(f"parameter {index} {tuple(a.shape)} differs by "
                            f"{(b - a).abs().max().item():.3e}")
    if torch.equal(old_a, old_b):
        failures.append("the two paths agree bit for bit: the blocks were not exercised")
    rank = dist.get_rank()
    print(f"chunked_logprobs_worker rank {rank}: "
          + ("; ".join(failures) if failures else "all checks passed"), flush=True)
    state.destroy()


if __name__ == "__main__":
    main()
