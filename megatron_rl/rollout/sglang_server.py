"""SGLang server processes owned by the training job: start, wait until they generate, stop;
and sglang_router, the process that can sit in front of them.

The job starts `python -m sglang.launch_server` itself (no external launcher), in its own process
group so that stopping it also stops the scheduler and detokenizer processes it spawns, with its
log appended to a file in the run folder (a restart's log follows the crash it replaces).
start_servers starts a host's servers together; talking to them is sglang_client.py's.
"""
import atexit
import os
import signal
import subprocess
import sys
import time
from typing import Callable, List, Optional

import requests

from megatron_rl.errors import EngineError
from megatron_rl.ports import free_port
from megatron_rl.rollout.config import SGLangConfig
from megatron_rl.seeds import derive_seed

# SGLang's CPU path (README "SGLang on CPU"): the torch-native attention and sampling backends are
# the only ones without CUDA kernels.
CPU_ARGS = ("--device", "cpu", "--attention-backend", "torch_native",
            "--sampling-backend", "pytorch", "--grammar-backend", "none")


TORCHRUN_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
                      "MASTER_ADDR", "MASTER_PORT"}


def log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def bind_address(host: str) -> str:
    """rollout.sglang.host as this node's address: an IP or hostname as given, or a network
    interface's name (eth0, ib0: the same setting on every node, like NCCL_SOCKET_IFNAME)
    resolved to that interface's IPv4 address here."""
    import psutil
    import socket

    addresses = psutil.net_if_addrs().get(host)
    if addresses is None:
        return host
    for address in addresses:
        if address.family == socket.AF_INET:
            return address.address
    raise EngineError(f"rollout.sglang.host={host!r}: interface {host} has no IPv4 address")


def spawn_logged(command: List[str], env: dict, log_path: str) -> subprocess.Popen:
    """Start command in its own process group (stopping the group stops what it spawns), its
    output appended to log_path after a header line (a restart's log follows the crash)."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n===== megatron-rl: starting {' '.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 15 s: nothing is left behind."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait_s)
            # The launcher exiting does not mean its children did: kill the group anyway.
            os.killpg(process.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        break


def answers(url: str, timeout_s: float) -> bool:
    """GET url answers 200 within timeout_s."""
    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def wait_until(owner, ready: Callable[[], bool], timeout_s: float, what: str,
               poll_s: float) -> None:
    """Poll ready() every poll_s until it holds; raise EngineError with owner's log tail when
    owner's process exits first, or (after stopping it) when timeout_s passes. owner: an
    SGLangServer or SGLangRouter (process, alive, stop, log_path)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not owner.alive():
            raise EngineError(f"{what} exited with code "
                              f"{owner.process.returncode if owner.process else None} while "
                              f"starting; {owner.log_path}:\n{log_tail(owner.log_path)}")
        try:
            if ready():
                return
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass  # not listening yet, or an answer from before it is up
        time.sleep(poll_s)
    owner.stop()
    raise EngineError(f"{what} was not ready after {timeout_s:.0f} s; {owner.log_path}:\n"
                      f"{log_tail(owner.log_path)}")


def clean_env() -> dict:
    """This environment without torchrun's variables: they would make a server's own
    torch.distributed join the job's rendezvous (TORCHELASTIC_USE_AGENT_STORE makes its
    TCPStore a client of the agent's)."""
    return {k: v for k, v in os.environ.items()
            if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}


class SGLangServer:
    def __init__(self, model_path: str, cfg: SGLangConfig, port: int, log_path: str,
                 dist_port: int, gpu_id: Optional[int] = None, device: str = "cpu",
                 weight_version: int = 0, seed: int = 0):
        self.model_path, self.cfg, self.port, self.log_path = model_path, cfg, port, log_path
        self.dist_port, self.gpu_id, self.device = dist_port, gpu_id, device
        # initial_version: the weights at model_path, what a (re)started server serves;
        # weight_version: what it serves now (the engine client moves it on each sync).
        self.initial_version = self.weight_version = weight_version
        self.seed = seed
        self.process: Optional[subprocess.Popen] = None
        self.host = bind_address(cfg.host)
        self.url = f"http://{self.host}:{port}"
        # A server another node's rank started: this process only talks to it over HTTP.
        self.remote = False

    def describe(self) -> dict:
        """What another rank needs to reach this server (SGLangServer.reach)."""
        return dict(model_path=self.model_path, port=self.port, log_path=self.log_path,
                    dist_port=self.dist_port, device=self.device,
                    weight_version=self.initial_version, url=self.url)

    @classmethod
    def reach(cls, description: dict, cfg: SGLangConfig) -> "SGLangServer":
        description = dict(description)
        url = description.pop("url")
        server = cls(cfg=cfg, **description)
        server.url, server.remote = url, True
        return server

    def command(self) -> List[str]:
        cfg = self.cfg
        cmd = [cfg.python or sys.executable, "-m", "sglang.launch_server",
               "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
               "--tp-size", str(cfg.tp_size), "--dtype", cfg.dtype,
               "--random-seed", str(self.seed), "--weight-version", str(self.initial_version),
               # SGLang's own torch.distributed port; chosen by the job so engines on one node
               # cannot pick the same one.
               "--nccl-port", str(self.dist_port),
               # The job waits on /health_generate, which generates; SGLang's warm-up request is
               # plain text that a small test tokenizer may not encode.
               "--skip-server-warmup",
               # Requests and responses are token ids; the trainer owns the tokenizer.
               "--skip-tokenizer-init"]
        if self.device == "cpu":
            cmd += [*CPU_ARGS, "--sleep-on-idle"]  # an idle CPU scheduler would spin a core
        else:
            cmd += ["--base-gpu-id", str(self.gpu_id or 0)]
            if cfg.placement == "colocated":
                cmd += ["--enable-memory-saver"]
        if cfg.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(cfg.max_total_tokens)]
        return cmd + list(cfg.extra_args)

    def start(self) -> None:
        env = clean_env()
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            # torch's CPU allocator asks for transparent huge pages on large blocks: each weight
            # sync receives into fresh buffers, and faulting them in 4 KiB pages took longer
            # than the transfer (tools/bench_rollout.py, docs/rollout.md)
            env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
            # ...and glibc serves blocks above 32 MiB by mmap, so every sync's receive buffer
            # is fresh memory again; with mmap off and no trimming, a freed buffer stays in the
            # heap and the next sync's reuses its pages (61 MiB syncs: medians 76-80 -> 61-64 ms)
            env.setdefault("MALLOC_MMAP_MAX_", "0")
            env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 40))
        self.process = spawn_logged(self.command(), env, self.log_path)
        atexit.register(self.stop)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_until_ready()

    def alive(self) -> bool:
        if self.remote:
            return answers(self.url + "/health", 10)
        return self.process is not None and self.process.poll() is None

    def down(self) -> bool:
        """Gone or not answering /health: a restart would mend it."""
        return not self.alive() or not answers(self.url + "/health", 30)

    def wait_until_ready(self, timeout_s: Optional[float] = None) -> None:
        """Until /health_generate answers 200 (a real one-token generation), or raise with the
        log's tail when the process exits or the timeout passes."""
        wait_until(self, lambda: answers(self.url + "/health_generate", 30),
                   timeout_s or self.cfg.startup_timeout_s, f"SGLang server on port {self.port}",
                   poll_s=1.0)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        stop_process_group(process)


def start_servers(model_path: str, cfg: SGLangConfig, log_dir: str, num_engines: int,
                  device: str = "cpu", first_gpu: int = 0, weight_version: int = 0,
                  seed: int = 0, log_prefix: str = "") -> List[SGLangServer]:
    """Start num_engines servers on this host (ports chosen free and distinct, GPUs from
    first_gpu on, tp_size each), wait until every one generates; stop them all if one fails."""
    ports = set()
    while len(ports) < 2 * num_engines:
        ports.add(free_port())
    ports = sorted(ports)
    servers = [SGLangServer(model_path, cfg, ports[2 * i],
                            os.path.join(log_dir, f"{log_prefix}sglang_{i}.log"),
                            dist_port=ports[2 * i + 1], device=device,
                            gpu_id=first_gpu + i * cfg.tp_size,
                            weight_version=weight_version, seed=derive_seed(seed, i))
               for i in range(num_engines)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_until_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def router_installed(python: Optional[str]) -> bool:
    """Whether the SGLang interpreter has sglang_router (its Rust router)."""
    return subprocess.run([python or sys.executable, "-c", "import sglang_router.router"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


class SGLangRouter:
    """sglang_router in front of the servers: one URL for generation, cache-aware placement
    (the n samples of a prompt share its prefix on one server), retries of a request on
    another server when one fails. It listens on loopback: only the client process, on the same
    host, talks to it. Weight sync and control requests go to the servers directly."""

    def __init__(self, cfg: SGLangConfig, worker_urls: List[str], log_path: str):
        self.cfg, self.worker_urls, self.log_path = cfg, list(worker_urls), log_path
        self.process: Optional[subprocess.Popen] = None
        self.url = ""

    def command(self, port: int, metrics_port: int) -> List[str]:
        return [self.cfg.python or sys.executable, "-m", "sglang_router.launch_router",
                "--host", "127.0.0.1", "--port", str(port),
                # its Prometheus exporter defaults to one fixed port on every interface: a
                # second router on the host (another job, a restart racing the old process)
                # failed with "Address already in use"
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                "--worker-urls", *self.worker_urls, "--policy", self.cfg.router_policy,
                # a restarted server is back in rotation within seconds; failures are the
                # client's to handle (it restarts the server), not a reason to shun it for 60 s
                "--health-check-interval-secs", "1", "--disable-circuit-breaker",
                "--request-timeout-secs", str(int(self.cfg.request_timeout_s)),
                "--log-level", "warn"]

    def start(self) -> None:
        port, metrics_port = free_port(), free_port()
        while metrics_port == port:
            metrics_port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = spawn_logged(self.command(port, metrics_port), clean_env(), self.log_path)
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def down(self) -> bool:
        """Gone or not answering /health. Not alive() alone: a killed router's connections
        reset before its process can be reaped."""
        return not self.alive() or not answers(self.url + "/health", 10)

    def wait_until_ready(self, urls: Optional[List[str]] = None) -> None:
        """Until the router lists each of `urls` (default: every server) as a healthy worker
        (it registers workers in the background after it starts)."""
        wanted = set(self.worker_urls if urls is None else urls)

        def listed_healthy() -> bool:
            workers = requests.get(self.url + "/workers", timeout=10).json()["workers"]
            return wanted <= {w["url"] for w in workers if w.get("is_healthy")}
        wait_until(self, listed_healthy, self.cfg.startup_timeout_s,
                   f"sglang_router (waiting for {sorted(wanted)})", poll_s=0.5)

    def restart(self, urls: Optional[List[str]] = None) -> None:
        self.stop()
        self.start()
        self.wait_until_ready(urls)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            atexit.unregister(self.stop)
            stop_process_group(process)
