"""The training job's SGLang rollout: global rank 0 owns the engines and talks to them; every
rank calls generate() and update_weights() together, like the built-in engine's, so the loop
does not care which engine it has.

Why one controller: a restarted engine needs the current weights, and gathering them is
collective over TP and PP. So while rank 0 generates, the other ranks wait on a gloo control
group (no NCCL timeout while rollouts run for minutes) for one of three commands: "sync" (take
part in gathering the weights for an engine that was restarted), "done" (here are the samples)
or "error" (the engines failed for good: every rank raises EngineError, so the job can write a
checkpoint collectively and stop).
"""
import os
from typing import List, Optional, Sequence

import torch.distributed as dist

from megatron_rl.rollout.sglang_engine import SGLangEngine
from megatron_rl.rollout.sglang_server import EngineError
from megatron_rl.rollout.types import Sample, SamplingParams
from megatron_rl.rollout.weight_sync import hf_weights, write_hf_folder


class SGLangRollout:
    def __init__(self, cfg, model, out_dir: str, weight_version: int, device: str):
        self.cfg, self.model = cfg, model
        self.scfg = cfg.rollout.sglang
        self.weight_version = weight_version
        self.rank = dist.get_rank()
        self.control = dist.new_group(backend="gloo")
        self.weights_dir = os.path.join(out_dir, "engine_weights")
        self.engine: Optional[SGLangEngine] = None
        # The engines start from the trainer's weights as they are now (initial checkpoint,
        # SFT warm start or resumed step), written once as an HF folder.
        init_dir = os.path.join(self.weights_dir, "initial")
        weights = hf_weights(model, cfg.model)

        def launch():
            write_hf_folder(weights, init_dir, cfg=cfg.model)
            self.engine = SGLangEngine.launch(
                init_dir, self.scfg, os.path.join(out_dir, "engines"), self.scfg.engines_per_node,
                device=device, weight_version=weight_version, seed=cfg.rollout.seed,
                on_restart=self._resync)

        self._lead(launch, weights)

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
            elif kind == "error":
                raise EngineError(payload)
            else:
                return payload

    def _resync(self, index: int) -> None:
        """Rank 0, from inside generate(): a restarted engine gets the current weights."""
        self._broadcast(("sync", None))
        self.engine.update_weights(hf_weights(self.model, self.cfg.model), self.weight_version,
                                   engines=[index],
                                   disk_dir=os.path.join(self.weights_dir, "sync"))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: Optional[int] = None) -> List[Sample]:
        """This rank's prompts in, this rank's samples out (prompt_index local to `prompts`);
        ranks of one model-parallel group pass the same prompts, and are asked once."""
        from megatron.core import parallel_state as mpu

        mine = (mpu.get_data_parallel_rank(), [list(p) for p in prompts])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine, group=self.control)
        per_dp = dict(gathered)  # model-parallel peers sent the same prompts

        def generate_all():
            flat = [(dp, i, p) for dp in sorted(per_dp) for i, p in enumerate(per_dp[dp])]
            result = {dp: [] for dp in per_dp}
            if flat:
                for s in self.engine.generate([p for _, _, p in flat], params):
                    dp, local, _ = flat[s.prompt_index]
                    s.prompt_index = local
                    result[dp].append(s)
            self.engine.release_memory()  # colocated: training gets the GPU memory back
            return result

        return self._lead(generate_all)[mine[0]]

    def update_weights(self) -> None:
        """After an optimizer step: the engines get the new weights, version + 1."""
        version = self.weight_version + 1
        weights = hf_weights(self.model, self.cfg.model)

        def sync():
            self.engine.resume_memory()
            self.engine.update_weights(weights, version,
                                       disk_dir=os.path.join(self.weights_dir, "sync"))

        self._lead(sync, weights)
        self.weight_version = version

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
