"""Test-session set-up: the third-party warnings a run silences (megatron_rl/console.py, each
with its reason) are silenced for the tests too, so that pytest's warnings summary lists only
warnings worth reading. pytest resets the warning filters around each test and applies its own
`filterwarnings` list, so the same entries are added to that list, generated from the one list
in console.py. tests/unit/test_console.py checks the filters themselves."""
import os

import pytest
import torch

from megatron_rl import console, ports


def pytest_configure(config):
    console.silence_third_party_warnings()  # import-time warnings and megatron's log records
    silenced = console.SILENCED_WARNINGS + (
        [] if torch.cuda.is_available() else console.SILENCED_WARNINGS_WITHOUT_CUDA)
    for message, category, module in silenced:
        assert ":" not in message + module, "pytest's filter syntax splits on ':'"
        config.addinivalue_line("filterwarnings",
                                f"ignore:{message}:{category.__name__}:{module}")
    # pytest-xdist workers (ci/test.sh runs two) draw ports from disjoint ranges, inherited by
    # every process a test starts, so two tests never hand the same port to their launches.
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT")
    if worker and workers and ports.PORT_RANGE_ENV not in os.environ:
        low, high = ports.port_range()
        share = (high - low) // int(workers)
        index = int(worker.removeprefix("gw"))
        os.environ[ports.PORT_RANGE_ENV] = f"{low + index * share}-{low + (index + 1) * share}"


@pytest.fixture(scope="session")
def warm_start_cache(tmp_path_factory):
    """One training.cache_dir for the RL job tests of a session: the warm start is cached under
    a key of everything that shapes it (megatron_rl/training/sft.py), so the jobs that share
    its settings build it once per pytest worker instead of once per test."""
    return tmp_path_factory.mktemp("warm_start_cache")
