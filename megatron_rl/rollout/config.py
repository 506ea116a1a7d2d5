"""Rollout config: which engine, how many prompts per step, sampling parameters, SGLang servers."""
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from megatron_rl.errors import SEED_RANGE, check_range


@dataclass
class SGLangConfig:
    # Interpreter that has sglang installed; None: the trainer's own. On CPU, CI keeps SGLang in
    # its own venv (ci/setup_sglang_cpu.sh) and passes its python here.
    python: Optional[str] = None
    engines_per_node: int = 1
    tp_size: int = 1  # GPUs per engine
    # colocated: engines share the training GPUs and release their memory while training runs;
    # disaggregated: engines own the last engines_per_node x tp_size GPUs of each node.
    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    # Servers listen here. Loopback by default: an SGLang server accepts weight updates and
    # arbitrary generation from anyone who can reach it. With engines on several nodes, name
    # the cluster network interface (e.g. "ib0", resolved on each node to its own address) or
    # give an address; "0.0.0.0" is refused.
    host: str = "127.0.0.1"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: str = "auto"  # the server's --dtype; CPU tests use float32
    mem_fraction_static: Optional[float] = None
    max_total_tokens: Optional[int] = None  # KV-cache size in tokens; CPU runs set it small
    # How new weights reach the engines after each update (README "Weight sync"):
    # distributed: broadcast over an NCCL (GPU) / gloo (CPU) group per engine, in buckets;
    # tensor: shared-memory handles (CUDA IPC on GPU), for colocated engines;
    # disk: an HF folder written by rank 0 and loaded by each engine.
    weight_sync: Literal["distributed", "tensor", "disk"] = "distributed"
    bucket_mb: float = 512.0  # fractions of a MiB too (tests sync tiny models in several buckets)
    # How generation requests reach the engines: "sglang_router" puts sglang_router (installed
    # in the SGLang python) in front of them; "least_loaded" has the client send each request
    # to the server with the fewest in flight; "auto": the router where it is installed and
    # there are several engines, least_loaded otherwise.
    router: Literal["auto", "sglang_router", "least_loaded"] = "auto"
    router_policy: Literal["cache_aware", "power_of_two", "round_robin", "random"] = "cache_aware"
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    # A server that dies or stops answering is restarted and its unfinished requests retried;
    # after this many restarts in one job the job stops (with its last checkpoint intact).
    max_restarts: int = 3
    extra_args: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.engines_per_node < 1 or self.tp_size < 1:
            raise ValueError("rollout.sglang.engines_per_node and tp_size must be >= 1")
        if self.host in ("0.0.0.0", "::", ""):
            raise ValueError(f"rollout.sglang.host={self.host!r} would expose the engines' "
                             f"weight-update endpoints on every interface; give 127.0.0.1 or "
                             f"the cluster interface's address")
        if not self.bucket_mb > 0 or self.max_restarts < 0:
            raise ValueError(f"rollout.sglang.bucket_mb must be > 0 (got {self.bucket_mb}) and "
                             f"max_restarts >= 0 (got {self.max_restarts})")
        check_range("rollout.sglang", self, "mem_fraction_static", 0, 1, low_open=True,
                    high_open=True, null="SGLang's default")
        check_range("rollout.sglang", self, "max_total_tokens", 1, null="SGLang's default")
        for name in ("startup_timeout_s", "request_timeout_s"):
            check_range("rollout.sglang", self, name, 0, low_open=True)


@dataclass
class RolloutConfig:
    engine: Literal["builtin", "sglang"] = "builtin"
    # Prompts per RL step over all data-parallel ranks; each gets algorithm.n responses.
    prompts_per_step: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8
    seed: int = 0
    # SGLang only: generate step t+1's samples while step t trains (they come from the weights
    # before step t's update: one version behind; see algorithm.rollout_is_cap).
    async_rollout: bool = False
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout.prompts_per_step and rollout.max_new_tokens must be >= 1")
        if self.async_rollout and self.engine != "sglang":
            raise ValueError("rollout.async_rollout needs rollout.engine=sglang (the built-in "
                             "engine generates with the weights being trained)")
        if self.async_rollout and self.sglang.placement == "colocated":
            raise ValueError("rollout.async_rollout needs rollout.sglang.placement="
                             "disaggregated: colocated engines give their GPUs to training")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, "
                             f"got {self.temperature}")
        check_range("rollout", self, "top_p", 0, 1, low_open=True)
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"rollout.top_k must be >= 1 (or -1: no top-k), got {self.top_k}")
        check_range("rollout", self, "seed", **SEED_RANGE)
