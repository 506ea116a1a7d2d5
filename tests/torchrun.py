"""Launch a worker script under torchrun from a pytest test and fail with its output.

Each torchrun launch costs ~5 s of start-up on the CPU machines, so tests group many checks
into one worker script and one launch.
"""
import os
import subprocess
import sys

from megatron_rl.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script, nproc, args=(), timeout=600, env=None):
    """Run `torchrun --nproc_per_node nproc script *args` on 127.0.0.1; return its stdout
    followed by its stderr (where the trainer's log lines go).

    Raises AssertionError with the combined output when the launch fails or times out.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        script, *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun {script} timed out after {timeout}s\n"
                             f"{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun {script} failed (rc={proc.returncode}):\n{out[-20000:]}"
    return out


def sglang_python():
    """The interpreter that runs SGLang servers in tests: MEGATRON_RL_SGLANG_PYTHON (ci/test.sh
    sets it after building the venv, so there a missing one fails), else the default venv of
    ci/setup_sglang_cpu.sh, skipped with the command to make it when absent."""
    import pytest

    path = os.environ.get("MEGATRON_RL_SGLANG_PYTHON")
    if path is None:
        path = os.path.join(ROOT, ".venv-sglang", "bin", "python")
        if not os.path.exists(path):
            pytest.skip(f"no SGLang venv at {path}: run bash ci/setup_sglang_cpu.sh")
    if not os.path.exists(path):
        pytest.fail(f"MEGATRON_RL_SGLANG_PYTHON={path} does not exist")
    return path
