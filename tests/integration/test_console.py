"""A plain run's console holds only the project's own lines: the warm-start entry builds the
cached warm start (a dist_checkpointing save), then a 2-step RL job loads it and writes a
checkpoint per step; megatron-core and torch warn at import, on the model build, on each load and
on the first save, and every one of those is silenced (megatron_rl/console.py)."""
import os
import re
import subprocess
import sys

from megatron_rl.console import PREFIX
from tests.torchrun import ROOT

ARGS = ["--config", "tests/configs/tiny_addition.yaml", "training.sft_steps=5",
        "training.steps=2", "training.checkpoint_interval=1", "training.log_interval=1",
        "training.eval_interval=2", "training.probe_interval=0"]
STEP_LINE = re.compile(r"INFO step \d+: reward ")


def run(module, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", module, *ARGS, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def foreign(lines):
    return [line for line in lines if line.strip() and not line.startswith(PREFIX)]


def test_a_plain_run_prints_only_the_projects_lines(tmp_path):
    cache = f"training.cache_dir={tmp_path / 'cache'}"
    sft = run("megatron_rl.training.sft", cache)
    # stdout is the warm start's folder alone (scripts read it); the log lines are on stderr
    assert sft.stdout.strip() == sft.stdout.strip().splitlines()[-1]
    assert os.path.isdir(sft.stdout.strip())
    assert not foreign(sft.stderr.splitlines()), sft.stderr
    assert any("warm start: step 5/5" in line for line in sft.stderr.splitlines()), sft.stderr

    job = run("megatron_rl.train", cache, f"training.output_dir={tmp_path / 'run'}")
    assert job.stdout == ""
    lines = job.stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if STEP_LINE.search(line))
    # before the first step: the project's lines only (here the cached warm start's)
    assert not foreign(lines[:first_step]), "\n".join(lines[:first_step])
    assert "warm start: loaded cached SFT weights" in lines[0]
    # and after it no warning of megatron's or torch's either (checkpoint saves, the plots)
    assert not foreign(lines[first_step:]), "\n".join(lines[first_step:])
    assert sum(bool(STEP_LINE.search(line)) for line in lines) == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")
