"""Local TCP ports, in a leaf module: the parallel state, the rollout servers and the test
launchers all need one."""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for 1-rank groups and test launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
