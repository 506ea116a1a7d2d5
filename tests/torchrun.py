"""Launch a worker script under torchrun from a pytest test and fail with its output.

Each torchrun launch costs ~5 s of start-up on the CPU machines, so tests group many checks
into one worker script and one launch.
"""
import os
import subprocess
import sys

from megatron_rl.parallel.state import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script, nproc, args=(), timeout=600, env=None):
    """Run `torchrun --nproc_per_node nproc script *args` on 127.0.0.1; return its stdout.

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
        raise AssertionError(f"torchrun {script} timed out after {timeout}s\n{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun {script} failed (rc={proc.returncode}):\n{out[-20000:]}"
    return proc.stdout


def sglang_python():
    """The interpreter that runs SGLang servers in tests: MEGATRON_RL_SGLANG_PYTHON, else the venv
    ci/setup_sglang_cpu.sh makes. Missing: a skip on a developer's machine, a failure in CI (where
    ci/test.sh builds it, so a missing one is a broken set-up, not an optional extra)."""
    import pytest

    path = os.environ.get("MEGATRON_RL_SGLANG_PYTHON",
                          os.path.join(ROOT, ".venv-sglang", "bin", "python"))
    if not os.path.exists(path):
        message = f"no SGLang venv at {path}: run bash ci/setup_sglang_cpu.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
