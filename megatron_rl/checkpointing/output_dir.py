"""One job per output folder, and no run silently mixed into or replacing an earlier one.

The entry (megatron_rl.train) calls claim_output_dir on rank 0 before anything heavy:

- OUTPUT/job.lock: an exclusive POSIX lock (fcntl) on it while the job runs, and in it the
  holder's pid, host, process start and command; released (the file removed) when the job ends.
  The kernel drops the lock when the process dies, so a kill -9 leaves only the file: the next job
  finds it unlocked, names the dead holder and takes over. Where the file system has no locks the
  record decides: a holder on this host that is no longer running is stale; one on another host
  cannot be checked and is refused (remove the file if that job is gone). A POSIX lock is not
  inherited by forked children and ends when its process closes any descriptor of the file: only
  OutputLock opens it.
- an earlier run in the folder (a checkpoint or `latest` under checkpoints/, records in
  metrics.jsonl): a fresh run refuses to start unless told `--resume auto` (continue it) or
  `--overwrite` (remove checkpoints/, metrics.jsonl and tensorboard/, each named; config.json is
  rewritten at start and plots/ at the end anyway). `--resume auto` with no checkpoint to continue
  but records in metrics.jsonl refuses the same way: it would append a second series from step 0.

Light on purpose (no torch): the refusals come within a second of the launch.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import List, Optional

from megatron_rl.errors import OutputDirError

LOCK_FILE = "job.lock"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
OVERWRITTEN = (CHECKPOINTS, METRICS, "tensorboard")  # what --overwrite removes
_STEP_NAME = re.compile(r"step_\d+")  # checkpointing.checkpoint's folder names
_HELD = set()  # lock files this process holds: a POSIX lock does not exclude its own process


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _start_ticks(pid: int) -> Optional[int]:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22): tells the process
    that wrote a lock record from a later one that got its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int, start: Optional[int]) -> bool:
    """Whether the process that wrote a record on this host (pid, start) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_ticks(pid)
    return start is None or now is None or now == start


class OutputLock:
    """The exclusive claim of one job (its rank 0) on an output folder."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise OutputDirError naming its holder; a stale one (its process
        is gone) is taken over, said on stderr."""
        os.makedirs(self.output_dir, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise OutputDirError(f"{self.output_dir} is already claimed by this process")
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._lock(fd)
                if not self._same_file(fd):  # its holder released and removed it meanwhile
                    os.close(fd)
                    continue
                self._check(self._holder(fd), locked)
                self._write(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            _HELD.add(key)
            return
        raise OutputDirError(f"{self.path}: could not take the lock (it kept being replaced)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._same_file(self._fd):
                os.unlink(self.path)
        finally:
            os.close(self._fd)  # drops the lock
            self._fd = None
            _HELD.discard(os.path.realpath(self.path))

    @property
    def held(self) -> bool:
        return self._fd is not None

    # -- inside ----------------------------------------------------------------------------------

    def _lock(self, fd: int) -> bool:
        """True: locked; False: this file system has no locks (the record decides)."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise OutputDirError(self._busy(self._holder(fd))) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    @staticmethod
    def _holder(fd: int) -> Optional[dict]:
        try:
            holder = json.loads(os.pread(fd, 65536, 0).decode())
            return holder if isinstance(holder.get("pid"), int) else None
        except (ValueError, AttributeError, UnicodeDecodeError):
            return None

    def _busy(self, holder: Optional[dict], why: str = "") -> str:
        who = (f"pid {holder['pid']} on {holder.get('host')}, since {holder.get('since')}"
               if holder else "its record is not written yet")
        return (f"{self.output_dir} is in use by another job ({who}; {self.path}){why}: wait for "
                f"it to end or use another training.output_dir")

    def _check(self, holder: Optional[dict], locked: bool) -> None:
        """The lock is ours (or there are no locks here): does the record name a live holder?"""
        if holder is None:
            return
        pid, host = holder["pid"], holder.get("host")
        if host == socket.gethostname():
            if pid == os.getpid():
                return  # a record this process left
            if _running(pid, holder.get("start")):
                raise OutputDirError(self._busy(holder, "" if not locked else
                                                " (this file system's locks did not keep it out)"))
            _say(f"{self.path}: taking over the lock of pid {pid} on {host}, which is no longer "
                 f"running (a stale lock: that job ended without releasing it, e.g. kill -9)")
        elif locked:
            _say(f"{self.path}: taking over the lock of pid {pid} on {host}, which no longer "
                 f"holds it (a stale lock: that job ended without releasing it)")
        else:
            raise OutputDirError(self._busy(holder, f" (this file system has no locks and a job "
                                                    f"on another host cannot be checked: remove "
                                                    f"{self.path} if that job is gone)"))

    def _write(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "start": _start_ticks(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)


def _checkpoints(output_dir: str) -> List[str]:
    """The checkpoint folders (step_N) and `latest` of an earlier run, sorted."""
    try:
        names = os.listdir(os.path.join(output_dir, CHECKPOINTS))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n == "latest" or _STEP_NAME.fullmatch(n))


def _metrics_records(output_dir: str) -> int:
    try:
        with open(os.path.join(output_dir, METRICS)) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def claim_output_dir(output_dir: str, resume: str = "none",
                     overwrite: bool = False) -> OutputLock:
    """Rank 0, before anything heavy: lock `output_dir` for this job and check that the run
    neither mixes into nor silently replaces an earlier one there (the module docstring). Returns
    the held lock (release it when the job ends); OutputDirError (one line) when the job must not
    start."""
    lock = OutputLock(output_dir)
    lock.acquire()
    try:
        checkpoints, records = _checkpoints(output_dir), _metrics_records(output_dir)
        steps = [n for n in checkpoints if n != "latest"]
        parts = []
        if steps:
            parts.append(f"checkpoint {steps[0]}" if len(steps) == 1
                         else f"checkpoints {steps[0]}..{steps[-1]}")
        elif checkpoints:
            parts.append(f"{CHECKPOINTS}/latest")
        if records:
            parts.append(f"{records} records in {METRICS}")
        found = ", ".join(parts)
        if overwrite:
            for name in OVERWRITTEN:
                path = os.path.join(output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
                else:
                    continue
                _say(f"--overwrite: removed {path}")
        elif resume == "none" and found:
            raise OutputDirError(
                f"{output_dir} already holds a run ({found}): continue it with --resume auto, or "
                f"start over with --overwrite (removes its {', '.join(OVERWRITTEN)})")
        elif resume == "auto" and not steps and records:
            raise OutputDirError(
                f"--resume auto: {output_dir} holds no checkpoint to continue from but {records} "
                f"records in {METRICS} of an earlier run, which a run from step 0 would follow: "
                f"start over with --overwrite (removes its {', '.join(OVERWRITTEN)})")
    except BaseException:
        lock.release()
        raise
    return lock
