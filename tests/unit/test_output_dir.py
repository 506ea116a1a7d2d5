"""One job per output folder (issue #20): an exclusive lock that a second job is refused by and
that a dead job's leftover file does not keep; a fresh run that would mix into or silently replace
an earlier run refuses to start, and --overwrite removes exactly what it says. No torch here."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_rl.checkpointing import output_dir
from megatron_rl.checkpointing.output_dir import LOCK_FILE, OutputLock, claim_output_dir
from megatron_rl.errors import OutputDirError
from tests.torchrun import ROOT

HOLDER = ("import sys; from megatron_rl.checkpointing.output_dir import OutputLock; "
          "lock = OutputLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
          "sys.stdin.read(); lock.release()")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock (until its stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline() == "held\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_job_is_refused_until_the_first_ends(tmp_path, holder):
    """Before: no lock; two jobs on one folder interleaved metrics.jsonl and checkpoints."""
    run = tmp_path / "run"
    with pytest.raises(OutputDirError, match=rf"{run} is in use by another job \(pid "
                                             rf"{holder.pid} on {socket.gethostname()}, since"):
        claim_output_dir(str(run), "auto")
    holder.stdin.close()  # it releases: the file goes with the lock
    assert holder.wait(timeout=30) == 0 and not (run / LOCK_FILE).exists()
    lock = claim_output_dir(str(run), "auto")
    # (read through the lock's own descriptor: closing another one would drop a POSIX lock)
    record = lock._holder(lock._fd)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path, holder, capfd):
    run = tmp_path / "run"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (run / LOCK_FILE).exists()  # kill -9: the file stays, the kernel dropped the lock
    lock = claim_output_dir(str(run), "auto")
    assert (f"taking over the lock of pid {holder.pid} on {socket.gethostname()}, which is no "
            f"longer running (a stale lock") in capfd.readouterr().err
    lock.release()


def test_this_process_cannot_claim_a_folder_twice(tmp_path):
    lock = OutputLock(str(tmp_path))
    lock.acquire()
    try:
        with pytest.raises(OutputDirError, match="already claimed by this process"):
            OutputLock(str(tmp_path)).acquire()
    finally:
        lock.release()


def write_record(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(dict(since="then", **record)))


def test_without_file_locks_the_record_decides(tmp_path, monkeypatch, capfd):
    """A file system without locks: a live holder on this host is refused, a dead one is
    stale, one on another host cannot be checked and is refused with what to do."""
    def no_locks(fd, op):
        raise OSError(output_dir.errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output_dir.fcntl, "lockf", no_locks)
    run = tmp_path / "run"
    parent = os.getppid()  # alive, on this host
    write_record(run, pid=parent, host=socket.gethostname(),
                 start=output_dir._start_ticks(parent))
    with pytest.raises(OutputDirError, match=f"in use by another job \\(pid {parent} on"):
        claim_output_dir(str(run))
    # the same pid with another start time: the pid was reused, the holder is gone
    write_record(run, pid=parent, host=socket.gethostname(), start=1)
    claim_output_dir(str(run)).release()
    assert f"taking over the lock of pid {parent}" in capfd.readouterr().err
    write_record(run, pid=12345, host="elsewhere", start=1)
    with pytest.raises(OutputDirError, match=f"no locks and a job on another host cannot be "
                                             f"checked: remove {run / LOCK_FILE} if that job"):
        claim_output_dir(str(run))


def test_a_lock_file_from_another_host_that_nobody_holds_is_stale(tmp_path, capfd):
    run = tmp_path / "run"
    write_record(run, pid=12345, host="elsewhere", start=1)
    claim_output_dir(str(run)).release()
    assert "taking over the lock of pid 12345 on elsewhere, which no longer holds it" in \
        capfd.readouterr().err


def earlier_run(run, steps=(4, 5), records=3):
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    for step in steps:
        (ckpt / f"step_{step:08d}").mkdir()
    if steps:
        (ckpt / "latest").write_text(f"step_{steps[-1]:08d}")
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(records)))
    (run / "tensorboard").mkdir()
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")


def test_a_fresh_run_into_an_earlier_run_is_refused(tmp_path):
    """Before: the new step_00000005 was pruned the moment it was written (pruning kept the
    higher names of the earlier run), latest named nothing, and metrics.jsonl got a second
    series."""
    run = tmp_path / "run"
    earlier_run(run)
    before = sorted(os.listdir(run))
    with pytest.raises(OutputDirError) as info:
        claim_output_dir(str(run), "none")
    assert str(info.value) == (
        f"{run} already holds a run (checkpoints step_00000004..step_00000005, 3 records in "
        f"metrics.jsonl): continue it with --resume auto, or start over with --overwrite "
        f"(removes its checkpoints, metrics.jsonl, tensorboard)")
    assert sorted(os.listdir(run)) == before  # nothing touched, no lock left
    claim_output_dir(str(run), "auto").release()  # continuing it is fine


def test_resume_auto_with_nothing_to_resume_but_metrics_is_refused(tmp_path):
    """A run killed before its first checkpoint: --resume auto would start from step 0 and
    append a second series to its metrics.jsonl."""
    run = tmp_path / "run"
    earlier_run(run, steps=(), records=2)
    (run / "checkpoints" / ".tmp_step_00000001").mkdir()  # killed during the first save
    with pytest.raises(OutputDirError, match="--resume auto: .* holds no checkpoint to continue "
                                             "from but 2 records in metrics.jsonl"):
        claim_output_dir(str(run), "auto")
    with pytest.raises(OutputDirError, match="already holds a run \\(2 records in metrics"):
        claim_output_dir(str(run), "none")
    (run / "metrics.jsonl").write_text("")  # nothing recorded: nothing to mix into
    claim_output_dir(str(run), "none").release()
    claim_output_dir(str(run), "auto").release()


def test_overwrite_removes_the_earlier_run_and_names_what(tmp_path, capfd):
    run = tmp_path / "run"
    earlier_run(run)
    lock = claim_output_dir(str(run), "none", overwrite=True)
    lock.release()
    assert sorted(os.listdir(run)) == ["config.json", "notes.txt"]
    err = capfd.readouterr().err
    for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
        assert f"--overwrite: removed {run / name}" in err
