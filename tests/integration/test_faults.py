"""Faults the job must survive: non-finite gradients skip the update without touching weights
or optimizer state; SIGTERM writes a checkpoint of the current step and exits cleanly; a crash
mid-checkpoint leaves the previous one loadable; a killed rank fails the launch fast and the job
resumes."""
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from megatron_rl.algorithms import AlgorithmConfig
from megatron_rl.checkpointing.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_rl.checkpointing.model import load_model
from megatron_rl.config import load_config
from megatron_rl.models.gpt import build_gpt_model
from megatron_rl.parallel import state
from megatron_rl.ports import free_port
from megatron_rl.training.actor import compute_logprobs, train_mini_batch
from megatron_rl.training.rl_batch import MicroBatch
from megatron_rl.training.optimizer import build_lr_scheduler, build_optimizer, wrap_ddp
from tests.torchrun import ROOT

warnings.filterwarnings("ignore")


@pytest.fixture
def tiny_model():
    """(cfg, DDP-wrapped tiny GPT, megatron optimizer) in a 1-rank process group."""
    cfg = load_config(None, ["model.vocab_size=40", "model.make_vocab_size_divisible_by=8"],
                      world_size=1)
    state.initialize(cfg.parallel)
    model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel))
    yield cfg, model, build_optimizer([model], cfg.training)
    state.destroy()


def test_nonfinite_gradients_skip_the_update(tiny_model):
    cfg, model, optimizer = tiny_model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (4, 10), generator=g)
    batch = MicroBatch(tokens=tokens, targets=torch.roll(tokens, -1, 1),
                       loss_mask=torch.ones(4, 10), advantages=torch.randn(4, 10, generator=g),
                       rollout_logprobs=torch.zeros(4, 10))
    batch.old_logprobs = compute_logprobs(model, [batch], 1.0, 40)[0]
    alg = AlgorithmConfig(loss_mode="kl_cov", k=0.1)

    def snapshot():
        params = [p.detach().clone() for p in model.parameters()]
        opt = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
               for s in optimizer.optimizer.state.values()]
        return params, opt

    before = snapshot()
    poisoned = dataclasses.replace(batch, advantages=batch.advantages.clone())
    poisoned.advantages[1, 3] = float("nan")
    metrics = train_mini_batch(model, optimizer, [poisoned], alg, 1.0, 40, seed=0)
    assert metrics["nonfinite_skipped"] == 1.0 and metrics["update_ok"] == 0.0
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert len(before[1]) == len(after[1]) and all(
        torch.equal(x[k], y[k]) for x, y in zip(before[1], after[1]) for k in x)

    metrics = train_mini_batch(model, optimizer, [batch], alg, 1.0, 40, seed=0)
    assert metrics["nonfinite_skipped"] == 0.0 and metrics["update_ok"] == 1.0
    assert any(not torch.equal(a, p) for a, p in zip(before[0], model.parameters()))


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_and_resumes(tmp_path, stop_signal):
    """SIGTERM (pre-emption) and Ctrl-C alike: the step finishes, a checkpoint, exit 0."""
    out = tmp_path / "run"
    common = ["--config", "tests/configs/tiny_addition.yaml", f"training.output_dir={out}",
              f"training.cache_dir={tmp_path / 'cache'}", "training.sft_steps=20",
              "training.eval_interval=0", "training.probe_interval=0",
              "rollout.prompts_per_step=4", "algorithm.n=4"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.train", *common,
                             "training.steps=500"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(stop_signal)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = steps[-1]
    assert 3 <= last < 500
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step_{last:08d}"
    assert f"{stop_signal.name}: checkpoint of step" in stdout + stderr
    resumed = subprocess.run([sys.executable, "-m", "megatron_rl.train", "--resume", "auto",
                              *common, f"training.steps={last + 2}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [last + 1, last + 2]


def test_crash_mid_checkpoint_leaves_previous_loadable(tmp_path, tiny_model):
    """A writer killed mid-save leaves a .tmp_ folder; `latest` still names the previous,
    complete checkpoint, which loads; the next save clears the leftovers."""
    cfg, model, optimizer = tiny_model
    scheduler = build_lr_scheduler(optimizer, cfg.training)
    root = tmp_path / "ckpt"
    save_checkpoint(str(root), 1, model, optimizer, scheduler, {"note": "good"})
    saved = [p.detach().clone() for p in model.parameters()]
    # What a kill -9 during the save of step 2 leaves behind: a half-written temp folder.
    partial = root / ".tmp_step_00000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00" * 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    path = latest_checkpoint(str(root))
    assert path.endswith("step_00000001")
    assert load_checkpoint(path, model, optimizer, scheduler)["note"] == "good"
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
    save_checkpoint(str(root), 2, model, optimizer, scheduler, {})
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]


class _Payload:
    """Unpickling this runs a command: what a tampered checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_loading_runs_no_pickled_code(tmp_path, tiny_model):
    """torch.distributed.checkpoint reads a checkpoint's .metadata with pickle.load; a payload
    planted there is refused before that, naming the file, and never runs."""
    cfg, model, optimizer = tiny_model
    scheduler = build_lr_scheduler(optimizer, cfg.training)
    root = tmp_path / "ckpt"
    save_checkpoint(str(root), 1, model, optimizer, scheduler, {})
    path = latest_checkpoint(str(root))
    marker = tmp_path / "pwned"
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = f.read()
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    for load in (lambda: load_checkpoint(path, model, optimizer, scheduler),
                 lambda: load_model(model, path)):
        with pytest.raises(pickle.UnpicklingError, match=r"\.metadata: refers to posix\.system"):
            load()
    assert not marker.exists()
    with open(os.path.join(path, ".metadata"), "wb") as f:  # the genuine one still loads
        f.write(metadata)
    load_checkpoint(path, model, optimizer, scheduler)


@pytest.mark.distributed
def test_dead_rank_fails_fast_and_the_job_resumes(tmp_path):
    """kill -9 of one torchrun rank mid-run: the launch ends promptly with an error (torchrun
    tears the group down; no rank waits in a collective), and --resume auto continues from the
    newest checkpoint."""
    import psutil

    out = tmp_path / "run"
    common = ["megatron_rl/train.py", "--config", "tests/configs/tiny_addition.yaml",
              f"training.output_dir={out}", f"training.cache_dir={tmp_path / 'cache'}",
              "training.sft_steps=20", "training.eval_interval=0", "training.probe_interval=0",
              "training.checkpoint_interval=2", "rollout.prompts_per_step=4", "algorithm.n=4",
              "parallel.tensor_model_parallel_size=2", "model.make_vocab_size_divisible_by=4"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    log = open(tmp_path / "launch.log", "w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(launcher + ["--master_port", str(free_port())] + common
                            + ["training.steps=500"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.5)
    assert latest.exists(), (tmp_path / "launch.log").read_text()[-3000:]
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = next(p for p in workers if "megatron_rl/train.py" in " ".join(p.cmdline()))
    killed_at = time.time()
    victim.kill()
    proc.wait(timeout=120)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    step = int(latest.read_text().split("_")[1])
    resumed = subprocess.run(launcher + ["--master_port", str(free_port())] + common
                             + ["--resume", "auto", f"training.steps={step + 1}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def tiny_job(out, tmp_path, *extra):
    return [sys.executable, "-m", "megatron_rl.train", "--config",
            "tests/configs/tiny_addition.yaml", f"training.output_dir={out}",
            f"training.cache_dir={tmp_path / 'cache'}", "training.sft_steps=0",
            "training.eval_interval=0", "training.probe_interval=0",
            "rollout.prompts_per_step=4", "algorithm.n=4", *extra]


def test_fresh_run_into_an_earlier_run_exits_2_and_overwrite_starts_over(tmp_path):
    """Before: the fresh run's step_00000005 was pruned as soon as it was written (the earlier
    run's step_00000010 was higher), latest named nothing and metrics.jsonl got a second series.
    Now: a one-line error and exit 2 before anything heavy; --overwrite removes the earlier run,
    naming each path, and starts over."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000010").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000010")
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    refused = subprocess.run(tiny_job(out, tmp_path, "training.steps=1"), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.splitlines() == [
        f"error: {out} already holds a run (checkpoint step_00000010, 1 records in "
        f"metrics.jsonl): continue it with --resume auto, or start over with --overwrite "
        f"(removes its checkpoints, metrics.jsonl, tensorboard)"]
    assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl"]  # untouched
    started = subprocess.run(tiny_job(out, tmp_path, "--overwrite", "training.steps=1"),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"--overwrite: removed {out / 'checkpoints'}" in started.stderr
    assert f"--overwrite: removed {out / 'metrics.jsonl'}" in started.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001"]
    assert not (out / "job.lock").exists()  # released at exit


def test_second_job_is_refused_and_kill_9_leaves_nothing_running(tmp_path):
    """Two jobs on one output_dir: the second exits 2 naming the first. kill -9 of the first
    leaves no process it started running (before: megatron's checkpoint-writer helper, ~280 MB,
    stayed under PID 1 for good); the next --resume auto takes over its stale lock, clears a
    leftover temporary folder and continues."""
    import psutil

    out = tmp_path / "run"
    args = tiny_job(out, tmp_path, "training.checkpoint_interval=1")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args + ["training.steps=500"], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not latest.exists():
        time.sleep(0.2)
    assert latest.exists(), (tmp_path / "first.log").read_text()[-3000:]

    second = subprocess.run(args + ["--resume", "auto", "training.steps=2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another job (pid {first.pid} on" in second.stderr

    started = psutil.Process(first.pid).children(recursive=True)
    first.kill()
    first.wait(timeout=60)
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]

    step = int(latest.read_text().split("_")[1])
    (out / "checkpoints" / ".tmp_step_99999999").mkdir()
    resumed = subprocess.run(args + ["--resume", "auto", f"training.steps={step + 1}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of pid {first.pid}" in resumed.stderr
    assert ".tmp_step_99999999" not in os.listdir(out / "checkpoints")
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert records[-1]["step"] == step + 1
