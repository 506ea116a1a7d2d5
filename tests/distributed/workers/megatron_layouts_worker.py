"""TP / PP / DP layouts of the tiny GPT give the same logits, loss, gradients and optimizer step
as one process, and distributed checkpoints reshard between layouts. After that step, one RL
step with a KL to the frozen reference policy (the initial weights, training.actor's
build_reference_model) through the trainer's compute_logprobs / train_mini_batch: the reference
log-probs, the RL loss, its KL and entropy terms, gradient norm and update are the single
process's too; the reference equals the initial policy and does not move (skipped with
LONG_SEQUENCE).

Run under torchrun (gloo): `worker.py CKPT_DIR LAYOUT [LAYOUT ...]` (TIE_EMBEDDINGS=1 for
tied input/output embeddings, which PP keeps in sync across the first and last stages), a layout
being e.g. "tp2", "pp2", "dp2", "tp2dp2", "tp2pp2"; "sp" adds sequence parallelism, "rc" full
activation recomputation ("tp2sprc"). LONG_SEQUENCE=N runs one batch of 2 sequences of N tokens
with a 2-layer, 2-head model instead of the default batch (the long-response setting). The
reference is computed first in the layout "dp<world>" with every rank fed the whole batch: DDP
then averages identical gradients, which is exactly the single-process result. Set
BREAK_TP_MAPPING=1 to replace megatron's TP all-reduce with the identity: the checks must then
fail (tests/distributed/test_megatron_layouts.py checks that).
"""
import os
import re
import sys
import warnings
from types import SimpleNamespace

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_rl.config import load_config  # noqa: E402
from megatron_rl.parallel import state  # noqa: E402
from megatron_rl.parallel.gather import full_state  # noqa: E402
from megatron_rl.models.gpt import build_gpt_model  # noqa: E402
from megatron_rl.training.optimizer import build_optimizer, wrap_ddp  # noqa: E402
from megatron_rl.training.rl_batch import MicroBatch  # noqa: E402
from megatron_rl.training.step import forward_only, token_mean_loss, train_step  # noqa: E402
from megatron_rl.checkpointing.model import load_model, save_model  # noqa: E402
from megatron_rl.algorithms import AlgorithmConfig  # noqa: E402
from megatron_rl.training import actor  # noqa: E402

TOL = dict(rtol=1e-4, atol=2e-6)
OVERRIDES = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=500",
    "model.make_vocab_size_divisible_by=128", "model.arch=qwen2",
    "training.lr=1e-3", "training.clip_grad=1.0", "training.weight_decay=0.01",
    # eps well above float32 noise in the smallest gradients, so Adam's g / (sqrt(v) + eps)
    # does not amplify round-off between layouts into visible parameter differences.
    "training.adam_eps=1e-5",
]
GLOBAL_BATCH, SEQ, MICRO_BATCHES = 8, 16, 4
VOCAB = 500  # model.vocab_size; the padded columns take no part in log-probs
# The RL step: PPO clip with the entropy bonus and the reference KL (k3) at temperature 0.9.
RL_CONFIG = AlgorithmConfig(loss_mode="ppo_clip", kl_ref_coef=0.1, kl_ref_estimator="k3",
                            entropy_coef=0.01)
TEMPERATURE = 0.9
LONG = int(os.environ.get("LONG_SEQUENCE", 0))
if LONG:  # attention scores are [heads, s, s] per layer: keep heads and layers few
    GLOBAL_BATCH, SEQ, MICRO_BATCHES = 2, LONG, 2
    OVERRIDES += ["model.num_layers=2", "model.num_attention_heads=2", "model.num_query_groups=2",
                  f"model.max_position_embeddings={LONG}"]


def parse_layout(layout: str):
    sizes = dict(tp=1, pp=1, dp=None)
    for key, value in re.findall(r"(tp|pp|dp)(\d+)", layout):
        sizes[key] = int(value)
    return sizes


def make_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.2).float()
    # per-sequence advantages for the RL step, from their own stream
    advantages = torch.randn(GLOBAL_BATCH, 1, generator=torch.Generator().manual_seed(1))
    return (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_mask,
            advantages * loss_mask)


def micro_batches(dp_rank, dp_size, full_batch):
    tokens, labels, mask, advantages = make_batch()
    if not full_batch:  # this DP rank's contiguous share of the global batch
        per = GLOBAL_BATCH // dp_size
        sl = slice(dp_rank * per, (dp_rank + 1) * per)
        tokens, labels, mask, advantages = tokens[sl], labels[sl], mask[sl], advantages[sl]
    n = MICRO_BATCHES if full_batch else MICRO_BATCHES // dp_size
    return [SimpleNamespace(tokens=t, labels=l, loss_mask=m, advantages=a)
            for t, l, m, a in zip(tokens.chunk(n), labels.chunk(n), mask.chunk(n),
                                  advantages.chunk(n))]


TIED = os.environ.get("TIE_EMBEDDINGS") == "1"


def setup(layout, world):
    sizes = parse_layout(layout)
    cfg = load_config(None, OVERRIDES + [f"model.tie_word_embeddings={str(TIED).lower()}",
        f"parallel.tensor_model_parallel_size={sizes['tp']}",
        f"parallel.pipeline_model_parallel_size={sizes['pp']}",
        f"parallel.sequence_parallel={str('sp' in layout).lower()}",
        f"model.recompute_granularity={'full' if 'rc' in layout else 'null'}"], world_size=world)
    info = state.initialize(cfg.parallel)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.training)
    return cfg, info, model, optimizer


def gathered_logits(model, batches):
    """Full-vocabulary logits on the last stage (None elsewhere)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured = forward_only(model, [SimpleNamespace(tokens=b.tokens) for b in batches],
                            lambda batch, logits: gather_from_tensor_model_parallel_region(
                                logits).detach().clone())
    return None if captured is None else torch.cat(captured)


def rl_step(model, reference, optimizer, batches, initial_logits):
    """One RL step with the reference KL through the trainer's functions; returns its results
    (log-probs, loss and metrics on the last stage) and failures of the layout-free checks."""
    from megatron.core import parallel_state as mpu

    dp_group = mpu.get_data_parallel_group()
    rl = [MicroBatch(tokens=b.tokens, targets=b.labels, loss_mask=b.loss_mask,
                     advantages=b.advantages, rollout_logprobs=torch.zeros_like(b.loss_mask))
          for b in batches]
    ref_parts = actor.compute_logprobs(reference, rl, TEMPERATURE, VOCAB)
    old_parts = actor.compute_logprobs(model, rl, TEMPERATURE, VOCAB)
    if ref_parts is not None:
        for mb, old, ref in zip(rl, old_parts, ref_parts):
            mb.old_logprobs, mb.ref_logprobs = old, ref
    losses = []  # each micro-batch's share of the mini-batch loss, as train_mini_batch sums it

    original = actor.policy_loss

    def recording_policy_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss, stats

    actor.policy_loss = recording_policy_loss
    try:
        metrics = actor.train_mini_batch(model, optimizer, rl, RL_CONFIG, TEMPERATURE, VOCAB,
                                         seed=0)
    finally:
        actor.policy_loss = original
    result, failures = {"rl_params": full_state(model, "param")}, []
    # The reference is frozen: the two updates since it was built left it as it was (every
    # pipeline stage takes part in the forward).
    again = actor.compute_logprobs(reference, rl, TEMPERATURE, VOCAB)
    if any(p.requires_grad for p in reference.parameters()):
        failures.append("the reference policy has parameters that require grad")
    if ref_parts is None:
        return result, failures
    if not metrics.get("update_ok"):
        failures.append("RL step: optimizer step was skipped")
    loss = torch.stack(losses).sum()
    dist.all_reduce(loss, group=dp_group)
    ref_logprobs = torch.cat(ref_parts)
    result.update(ref_logprobs=ref_logprobs, rl_loss=loss,
                  **{f"rl_{k}": torch.tensor(float(metrics[k]))
                     for k in ("kl_ref", "entropy", "ppo_kl", "grad_norm")})
    # The reference is the initial policy: its log-probs are those of the logits captured
    # before any update (this DP rank's share, real vocabulary columns only).
    targets = torch.cat([b.labels for b in batches])
    initial = torch.log_softmax(initial_logits[..., :VOCAB].double() / TEMPERATURE, -1)
    initial = initial.gather(-1, targets[..., None])[..., 0].float()
    if not torch.allclose(ref_logprobs, initial, **TOL):
        failures.append(f"reference log-probs differ from the initial policy's by "
                        f"{(ref_logprobs - initial).abs().max().item():.3e}")
    if not torch.equal(torch.cat(again), ref_logprobs):
        failures.append("the reference policy moved during training")
    if not metrics["kl_ref"] > 0:
        failures.append(f"kl_ref = {metrics['kl_ref']} one update after the initial "
                        f"weights: the check tests nothing")
    return result, failures


def run_layout(layout, world, ckpt_dir, full_batch):
    cfg, info, model, optimizer = setup(layout, world)
    load_model(model, os.path.join(ckpt_dir, "init"))
    batches = micro_batches(info.dp_rank, info.dp_size, full_batch)
    result = {"logits": gathered_logits(model, batches)}
    reference = None if LONG else actor.build_reference_model(model, cfg.model, cfg.parallel)
    metrics, ok, grad_norm = train_step([model], optimizer, batches, token_mean_loss)
    assert ok, f"{layout}: optimizer step was skipped"
    if metrics:
        local = torch.stack([m["lm_loss"] for m in metrics]).mean()
        from megatron.core import parallel_state as mpu
        dist.all_reduce(local, group=mpu.get_data_parallel_group())
        result["loss"] = local / info.dp_size
    result["grad_norm"] = torch.tensor(float(grad_norm))
    result["grads"] = full_state(model, "grad")
    result["params"] = full_state(model, "param")
    result["rl_failures"] = []
    if reference is not None:
        rl_result, result["rl_failures"] = rl_step(model, reference, optimizer, batches,
                                                   result["logits"])
        result.update(rl_result)
    return model, result


def info_is_first_loss_rank():
    from megatron.core import parallel_state as mpu
    return (mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0)


def compare(name, got, want, layout, failures):
    if got.shape != want.shape:
        failures.append(f"{layout}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if not torch.allclose(got, want, **TOL):
        err = (got - want).abs().max().item()
        failures.append(f"{layout}: {name} differs, max abs err {err:.3e}")


def main():
    ckpt_dir, layouts = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if os.environ.get("BREAK_TP_MAPPING") == "1":
        import megatron_rl.compat  # noqa: F401  (patches before megatron imports)
        from megatron_rl.compat import apply_cpu_patches
        apply_cpu_patches()
        from megatron.core.tensor_parallel import layers
        layers.reduce_from_tensor_model_parallel_region = lambda x, *a, **k: x

    # Reference: DP=world with identical data on every rank == one process.
    cfg, info, model, _ = setup(f"dp{world}", world)
    save_model(model, os.path.join(ckpt_dir, "init"))
    _, ref = run_layout(f"dp{world}", world, ckpt_dir, full_batch=True)

    failures = [f"dp{world} (reference): {f}" for f in ref["rl_failures"]]
    for layout in layouts:
        model, got = run_layout(layout, world, ckpt_dir, full_batch=False)
        if got["logits"] is not None:  # this DP rank's share of the batch
            from megatron.core import parallel_state as mpu
            share = ref["logits"].chunk(mpu.get_data_parallel_world_size())[
                mpu.get_data_parallel_rank()]
            compare("logits", got["logits"], share, layout, failures)
            if "ref_logprobs" in got:
                share = ref["ref_logprobs"].chunk(mpu.get_data_parallel_world_size())[
                    mpu.get_data_parallel_rank()]
                compare("ref_logprobs", got["ref_logprobs"], share, layout, failures)
        if "loss" in got:
            compare("loss", got["loss"], ref["loss"], layout, failures)
        compare("grad_norm", got["grad_norm"], ref["grad_norm"], layout, failures)
        for name in ("rl_loss", "rl_kl_ref", "rl_entropy", "rl_ppo_kl", "rl_grad_norm"):
            if name in got:
                compare(name, got[name], ref[name], layout, failures)
        failures += [f"{layout}: {f}" for f in got["rl_failures"]]
        for which in ("grads", "params", "rl_params"):
            if which not in got:
                continue
            for name, tensor in got[which].items():
                if name not in ref[which] and name == "output_layer.weight" and TIED:
                    continue  # checked against the embedding below
                if name not in ref[which]:
                    failures.append(f"{layout}: {name} has no reference")
                    continue
                compare(f"{which}[{name}]", tensor, ref[which][name], layout, failures)
        if TIED and "output_layer.weight" in got["grads"]:
            # The last stage's copy of the tied embedding must carry the full (summed) gradient.
            compare("tied output_layer grad", got["grads"]["output_layer.weight"],
                    ref["grads"]["embedding.word_embeddings.weight"], layout, failures)
        if "loss" in got and info_is_first_loss_rank():
            print(f"layout {layout}: loss {got['loss'].item():.6f} ref {ref['loss'].item():.6f} "
                  f"grad_norm {got['grad_norm'].item():.6f} ref {ref['grad_norm'].item():.6f}"
                  + (f"; RL step loss {got['rl_loss'].item():.6f} ref {ref['rl_loss'].item():.6f}"
                     f" kl_ref {got['rl_kl_ref'].item():.3e} ref {ref['rl_kl_ref'].item():.3e}"
                     if "rl_loss" in got else ""), flush=True)
        # Resharding: save the updated weights in this layout, load them into the reference
        # layout and check they arrive intact.
        out = os.path.join(ckpt_dir, f"after_{layout}")
        save_model(model, out)
        _, _, ref_layout_model, _ = setup(f"dp{world}", world)
        load_model(ref_layout_model, out)
        final = got.get("rl_params", got["params"])
        for name, tensor in full_state(ref_layout_model, "param").items():
            if name in final:
                compare(f"resharded[{name}]", final[name], tensor, layout, failures)
        # Grads per layout must cover the whole model across PP stages.
        names = [None] * world
        dist.all_gather_object(names, sorted(got["grads"]))
        missing = set(ref["grads"]) - set().union(*map(set, names))
        if missing:
            failures.append(f"{layout}: no rank holds {sorted(missing)}")

    all_failures = [None] * world
    dist.all_gather_object(all_failures, failures)
    state.destroy()
    flat = [f"rank {r}: {f}" for r, fs in enumerate(all_failures) for f in fs]
    if flat:
        if rank == 0:
            print("\n".join(flat[:40]), flush=True)
        sys.exit(1)
    if rank == 0:
        print(f"OK: {' '.join(layouts)} match the single-process reference", flush=True)


if __name__ == "__main__":
    main()
