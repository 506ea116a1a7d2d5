"""The LR schedule spans the run's optimizer steps: the trainer advances it once per mini-batch
(training.mini_batches x training.ppo_epochs per RL step), so a decaying schedule reaches
training.min_lr at the last RL step, not part-way through the run."""
import pytest
import torch

from megatron_rl.compat import apply_cpu_patches
from megatron_rl.config import ConfigError, load_config
from megatron_rl.training.optimizer import build_lr_scheduler, optimizer_steps_per_rl_step

apply_cpu_patches()  # megatron.core imports triton on hosts without CUDA otherwise
# The schedule is computed on a plain torch optimizer without process groups, on purpose;
# megatron's scheduler then warns that it cannot tell its rank.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Could not determine rank from torch.distributed:UserWarning")


def lr_per_rl_step(t):
    """The `lr` each RL step logs (after its updates), advancing the schedule as the trainer
    does: once per optimizer step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    scheduler = build_lr_scheduler(optimizer, t)
    logged = []
    for _ in range(t.steps):
        for _ in range(t.ppo_epochs * t.mini_batches):
            scheduler.step(1)
        logged.append(optimizer.param_groups[0]["lr"])
    return logged


@pytest.mark.parametrize("style", ["linear", "cosine"])
@pytest.mark.parametrize("mini_batches, ppo_epochs, warmup", [
    (1, 1, 0), (2, 1, 0), (8, 1, 0), (2, 3, 0), (2, 1, 4)])
def test_decay_reaches_min_lr_at_the_last_step_and_not_before(style, mini_batches, ppo_epochs,
                                                              warmup):
    t = load_config(None, ["training.steps=20", "training.lr=1e-3", "training.min_lr=1e-5",
                           f"training.lr_decay_style={style}",
                           f"training.mini_batches={mini_batches}",
                           f"training.ppo_epochs={ppo_epochs}",
                           f"training.lr_warmup_steps={warmup}"]).training
    lrs = lr_per_rl_step(t)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-12)
    assert all(lr > 1e-5 for lr in lrs[:-1])  # the decay spans the whole run
    # warmup (in RL steps) rises to training.lr; from there the lr never rises again
    peak = max(range(len(lrs)), key=lambda i: lrs[i])
    assert peak == max(warmup - 1, 0)
    assert lrs[peak] == pytest.approx(1e-3, rel=1e-12) if warmup else lrs[0] < 1e-3
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_cosine_is_at_its_midpoint_half_way():
    t = load_config(None, ["training.steps=20", "training.mini_batches=2", "training.lr=1e-3",
                           "training.lr_decay_style=cosine"]).training
    # the run: with the schedule sized in RL steps the lr was 0.0 from step 10 on
    assert lr_per_rl_step(t)[9] == pytest.approx(0.5e-3)
    assert optimizer_steps_per_rl_step(t) == 2


@pytest.mark.parametrize("path", ["examples/tiny_cpu.yaml", "tests/configs/tiny_addition.yaml"])
def test_constant_style_of_the_baselines_is_unchanged(path):
    t = load_config(path).training
    assert (t.lr_decay_style, t.lr_warmup_steps) == ("constant", 0)
    assert lr_per_rl_step(t) == [t.lr] * t.steps


def test_trainer_logs_the_schedule(tmp_path):
    from megatron_rl.training.trainer import RLTrainer

    cfg = load_config("tests/configs/tiny_addition.yaml", [
        "training.sft_steps=0", "training.steps=2", "training.eval_interval=0",
        "training.probe_interval=0", "rollout.prompts_per_step=4", "algorithm.n=4",
        "training.mini_batches=2", "training.micro_batch_size=2", "training.lr=1e-3",
        "training.min_lr=1e-4", "training.lr_decay_style=linear",
        f"training.output_dir={tmp_path / 'run'}", f"training.cache_dir={tmp_path / 'cache'}"],
        world_size=1, on_this_host=True)
    trainer = RLTrainer(cfg)
    try:
        logged = [trainer.train_step(step)["lr"] for step in (1, 2)]
    finally:
        trainer.close()
    assert logged == pytest.approx([0.55e-3, 1e-4])


@pytest.mark.parametrize("style, warmup, refused", [
    ("cosine", 19, False), ("cosine", 20, True), ("linear", 20, True), ("constant", 20, False),
    ("constant", 21, True)])
def test_warmup_leaves_the_decay_some_steps(style, warmup, refused):
    overrides = ["training.steps=20", f"training.lr_decay_style={style}",
                 f"training.lr_warmup_steps={warmup}"]
    if not refused:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=r"training.lr_warmup_steps must be in \[0, "
                                          r"training.steps=20"):
        load_config(None, overrides)
