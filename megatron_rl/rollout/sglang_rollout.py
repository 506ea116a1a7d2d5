"""The training loop's SGLang engine (a RolloutEngine, rollout/types.py): the first rank of every
node starts that node's engines (SGLang servers), global rank 0 is the one client of all of them
(sglang_client.py); every rank calls generate(), prefetch() and update_weights() together, like
the built-in engine's, so the loop does not care which engine it has.

Why one controller: a restarted engine needs the current weights, and gathering them is
collective over TP and PP. So while rank 0 generates, the other ranks wait on a gloo control
group (no NCCL timeout while rollouts run for minutes) for a command: "sync" (take part in
gathering the weights for an engine that was restarted), "restart" (the node that owns a dead
engine restarts it), "done" (here are the samples) or "error" (the engines failed for good:
every rank raises EngineError, so the job can write a checkpoint collectively and stop).
Engines on other nodes must be reachable from rank 0 (rollout.sglang.host) and must see the
output folder (a shared file system, as checkpoints need anyway).
"""
import dataclasses
import os
import threading
from typing import List, Optional, Sequence

import torch.distributed as dist

from megatron_rl.errors import EngineError
from megatron_rl.rollout.sglang_client import SGLangClient
from megatron_rl.rollout.sglang_server import SGLangServer, start_servers
from megatron_rl.rollout.types import Sample, SamplingParams
from megatron_rl.rollout.weight_sync import hf_weights, write_hf_folder
from megatron_rl.seeds import derive_seed


class SGLangRolloutEngine:
    """RolloutEngine over the job's SGLang servers; every rank constructs it together."""

    weight_version: int  # RolloutEngine's: the trainer's completed steps

    def __init__(self, cfg, model, out_dir: str, weight_version: int, device: str):
        self.cfg, self.model = cfg, model
        self.scfg = cfg.rollout.sglang
        self.weight_version = weight_version
        self.rank = dist.get_rank()
        self.control = dist.new_group(backend="gloo")
        self.weights_dir = os.path.join(out_dir, "engine_weights")
        self.client: Optional[SGLangClient] = None  # rank 0's
        self._prefetched = None  # rank 0: the background generation prefetch() started
        # rank 0: a generate() released the colocated engines' memory since the last sync, so
        # another generate() before the next sync (evaluation, dynamic sampling's extra rounds)
        # must take it back first
        self._released = False
        # The engines start from the trainer's weights as they are now (initial checkpoint,
        # SFT warm start or resumed step), written once as an HF folder.
        init_dir = os.path.join(self.weights_dir, "initial")
        weights = hf_weights(model, cfg.model)
        self._lead(lambda: write_hf_folder(weights, init_dir, cfg=cfg.model), weights)
        # Engines of this node, started by its first rank. Disaggregated: on the GPUs after the
        # training processes'; colocated: on the same ones.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        node = int(os.environ.get("GROUP_RANK", self.rank // local_world))
        self.local_servers, error = {}, None
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            try:
                servers = start_servers(
                    init_dir, self.scfg, os.path.join(out_dir, "engines"),
                    self.scfg.engines_per_node, device,
                    first_gpu=local_world if self.scfg.placement == "disaggregated" else 0,
                    weight_version=weight_version, seed=derive_seed(cfg.rollout.seed, node),
                    log_prefix=f"node{node}_")
                self.local_servers = {i: server for i, server in enumerate(servers)}
            except EngineError as e:
                error = f"node {node}: {e}"
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.rank, error, [
            s.describe() for s in self.local_servers.values()]), group=self.control)
        errors = [e for _, e, _ in gathered if e]
        if errors:
            self.shutdown()
            raise EngineError("\n".join(errors))
        # Engine i of the job: (owning rank, its index there), in rank order on every rank.
        self.owners = [(rank, i) for rank, _, descs in gathered for i in range(len(descs))]

        def connect():  # rank 0 is the client (and starts the router, which may fail)
            self.client = SGLangClient(
                [self.local_servers[i] if rank == 0 else SGLangServer.reach(desc, self.scfg)
                 for rank, _, descs in gathered for i, desc in enumerate(descs)],
                self.scfg, on_restart=self._resync, restart_server=self._restart_server)
        try:
            self._lead(connect)
        except EngineError:
            self.shutdown()
            raise

    def _lead(self, action, weights=None):
        """Rank 0 runs action() and sends the others its result, or its EngineError (raised on
        every rank); the others meanwhile iterate `weights` (their part of the collective
        gather rank 0 is consuming) and serve commands."""
        if self.rank == 0:
            try:
                result = action()
            except EngineError as e:
                self._broadcast(("error", str(e)))
                raise
            self._broadcast(("done", result))
            return result
        for _ in weights or ():
            pass
        return self._wait()

    def _broadcast(self, command) -> None:
        dist.broadcast_object_list([command], src=0, group=self.control)

    def _wait(self):
        """Non-zero ranks: serve commands until rank 0 says done (returning its payload)."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            kind, payload = box[0]
            if kind == "sync":
                for _ in hf_weights(self.model, self.cfg.model):
                    pass
            elif kind == "restart":
                self._restart_local(payload)
            elif kind == "error":
                raise EngineError(payload)
            else:
                return payload

    def _restart_server(self, index: int) -> None:
        """Rank 0: have engine `index` restarted by the rank that started it."""
        self._broadcast(("restart", index))
        self._restart_local(index)

    def _restart_local(self, index: int) -> None:
        """Every rank: the owner stops and starts its server, then tells everyone how it went."""
        owner, local = self.owners[index]
        status = [None]
        if self.rank == owner:
            try:
                self.local_servers[local].restart()
            except EngineError as e:
                status = [str(e)]
        dist.broadcast_object_list(status, src=owner, group=self.control)
        if status[0] is not None and self.rank == 0:
            raise EngineError(status[0])

    def _resync(self, index: int) -> None:
        """Rank 0, from inside generate(): a restarted engine gets the current weights."""
        self._broadcast(("sync", None))
        self.client.update_weights(hf_weights(self.model, self.cfg.model), self.weight_version,
                                   engines=[index],
                                   disk_dir=os.path.join(self.weights_dir, "sync"))

    def _gather_prompts(self, prompts):
        """(this rank's DP rank, {DP rank: its prompts}); model-parallel peers pass the same."""
        from megatron.core import parallel_state as mpu

        mine = (mpu.get_data_parallel_rank(), [list(p) for p in prompts])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine, group=self.control)
        return mine[0], dict(gathered)

    @staticmethod
    def _flatten(per_dp):
        """(DP rank, index there, prompt) in the one order rank 0 generates them."""
        return [(dp, i, p) for dp in sorted(per_dp) for i, p in enumerate(per_dp[dp])]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: Optional[int] = None) -> List[Sample]:
        """This rank's prompts in, this rank's samples out (prompt_index local to `prompts`).
        Takes the prefetched samples when prefetch() was called with the same prompts."""
        dp_rank, per_dp = self._gather_prompts(prompts)

        def generate_all():
            flat = self._flatten(per_dp)
            if self._released:
                self.client.resume_memory()
                self._released = False
            box = self._prefetched
            if box is not None and box["key"] == (per_dp, params):  # not, e.g., evaluation's
                box, self._prefetched = self._join_prefetch(), None
                samples = box["samples"]
                # Left unfinished by an engine restarted in the background: sampled now.
                missing = [j for j, sample in enumerate(samples) if sample is None]
                if missing:
                    redo = self.client.generate([flat[j // params.n][2] for j in missing],
                                                dataclasses.replace(params, n=1))
                    for j, sample in zip(missing, redo):
                        sample.prompt_index = j // params.n
                        samples[j] = sample
            else:
                samples = self.client.generate([p for _, _, p in flat], params) if flat else []
            result = {dp: [] for dp in per_dp}
            for sample in samples:
                dp, local, _ = flat[sample.prompt_index]
                sample.prompt_index = local
                result[dp].append(sample)
            if not self.cfg.rollout.async_rollout:
                self.client.release_memory()  # colocated: training gets the GPU memory back
                self._released = True
            return result

        return self._lead(generate_all)[dp_rank]

    def prefetch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Asynchronous rollout: start generating the next step's samples now, in the
        background on rank 0, with the weights the engines hold (one version behind the
        trainer by the time they are used; algorithm.rollout_is_cap corrects for it). The
        next update_weights() waits for them, generate() with the same prompts takes them."""
        _, per_dp = self._gather_prompts(prompts)
        if self.rank != 0:
            return
        flat = [p for _, _, p in self._flatten(per_dp)]
        box = {"key": (per_dp, params)}

        def run():
            try:
                # No re-sync from this thread: the other ranks are training, not serving
                # commands; a restarted engine sits out until the next update_weights().
                box["samples"] = self.client.generate(flat, params, resync=False) if flat else []
            except Exception as e:  # raised again, on every rank, where it is joined
                box["error"] = e

        box["thread"] = threading.Thread(target=run, name="prefetch-rollout", daemon=True)
        box["thread"].start()
        self._prefetched = box

    def _join_prefetch(self):
        box = self._prefetched
        if box is None:
            return None
        box["thread"].join()
        if "error" in box:
            self._prefetched = None
            error = box["error"]
            raise error if isinstance(error, EngineError) else EngineError(
                f"background rollout failed: {error!r}")
        return box

    def update_weights(self) -> None:
        """After an optimizer step: the engines get the new weights, version + 1."""
        version = self.weight_version + 1
        weights = hf_weights(self.model, self.cfg.model)

        def sync():
            self._join_prefetch()  # the engines finish the next step's samples first
            self.client.resume_memory()
            self._released = False
            self.client.update_weights(weights, version,
                                       disk_dir=os.path.join(self.weights_dir, "sync"))

        self._lead(sync, weights)
        self.weight_version = version

    def shutdown(self) -> None:
        """Every rank: rank 0 stops generating and drops its weight-sync groups; each node's
        first rank stops the servers it started."""
        if self.client is not None:
            box = self._prefetched
            if box is not None and box["thread"].is_alive():
                self.client.abort_all()
                box["thread"].join(60)
            self.client.shutdown()
        for server in self.local_servers.values():
            server.stop()
