"""Test-session set-up: the third-party warnings a run silences (megatron_rl/console.py, each
with its reason) are silenced for the tests too, so that pytest's warnings summary lists only
warnings worth reading. pytest resets the warning filters around each test and applies its own
`filterwarnings` list, so the same entries are added to that list, generated from the one list
in console.py. tests/unit/test_console.py checks the filters themselves."""
import torch

from megatron_rl import console


def pytest_configure(config):
    console.silence_third_party_warnings()  # import-time warnings and megatron's log records
    silenced = console.SILENCED_WARNINGS + (
        [] if torch.cuda.is_available() else console.SILENCED_WARNINGS_WITHOUT_CUDA)
    for message, category, module in silenced:
        assert ":" not in message + module, "pytest's filter syntax splits on ':'"
        config.addinivalue_line("filterwarnings",
                                f"ignore:{message}:{category.__name__}:{module}")
