"""The client of a job's SGLang servers: requests, routing, restarts, generation, pause/resume,
memory release, and weight sync as the servers see it (which engines take part, what a failure
means, the version they all serve). It runs in one process (the job's global rank 0, or a test);
sglang_rollout.py makes it the training loop's engine, sglang_server.py owns the processes, and
weight_transfer.py moves the tensors.

generate() takes the built-in engine's arguments (and resync, for background generation) and
returns the same Samples; the client is not itself a RolloutEngine (its update_weights takes the
tensors and a version). Requests go one sample each through sglang_router (rollout.sglang.router;
cache-aware, retries on another server) or, without it, to the least-loaded live server. Every
response must carry the engines' current weight version. A server that dies or stops answering
is restarted (its log shows both runs), `on_restart` re-pushes the current weights to it, and its
unfinished requests are retried there or elsewhere; after `max_restarts` restarts in one job,
EngineError.

Weight sync (update_weights) sits between /begin_weight_update and /end_weight_update; its last
request sets the weight version, which every later response carries (Sample.weight_version), and
flushes the radix cache. The methods (distributed, tensor, disk) are weight_transfer.py's.
"""
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import requests

from megatron_rl.errors import EngineError
from megatron_rl.rollout.config import SGLangConfig
from megatron_rl.rollout.sglang_server import (SGLangRouter, SGLangServer, log_tail,
                                               router_installed, start_servers)
from megatron_rl.rollout.types import Sample, SamplingParams
from megatron_rl.rollout.weight_transfer import NamedTensors, WeightSender

logger = logging.getLogger(__name__)


class SGLangClient:
    """One process's HTTP client of a set of SGLang servers (local or another node's)."""

    def __init__(self, servers: List[SGLangServer], cfg: SGLangConfig,
                 on_restart: Optional[Callable[[int], None]] = None,
                 restart_server: Optional[Callable[[int], None]] = None):
        self.servers, self.cfg = servers, cfg
        # Stops and starts server i where its process lives (the job: on its node's first rank);
        # None: here, where every server must then be local.
        self.restart_server = restart_server
        # Called with an engine's index after it was restarted, before requests go to it again:
        # the job re-sends the current weights (a fresh server has the initial ones).
        self.on_restart = on_restart
        self.weight_version = servers[0].weight_version if servers else 0
        self.restarts = 0
        self._load = [0] * len(servers)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.sender = WeightSender(cfg, servers, self._post)
        # Restarted engines still serving their initial weights: no requests until a sync.
        self.stale = set()
        self.router: Optional[SGLangRouter] = None
        if servers and (cfg.router == "sglang_router" or (
                cfg.router == "auto" and len(servers) > 1 and router_installed(cfg.python))):
            self.router = SGLangRouter(cfg, [s.url for s in servers], os.path.join(
                os.path.dirname(os.path.abspath(servers[0].log_path)), "sglang_router.log"))
            self.router.start()
            self.router.wait_until_ready()

    # ---- lifecycle ------------------------------------------------------------------------
    @classmethod
    def launch(cls, model_path: str, cfg: SGLangConfig, log_dir: str, num_engines: int,
               device: str = "cpu", first_gpu: int = 0, weight_version: int = 0, seed: int = 0,
               on_restart: Optional[Callable[[int], None]] = None) -> "SGLangClient":
        """Start num_engines servers on this host and a client over them."""
        return cls(start_servers(model_path, cfg, log_dir, num_engines, device, first_gpu,
                                 weight_version, seed), cfg, on_restart)

    def shutdown(self) -> None:
        if self.router is not None:
            self.router.stop()
        self.sender.close()
        for server in self.servers:
            server.stop()

    def restart(self, index: int, reason: str) -> None:
        """Stop and start engine `index`; then on_restart re-sends the current weights (without
        one, an engine that missed syncs is left out of generation until update_weights)."""
        self.restarts += 1
        server = self.servers[index]
        if self.restarts > self.cfg.max_restarts:
            raise EngineError(f"SGLang engine {index} failed ({reason}) after {self.restarts - 1} "
                              f"restarts in this job (rollout.sglang.max_restarts="
                              f"{self.cfg.max_restarts}); {server.log_path}:\n"
                              f"{log_tail(server.log_path)}")
        logger.warning("restarting SGLang engine %d (%s); restart %d/%d", index, reason,
                       self.restarts, self.cfg.max_restarts)
        self.sender.drop_group(index)
        if self.restart_server is not None:
            self.restart_server(index)
        else:
            server.restart()
        server.weight_version = server.initial_version  # its model_path's weights, until re-synced
        if server.initial_version == self.weight_version:
            pass  # no sync since it started: its own files are the current weights
        elif self.on_restart is not None:
            self.on_restart(index)
        else:
            self.stale.add(index)
        if self.router is not None:  # it takes the server back once its health checks pass
            self.router.wait_until_ready([server.url])

    def _restart_router(self, reason: str) -> None:
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts:
            raise EngineError(f"sglang_router failed ({reason}) after {self.restarts - 1} "
                              f"restarts in this job (rollout.sglang.max_restarts="
                              f"{self.cfg.max_restarts}); {self.router.log_path}:\n"
                              f"{log_tail(self.router.log_path)}")
        logger.warning("restarting sglang_router (%s)", reason)
        self.router.restart([s.url for i, s in enumerate(self.servers)
                             if i not in self.stale and s.alive()])

    # ---- HTTP -----------------------------------------------------------------------------
    def _post(self, index: Optional[int], route: str, payload: Optional[dict] = None,
              timeout: Optional[float] = None) -> dict:
        """POST to server `index`, or to the router when index is None."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        url = self.router.url if index is None else self.servers[index].url
        response = session.post(url + route, json=payload or {},
                                timeout=timeout or self.cfg.request_timeout_s)
        if response.status_code != 200:
            raise EngineError(f"{url}{route} answered "
                              f"{response.status_code}: {response.text[:500]}")
        try:
            return response.json()
        except ValueError:  # some control routes answer plain text
            return {"message": response.text}

    def _is_down(self, index: int, error: Exception) -> bool:
        """A fault a restart mends: the server is gone or did not answer in time (as opposed to
        an answer with an error status, which a restart would only repeat)."""
        return not self.servers[index].alive() or isinstance(
            error, (requests.ConnectionError, requests.Timeout))

    def _down_behind_router(self) -> List[int]:
        """After a request through the router failed: the live servers that are gone or do not
        answer /health (which one served the request, the router does not say)."""
        return [i for i, server in enumerate(self.servers)
                if i not in self.stale and server.down()]

    def _on_all(self, route: str, payload: Optional[dict] = None) -> List[dict]:
        return [self._post(i, route, payload) for i in range(len(self.servers))]

    # ---- generation -----------------------------------------------------------------------
    def _pick(self) -> int:
        with self._lock:
            index = min((i for i in range(len(self.servers)) if i not in self.stale),
                        key=lambda i: self._load[i])
            self._load[index] += 1
            return index

    def _generate_one(self, prompt: Sequence[int], params: SamplingParams, prompt_index: int
                      ) -> Tuple[Optional[int], Optional[Sample], Optional[Exception]]:
        """(the server it went to, None behind the router; the sample or the error)."""
        index = None if self.router is not None else self._pick()
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k, "max_new_tokens": params.max_new_tokens,
                    "stop_token_ids": list(params.stop_token_ids), "skip_special_tokens": False,
                    "no_stop_trim": True}
        try:
            out = self._post(index, "/generate", {"input_ids": list(prompt),
                                                  "sampling_params": sampling,
                                                  "return_logprob": True})
        except (requests.RequestException, EngineError) as e:
            return index, None, e
        finally:
            if index is not None:
                with self._lock:
                    self._load[index] -= 1
        meta = out["meta_info"]
        if int(meta["weight_version"]) != self.weight_version:
            return index, None, EngineError(
                f"a server answered with weights of version {meta['weight_version']}, the "
                f"engines' current version is {self.weight_version}")
        finish = (meta.get("finish_reason") or {}).get("type", "length")
        return index, Sample(prompt_ids=list(prompt), output_ids=list(out["output_ids"]),
                             output_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                             finish_reason=finish if finish in ("stop", "length") else "abort",
                             weight_version=int(meta["weight_version"]),
                             prompt_index=prompt_index), None

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: Optional[int] = None, resync: bool = True) -> List[Optional[Sample]]:
        """n samples per prompt, contiguous per prompt. `seed` is accepted for the built-in
        engine's interface; SGLang samples with its own per-server seed.
        resync=False (generation in the background, while the other ranks cannot take part in
        restarting or re-syncing): a failed engine is only left out, for the next
        update_weights to restart and sync; when no engine is left, the unfinished samples
        come back as None."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        results: List[Optional[Sample]] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        workers = min(len(jobs), 32 * len(self.servers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            while pending and len(self.stale) < len(self.servers):
                futures = {pool.submit(self._generate_one, jobs[j][1], params, jobs[j][0]): j
                           for j in pending}
                pending, failed = [], {}
                for future in as_completed(futures):
                    index, sample, error = future.result()
                    if sample is None:
                        pending.append(futures[future])
                        failed.setdefault(index, error)
                    else:
                        results[futures[future]] = sample
                for index, error in failed.items():  # index None: through the router
                    reason = f"{type(error).__name__}: {error}"
                    if index is None and self.router.down():
                        self._restart_router(reason)
                        continue
                    down = (self._down_behind_router() if index is None
                            else [index] if self._is_down(index, error) else [])
                    if not down:
                        raise EngineError(f"SGLang engine {'' if index is None else index} "
                                          f"refused a request: {reason}")
                    self._mend(down, reason, resync)
                pending.sort()
        if self.router is not None:
            # the router retried a dead server's requests elsewhere: nobody else noticed
            self._mend(self._down_behind_router(), "found down after a rollout", resync)
        return results

    def _mend(self, down: List[int], reason: str, resync: bool) -> None:
        for index in down:
            if resync:
                self.restart(index, reason)
            else:
                self.stale.add(index)

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]],
                        engine: int = 0) -> List[List[float]]:
        """log p(prompt[t] | prompt[:t]) for t >= 1 under the engine's current weights: what the
        weight-sync check compares with megatron's."""
        out = []
        for prompt in prompts:
            reply = self._post(engine, "/generate", {
                "input_ids": list(prompt), "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
            out.append([lp for lp, _, _ in reply["meta_info"]["input_token_logprobs"][1:]])
        return out

    # ---- control --------------------------------------------------------------------------
    def pause(self, mode: str = "abort") -> None:
        """abort: running requests return now with finish_reason abort; retract / in_place: they
        wait and continue after resume()."""
        self._on_all("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self._on_all("/continue_generation")

    def flush_cache(self) -> None:
        self._on_all("/flush_cache")

    def abort_all(self) -> None:
        self._on_all("/abort_request", {"abort_all": True})

    @property
    def _shares_gpus(self) -> bool:
        """Colocated on GPUs: the engines must give their memory to training and take it back.
        CPU servers hold nothing to release (and SGLang's CPU path does not implement it)."""
        return self.cfg.placement == "colocated" and self.servers[0].device != "cpu"

    def release_memory(self) -> None:
        """Colocated engines give their GPU memory (weights, KV cache) to training."""
        if self._shares_gpus:
            self._on_all("/release_memory_occupation")

    def resume_memory(self) -> None:
        if self._shares_gpus:
            self._on_all("/resume_memory_occupation")

    # ---- weight sync ----------------------------------------------------------------------
    def update_weights(self, named_tensors: NamedTensors, version: int,
                       method: Optional[str] = None, engines: Optional[List[int]] = None,
                       disk_dir: Optional[str] = None) -> dict:
        """Load new weights (HF names, full tensors; read once, bucket by bucket, each bucket
        going to every engine) and set the engines' weight version. Returns bytes, seconds and
        buckets (0 for disk).
        An engine that dies meanwhile drops out of this sync and is restarted after it (getting
        the new weights through on_restart): the caller's weights are read exactly once."""
        method = method or self.cfg.weight_sync
        if method not in ("distributed", "tensor", "disk"):
            raise ValueError(f"unknown weight sync method {method!r}")
        engines = list(range(len(self.servers))) if engines is None else engines
        failed: Dict[int, str] = {}

        def on_each(action: Callable[[int], object]) -> None:
            for index in engines:
                if index in failed:
                    continue
                try:
                    action(index)
                except (requests.RequestException, EngineError, RuntimeError) as e:
                    if not self._is_down(index, e):
                        raise
                    failed[index] = f"{type(e).__name__} during weight sync: {e}"

        t0 = time.perf_counter()
        sent, count = self.sender.send(named_tensors, version, method, on_each, disk_dir)
        for index in engines:
            if index not in failed:
                self.servers[index].weight_version = version
                self.stale.discard(index)
        self.weight_version = version
        for index, reason in sorted(failed.items()):
            self.restart(index, reason)
        return {"bytes": sent, "seconds": time.perf_counter() - t0, "method": method,
                "buckets": count}
