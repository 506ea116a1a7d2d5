"""Checkpoints are never lost and never load silently wrong (issue #20), in one process (a 1-rank
process group): digests written at save and checked at load; a damaged checkpoint named with its
file and the older intact one used instead; `latest` derived when missing; pruning that never
removes a newer checkpoint; leftovers of unfinished saves cleared; no writer helper process; a
full disk said as such."""
import errno
import json
import os
import warnings

import psutil
import pytest
import torch

from megatron_rl.checkpointing.checkpoint import (latest_checkpoint, load_checkpoint,
                                                  load_newest_intact, resume_candidates,
                                                  save_checkpoint)
from megatron_rl.checkpointing.digests import MANIFEST, folder_files
from megatron_rl.checkpointing.model import load_model
from megatron_rl.config import load_config
from megatron_rl.errors import CheckpointError
from megatron_rl.models.gpt import build_gpt_model
from megatron_rl.parallel import state
from megatron_rl.training.optimizer import build_lr_scheduler, build_optimizer, wrap_ddp

warnings.filterwarnings("ignore")


class Tiny:
    """A tiny GPT, its optimizer and scheduler in a 1-rank process group, and helpers."""

    def __init__(self):
        self.cfg = load_config(None, ["model.vocab_size=40",
                                      "model.make_vocab_size_divisible_by=8"], world_size=1)
        state.initialize(self.cfg.parallel)
        self.model = wrap_ddp(build_gpt_model(self.cfg.model, self.cfg.parallel))
        self.optimizer = build_optimizer([self.model], self.cfg.training)
        self.scheduler = build_lr_scheduler(self.optimizer, self.cfg.training)

    def weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def save(self, root, step, keep=2):
        """Weights that differ per step, saved as checkpoint `step`; returns them."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.01 * step)
        save_checkpoint(str(root), step, self.model, self.optimizer, self.scheduler,
                        {"note": step}, keep=keep)
        return self.weights()

    def load(self, path):
        return load_checkpoint(str(path), self.model, self.optimizer, self.scheduler)

    def has(self, weights):
        return all(torch.equal(a, b) for a, b in zip(weights, self.model.parameters()))


@pytest.fixture
def tiny():
    yield Tiny()
    state.destroy()


def step_dir(root, step):
    return root / f"step_{step:08d}"


def test_every_file_gets_a_digest(tmp_path, tiny):
    root = tmp_path / "ckpt"
    tiny.save(root, 1)
    folder = step_dir(root, 1)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256"
    files = manifest["files"]
    assert sorted(files) == folder_files(str(folder))
    assert {"train_state.json", ".metadata", "__0_0.distcp"} <= set(files)
    for name, digest in files.items():
        assert digest["bytes"] == os.path.getsize(folder / name)


def flip_4k(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def break_json(path):
    path.write_text(path.read_text()[:-7])


DAMAGE = {
    "flipped 4 KB in __0_0.distcp": ("__0_0.distcp", flip_4k, "content differs"),
    "truncated __0_0.distcp": ("__0_0.distcp", truncate, "truncated"),
    "truncated .metadata": (".metadata", truncate, "truncated"),
    "broken train_state.json": ("train_state.json", break_json, "truncated"),
    "deleted .metadata": (".metadata", os.remove, "missing"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_older_one_used(tmp_path, tiny, capfd, damage):
    """Before digests: flipped bytes loaded silently (a ruined model, exit 0); truncated files
    raised a bare EOFError / UnpicklingError / JSONDecodeError with no path and no fallback."""
    name, spoil, what = DAMAGE[damage]
    root = tmp_path / "ckpt"
    older = tiny.save(root, 1)
    tiny.save(root, 2)
    bad = step_dir(root, 2)
    spoil(bad / name)
    with pytest.raises(CheckpointError, match=f"{bad}/{name}: .*{what}"):
        tiny.load(bad)

    candidates = resume_candidates(str(root))
    assert candidates == [str(bad), str(step_dir(root, 1))]
    path, train_state = load_newest_intact(candidates, tiny.model, tiny.optimizer,
                                           tiny.scheduler)
    assert path == str(step_dir(root, 1)) and train_state["note"] == 1 and tiny.has(older)
    err = capfd.readouterr().err
    assert f"checkpoint {bad} is not usable" in err and f"{bad}/{name}" in err
    assert f"trying the next older one, {step_dir(root, 1)}" in err


def test_damage_without_digests_is_still_named(tmp_path, tiny, capfd):
    """A checkpoint saved before digests existed loads with a warning; damage to it is still a
    CheckpointError naming the folder and the file, not a bare EOFError or JSONDecodeError."""
    root = tmp_path / "ckpt"
    saved = tiny.save(root, 1)
    folder = step_dir(root, 1)
    os.remove(folder / MANIFEST)
    tiny.load(folder)
    assert tiny.has(saved)
    assert f"{folder} has no digests" in capfd.readouterr().err
    original = {n: (folder / n).read_bytes() for n in ("train_state.json", ".metadata",
                                                       "__0_0.distcp")}
    for name, spoil, match in (("train_state.json", break_json, "does not load: JSONDecodeError"),
                               (".metadata", truncate, r"\.metadata: unreadable"),
                               ("__0_0.distcp", truncate, "does not load")):
        spoil(folder / name)
        with pytest.raises(CheckpointError, match=f"{folder}.*{match}"):
            tiny.load(folder)
        (folder / name).write_bytes(original[name])


def test_nothing_usable_is_an_error_not_a_fresh_start(tmp_path, tiny):
    root = tmp_path / "ckpt"
    tiny.save(root, 1)
    tiny.save(root, 2)
    for step in (1, 2):
        flip_4k(step_dir(root, step) / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="(?s)no usable checkpoint:.*step_00000002.*"
                                              "step_00000001"):
        load_newest_intact(resume_candidates(str(root)), tiny.model, tiny.optimizer,
                           tiny.scheduler)


def test_a_checkpoint_that_does_not_fit_the_model_is_named(tmp_path, tiny):
    """Intact files, the wrong model (a config changed between runs): an error naming the
    checkpoint, raised (the caller does not start over)."""
    root = tmp_path / "ckpt"
    tiny.save(root, 1)
    state.destroy()
    other = Tiny.__new__(Tiny)
    other.cfg = load_config(None, ["model.vocab_size=40", "model.make_vocab_size_divisible_by=8",
                                   "model.hidden_size=32", "model.ffn_hidden_size=64"],
                            world_size=1)
    state.initialize(other.cfg.parallel)
    other.model = wrap_ddp(build_gpt_model(other.cfg.model, other.cfg.parallel))
    other.optimizer = build_optimizer([other.model], other.cfg.training)
    other.scheduler = build_lr_scheduler(other.optimizer, other.cfg.training)
    with pytest.raises(CheckpointError, match=f"{step_dir(root, 1)} does not load"):
        other.load(step_dir(root, 1))


def test_a_missing_latest_is_derived_from_the_checkpoints(tmp_path, tiny, capfd):
    """Before: `latest` deleted, --resume auto started from step 0 without a word."""
    root = tmp_path / "ckpt"
    tiny.save(root, 1, keep=3)
    tiny.save(root, 2, keep=3)
    newest = tiny.save(root, 3, keep=3)
    os.remove(root / "latest")
    assert latest_checkpoint(str(root)) == str(step_dir(root, 3))
    candidates = resume_candidates(str(root))
    assert candidates == [str(step_dir(root, s)) for s in (3, 2, 1)]
    assert f"{root}/latest is missing: taking the newest intact checkpoint" in \
        capfd.readouterr().err
    path, _ = load_newest_intact(candidates, tiny.model, tiny.optimizer, tiny.scheduler)
    assert path == str(step_dir(root, 3)) and tiny.has(newest)
    # a `latest` naming a folder that is gone is the same
    (root / "latest").write_text("step_00000007")
    assert resume_candidates(str(root))[0] == str(step_dir(root, 3))
    assert "names 'step_00000007', which is not a checkpoint" in capfd.readouterr().err


def test_pruning_never_removes_a_newer_checkpoint(tmp_path, tiny, capfd):
    """Before: a run that went back to step 4 pruned its own step_5 the moment it was written
    (pruning kept the highest names), leaving `latest` naming nothing."""
    root = tmp_path / "ckpt"
    for step in (9, 10, 11):
        tiny.save(root, step)
    assert sorted(os.listdir(root)) == ["latest", "step_00000010", "step_00000011"]
    for step in (5, 6, 7):
        tiny.save(root, step)
        assert (root / "latest").read_text() == f"step_{step:08d}"
        assert latest_checkpoint(str(root)) == str(step_dir(root, step))
    assert sorted(os.listdir(root)) == ["latest", "step_00000006", "step_00000007",
                                        "step_00000010", "step_00000011"]
    # --resume auto follows `latest`, not the newer leftovers, and says so
    assert resume_candidates(str(root)) == [str(step_dir(root, 7)), str(step_dir(root, 6))]
    assert "not resuming from the newer step_00000011, step_00000010" in capfd.readouterr().err


def test_leftovers_of_unfinished_saves_are_cleared(tmp_path, tiny, capfd):
    """Before: a .tmp_step_N of a kill -9 mid-save stayed for good when step N was never saved
    again."""
    root = tmp_path / "ckpt"
    tiny.save(root, 1)
    (root / ".tmp_step_00000099").mkdir()
    (root / ".tmp_step_00000099" / "__0_0.distcp").write_bytes(b"\0" * 100)
    (root / ".latest.tmp").write_text("step_00000099")
    tiny.save(root, 2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]
    err = capfd.readouterr().err
    assert f"removing {root}/.tmp_step_00000099, left by a save that did not finish" in err


def test_saving_starts_no_helper_process(tmp_path, tiny, monkeypatch):
    """Before: the first save started multiprocessing's spawn Manager (megatron's write-results
    queue), a ~280 MB process left running as an orphan by every kill -9."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a fresh process
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    tiny.save(tmp_path / "ckpt", 1)
    tiny.load(step_dir(tmp_path / "ckpt", 1))
    load_model(tiny.model, str(step_dir(tmp_path / "ckpt", 1)))
    started = [p.cmdline() for p in me.children(recursive=True) if p.pid not in before]
    assert started == []


def test_a_full_disk_is_said_as_such(tmp_path, tiny, monkeypatch):
    """Before: "[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598" (or
    megatron's "Worker failure ... <class 'OSError'>"), never "no space left on device"."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    root = tmp_path / "ckpt"
    tiny.save(root, 1)
    size = sum(os.path.getsize(step_dir(root, 1) / n) for n in os.listdir(step_dir(root, 1)))

    def expect_disk_full():
        with pytest.raises(CheckpointError) as info:
            tiny.save(root, 2)
        message = str(info.value)
        assert message.startswith(f"no space left on device: writing checkpoint step_00000002 "
                                  f"to {root} failed; a checkpoint takes about {size:,} bytes")
        assert f"The previous checkpoint {step_dir(root, 1)} stays latest" in message
        assert sorted(os.listdir(root)) == ["latest", "step_00000001"]  # partial write removed
        assert (root / "latest").read_text() == "step_00000001"
        return message

    # a real ENOSPC from the kernel, through megatron's writer: its data file is /dev/full
    prepare = filesystem_async.FileSystemWriterAsync.prepare_write_data

    def onto_dev_full(self, plan, planner):
        prepare(self, plan, planner)
        for path, _, _ in self.write_buckets:
            os.symlink("/dev/full", path)

    with monkeypatch.context() as m:
        m.setattr(filesystem_async.FileSystemWriterAsync, "prepare_write_data", onto_dev_full)
        assert "No space left on device" in expect_disk_full()

    # the zip writer's short write, as torch.save reports it
    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598")

    with monkeypatch.context() as m:
        m.setattr(dist_checkpointing, "save", short_write)
        assert "unexpected pos 704 vs 598" in expect_disk_full()

    # ENOSPC on a file the trainer writes itself (train_state.json)
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("train_state.json") and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr("builtins.open", full_open)
        assert "[Errno 28] No space left on device: '" in expect_disk_full()

    # an error that is not a full disk stays what it is
    def other(*args, **kwargs):
        raise ValueError("something else")

    with monkeypatch.context() as m:
        m.setattr(dist_checkpointing, "save", other)
        with pytest.raises(ValueError, match="something else"):
            tiny.save(root, 2)


def test_the_trainer_resumes_from_the_newest_intact_checkpoint(tmp_path, capfd):
    """RLTrainer(resume="auto") with `latest` deleted and the newest checkpoint damaged: it
    resumes from the older one and says why, instead of starting from step 0."""
    from megatron_rl.training.trainer import RLTrainer

    cfg = load_config("tests/configs/tiny_addition.yaml", [
        "training.sft_steps=0", "training.steps=2", "training.eval_interval=0",
        "training.probe_interval=0", "rollout.prompts_per_step=4", "algorithm.n=4",
        f"training.output_dir={tmp_path / 'run'}", f"training.cache_dir={tmp_path / 'cache'}"],
        world_size=1, on_this_host=True)
    trainer = RLTrainer(cfg)
    try:
        for step in (1, 2):
            trainer.train_step(step)
            trainer.save()
            if step == 1:
                saved = [p.detach().clone() for p in trainer.model.parameters()]
    finally:
        trainer.close()
    root = tmp_path / "run" / "checkpoints"
    os.remove(root / "latest")
    flip_4k(step_dir(root, 2) / "__0_0.distcp")
    resumed = RLTrainer(cfg, resume="auto")
    try:
        assert resumed.step == resumed.start_step == 1
        assert all(torch.equal(a, b) for a, b in zip(saved, resumed.model.parameters()))
    finally:
        resumed.close()
    err = capfd.readouterr().err
    assert f"{root}/latest is missing" in err and f"checkpoint {step_dir(root, 2)} is not " \
                                                  f"usable" in err
    os.remove(step_dir(root, 1) / "__0_0.distcp")  # nothing usable: an error, not step 0
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        RLTrainer(cfg, resume="auto")
