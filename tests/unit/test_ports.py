"""free_port: ports outside the kernel's ephemeral range (or within MEGATRON_RL_PORT_RANGE),
never one that is bound, never the same twice in a process."""
import socket

import pytest

from megatron_rl import ports


def test_default_range_lies_below_the_ephemeral_range(monkeypatch):
    monkeypatch.delenv(ports.PORT_RANGE_ENV, raising=False)
    low, high = ports.port_range()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    assert low < high <= max(ephemeral_low, 21000)
    assert all(low <= ports.free_port() < high for _ in range(20))


def test_ports_come_from_the_configured_range_and_skip_bound_ones(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        bound = taken.getsockname()[1]
        monkeypatch.setenv(ports.PORT_RANGE_ENV, f"{bound}-{bound + 4}")
        monkeypatch.setattr(ports, "_handed_out", set())
        got = [ports.free_port() for _ in range(3)]
        # the range's other three ports, each once, never the bound one
        assert sorted(got) == list(range(bound + 1, bound + 4))
        with pytest.raises(RuntimeError, match="no free TCP port"):
            ports.free_port()  # all four bound or handed out


@pytest.mark.parametrize("value", ["20000", "30000-20000", "80-90", "a-b", "20000-70000"])
def test_bad_range_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(ports.PORT_RANGE_ENV, value)
    with pytest.raises(ValueError, match=ports.PORT_RANGE_ENV):
        ports.free_port()
