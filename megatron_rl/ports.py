"""Local TCP ports, in a leaf module: the parallel state, the rollout servers and the test
launchers all need one."""
import os
import random
import socket

# LOW-HIGH (HIGH excluded): where free_port draws its ports, e.g. a range a firewall opens, or
# one range per pytest worker (tests/conftest.py), so that concurrent jobs never draw the same.
PORT_RANGE_ENV = "MEGATRON_RL_PORT_RANGE"
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_handed_out = set()  # ports this process returned: not returned twice before their owner binds


def port_range():
    """(low, high) of the ports free_port draws from: MEGATRON_RL_PORT_RANGE, else the ports
    between 20000 and the kernel's ephemeral range (which starts at 32768 by default)."""
    text = os.environ.get(PORT_RANGE_ENV)
    if text:
        low, _, high = text.partition("-")
        if not (low.strip().isdigit() and high.strip().isdigit()
                and 1024 <= int(low) < int(high) <= 65536):
            raise ValueError(f"{PORT_RANGE_ENV}={text!r}: expected LOW-HIGH with "
                             f"1024 <= LOW < HIGH <= 65536")
        return int(low), int(high)
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    return 20000, max(ephemeral_low, 21000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process to bind later (a torchrun
    rendezvous, a 1-rank group, an SGLang server).

    Not bind(("", 0)): the kernel hands that out from its ephemeral range, from which every
    outgoing connection on the machine (a gloo mesh, an HTTP client) also takes its local port,
    so the port could be taken before its process binds it (EADDRINUSE, seen with two pytest
    workers). Drawn at random from port_range() instead, with its own random generator so that
    no seeded stream moves."""
    low, high = port_range()
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high - 1} after 200 draws "
                       f"({PORT_RANGE_ENV} sets the range)")
