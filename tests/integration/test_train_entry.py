"""The job entry point rejects bad configs before any process group starts."""
import subprocess
import sys

import pytest

from tests.torchrun import ROOT


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_sise=3"],
     "unknown config key 'model.hidden_sise' (did you mean 'hidden_size'?)"),
    (["rollout.prompts_per_step=3", "algorithm.n=3"],
     "is not divisible by training.mini_batches=2"),
    # accepted by the type, but there is no critic to give GAE its values
    (["algorithm.advantage_estimator=gae"], "advantage_estimator (adv_estimator) cannot be gae: "
                                            "GAE needs a critic"),
])
def test_bad_config_fails_before_starting(tmp_path, overrides, message):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.train", "--config", "tests/configs/tiny_addition.yaml",
         *overrides, f"training.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "config.json").exists()
