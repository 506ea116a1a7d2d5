"""A rank that stops answering does not hang the others: their collective fails after
parallel.timeout_minutes (the launch then fails and the job resumes from its checkpoint, which
tests/integration/test_faults.py checks for a killed rank)."""
import subprocess
import sys
import time

import pytest

from megatron_rl.ports import free_port
from tests.torchrun import ROOT

pytestmark = pytest.mark.distributed


def test_stuck_rank_times_out_instead_of_hanging():
    timeout_s = 6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "tests/distributed/workers/stuck_rank_worker.py", str(timeout_s / 60)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110,
                          env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    elapsed = time.monotonic() - t0
    line = next(l for l in proc.stdout.splitlines() if "STUCK_RESULT" in l)
    assert "failed_after" in line, proc.stdout + proc.stderr
    waited = float(line.split()[-2])
    assert timeout_s * 0.8 <= waited <= timeout_s * 4, line
    # the launch ends well before the stuck rank would
    assert proc.returncode != 0 and elapsed < 100
