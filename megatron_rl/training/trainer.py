"""The RL trainer: one object that owns the policy, its optimizer, the rollout engine and the task,
and one method per phase of a step. `train_step` is the README's numbered list:

    1. rollout        this DP rank's prompts, n samples each (the next step's prefetched);
                      with dynamic sampling, more prompts until the groups are informative
    2. score          rewards from the task's verifier or the reward worker pool
    3. advantages     group-relative advantages -> mini-batches of MicroBatches
    4. old_logprobs   the sampling policy's log-probs recomputed by the trainer (+ the reference's)
    5. train          PPO epochs over the mini-batches, one optimizer step each
    6. sync_weights   the rollout engine gets the new weights
    7. log            one metrics record (+ evaluation every training.eval_interval steps)
    8. save           a checkpoint every training.checkpoint_interval steps, at the end, on SIGTERM

Every rank builds a trainer and calls the same phases in the same order: the phases are
collective. The trainer checkpoints its own state (step, entropy-law points, weight version)
next to the model and optimizer, and `close()` releases everything on every exit path.
"""
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_rl.errors import EngineError
from megatron_rl.rollout.types import RolloutEngine, Sample, SamplingParams
from megatron_rl.seeds import derive_seed
from megatron_rl.training.guard import DivergenceGuard
from megatron_rl.training.rl_batch import MicroBatch

logger = logging.getLogger(__name__)

# derive_seed's tag of dynamic sampling's extra rounds (evaluation's: validation.EVAL_SEED_TAG)
RESAMPLE_SEED_TAG = 8


@dataclass
class RolloutBatch:
    """One step's rollouts on this DP rank, filled in phase by phase."""
    samples: List[Sample]
    answers: List[str]
    rollout_time_s: float  # generating (every round of dynamic sampling), not scoring
    generated_tokens: int = 0  # response tokens the engine generated, kept or not
    # dynamic sampling's metrics (rollout/resample_rounds, ...), over DP; empty when it is off
    sampling_metrics: Dict[str, float] = field(default_factory=dict)
    rewards: Optional[torch.Tensor] = None  # [B]
    response_mask: Optional[torch.Tensor] = None  # [B, longest response]
    advantages: Optional[torch.Tensor] = None  # [B, longest response]
    mini_batches: List[List[MicroBatch]] = field(default_factory=list)
    # mean |trainer log-prob - engine log-prob| per micro-batch (last pipeline stage)
    logprob_diffs: List[float] = field(default_factory=list)


class RLTrainer:
    def __init__(self, cfg, resume: str = "none"):
        """Build everything a run needs from a validated JobConfig: process groups, task, reward
        workers, model (initial checkpoint / warm start / resumed step), reference policy,
        optimizer, rollout engine, metric sinks. `resume`: "none", "auto" (the newest checkpoint
        under training.output_dir/checkpoints, if any) or a checkpoint path. Collective."""
        self.cfg = cfg
        self.model = self.ref_model = self.sinks = None
        self.scorers = None
        self.engine: Optional[RolloutEngine] = None
        self.bar = None
        self._closed = False
        # Pre-emption: SIGTERM (sent by torchrun / Slurm to every rank) and Ctrl-C end the
        # current step, write a checkpoint and exit; the flag is all-reduced so every rank stops
        # together. A second Ctrl-C aborts at once.
        self._stop_signals: List[str] = []
        self._previous_handlers = {sig: signal.signal(sig, self._on_stop_signal)
                                   for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: str) -> None:
        from tqdm import tqdm

        from megatron_rl.checkpointing.checkpoint import resume_candidates
        from megatron_rl.config import to_dict
        from megatron_rl.console import setup_logging
        from megatron_rl.rewards.scoring import Scorers
        from megatron_rl.data.task import build_task
        from megatron_rl.models.gpt import build_gpt_model
        from megatron_rl.parallel import state
        from megatron_rl.rollout.factory import build_rollout_engine
        from megatron_rl.training.actor import build_reference_model
        from megatron_rl.training.optimizer import (build_lr_scheduler, build_optimizer,
                                                    wrap_ddp)
        from megatron_rl.training.sft import warm_start
        from megatron_rl.training.sinks import MetricSinks

        cfg, t, rc, alg = self.cfg, self.cfg.training, self.cfg.rollout, self.cfg.algorithm
        self.info = info = state.initialize(cfg.parallel)
        self.task = build_task(cfg)
        self.reward_faults = {"timeout": 0, "error": 0, "memory": 0, "invalid": 0}
        # One Scorer per reward spec (training's reward.fn, evaluation sets' own), counting
        # faults in reward_faults. Verifiers other than the task's own ("exact") run in worker
        # processes with a timeout (a hung or crashing check scores 0 and is counted, never
        # stalls the step). The task's check is looked up at each call (tests replace it).
        self.scorers = Scorers(cfg.reward, lambda responses, answers: self.task.score(
            responses, answers), self.reward_faults)
        self.scorers(cfg.reward.fn)  # now: a reward.fn that does not import fails here
        self.is_logger = info.is_last_pp_stage and info.tp_rank == 0 and info.dp_rank == 0
        setup_logging(self.is_logger)
        self.out_dir, self.ckpt_root = t.output_dir, os.path.join(t.output_dir, "checkpoints")
        if info.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)

        self.model = wrap_ddp(build_gpt_model(cfg.model, cfg.parallel),
                              t.use_distributed_optimizer)
        # "auto": the checkpoint `latest` names, then the older ones (the first intact one loads)
        resume_from = (resume_candidates(self.ckpt_root) or None) if resume == "auto" else (
            None if resume == "none" else [resume])
        # The reference policy of the KL term (algorithm.kl_ref_coef) is the initial policy. On
        # resume the initial weights are rebuilt the same way (the fresh init of the same seed,
        # the init checkpoint, the cached warm start) and copied before the checkpoint replaces
        # them.
        initial_weights = resume_from is None or alg.kl_ref_coef > 0
        if t.init_checkpoint and initial_weights:
            from megatron_rl.checkpointing.model import load_model

            load_model(self.model, t.init_checkpoint)
            logger.info(f"initial weights from {t.init_checkpoint}")
        if t.sft_steps and initial_weights:
            warm_start(self.model, cfg, info)
        if alg.kl_ref_coef > 0:
            self.ref_model = build_reference_model(self.model, cfg.model, cfg.parallel)
        from megatron_rl.parallel.memory_plan import logprob_chunking_choice

        # log-probs from hidden states in blocks: what the memory planner plans for this config
        self.chunked = logprob_chunking_choice(cfg)
        self.optimizer = build_optimizer([self.model], t, t.use_distributed_optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, t)
        self.step = 0  # the newest step whose update is in the weights
        self.law_points: List[Tuple[float, float]] = []  # (entropy, validation accuracy)
        weight_version = 0
        if resume_from is not None:
            weight_version = self.load(resume_from)
        self.start_step = self.step
        self.nonfinite_in_a_row = 0
        self.guard = DivergenceGuard(t.divergence_steps, t.divergence_grad_norm_ratio,
                                     t.divergence_entropy_jump)
        self.engine = build_rollout_engine(cfg, self.model, self.out_dir, weight_version,
                                           device=info.device.type,
                                           vocab_size=self.task.vocab_size)
        from megatron.core import parallel_state as mpu

        self.dp_group = mpu.get_data_parallel_group()
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.eval_prompts = self.task.eval_prompts[info.dp_rank::info.dp_size]
        self.eval_sets = self._build_eval_sets()
        self.sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p,
                                       top_k=rc.top_k, max_new_tokens=rc.max_new_tokens,
                                       n=alg.n, stop_token_ids=(self.task.eos_id,))
        if self.is_logger:
            self.sinks = MetricSinks(cfg, self.out_dir)
        # The bar only on a terminal: in log files its carriage returns are noise, and the
        # log_interval lines say the same.
        self.bar = tqdm(total=t.steps, initial=self.step,
                        disable=not (self.is_logger and sys.stderr.isatty()),
                        desc="rl", unit="step", dynamic_ncols=True)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from the current step to training.steps (or a SIGTERM): evaluation at step 0,
        then train_step / save each step; plots of the run at the end."""
        t = self.cfg.training
        if self.step == 0 and t.eval_interval:
            self.log(dict(step=0, **self.evaluate(0)))
        try:
            for step in range(self.step + 1, t.steps + 1):
                record = self.train_step(step)
                reason = self.guard.unhealthy(record)
                if self.guard.observe(self.any_rank(reason is not None), reason):
                    self.stop_diverged()
                stop = self.any_rank(bool(self._stop_signals))
                if stop or ((t.checkpoint_interval and step % t.checkpoint_interval == 0)
                            or step == t.steps):
                    # While a divergence streak runs, no periodic checkpoint: the newest stays
                    # one from before it. A stop is always checkpointed (one more than
                    # keep_checkpoints is kept, so that one survives too).
                    if self.guard.streak and not stop:
                        logger.info(f"step {step}: no checkpoint while the run looks diverged "
                                    f"({self.guard.reasons[-1]}; {self.guard.streak} step(s))")
                    else:
                        self.save()
                if stop:
                    what = "/".join(sorted(set(self._stop_signals))) or "a signal on another rank"
                    logger.info(f"{what}: checkpoint of step {step} written to "
                                f"{self.ckpt_root}; exiting (continue with --resume auto)")
                    break
                if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                    from megatron_rl.checkpointing.checkpoint import latest_checkpoint

                    raise SystemExit(
                        f"{self.nonfinite_in_a_row} steps in a row had non-finite gradients "
                        f"(updates skipped, training.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); the newest good checkpoint is "
                        f"{latest_checkpoint(self.ckpt_root)}")
        except EngineError as e:
            # The engines failed for good (every rank raises together). Steps are atomic: the
            # current one either finished training (self.step is it) or left the weights
            # untouched.
            from megatron_rl.checkpointing.checkpoint import latest_checkpoint

            if self.step > self.start_step:
                self.save()
            raise SystemExit(f"rollout engines failed: {e}\nnewest checkpoint: "
                             f"{latest_checkpoint(self.ckpt_root)} (continue with --resume auto)")
        if self.is_logger:
            from megatron_rl.analysis.plots import write_run_plots

            self.sinks.close()
            logger.info(f"plots: {', '.join(write_run_plots(self.out_dir))}")

    def stop_diverged(self) -> None:
        """Stop a diverged run. Its first unhealthy step sampled from the weights of the update
        before it, so the checkpoints from that update on hold diverged weights: they are moved
        to checkpoints/diverged/ and `latest` names the newest one from before."""
        from megatron_rl.checkpointing.checkpoint import set_aside_checkpoints

        g = self.guard
        first = self.step - g.streak + 1
        newest = [None]
        if self.info.rank == 0:
            newest = [set_aside_checkpoints(self.ckpt_root, first - 1)]
        dist.broadcast_object_list(newest, src=0)
        why = g.reasons[0] if g.reasons[0] == g.reasons[-1] else \
            f"{g.reasons[0]}; at step {self.step}: {g.reasons[-1]}"
        kept = (f"the newest checkpoint from before it is {newest[0]} (--resume auto continues "
                f"from it)" if newest[0] else "there is no checkpoint from before it")
        raise SystemExit(f"steps {first}-{self.step} looked diverged (training.divergence_steps="
                         f"{g.steps}): {why}. Checkpoints of diverged weights (step >= "
                         f"{first - 1}) are in {self.ckpt_root}/diverged; {kept}")

    def train_step(self, step: int) -> Dict:
        """One RL step; returns its metrics record (complete on the logging rank)."""
        t0 = time.time()
        batch = self.rollout(step)                          # 1
        self.score(batch)                                   # 2
        self.advantages(batch)                              # 3
        self.old_logprobs(batch)                            # 4
        t1 = time.time()
        step_metrics, probe = self.train(step, batch)       # 5
        train_time_s = time.time() - t1
        self.step = step
        self.sync_weights()                                 # 6
        record = self.step_record(step, batch, step_metrics, probe, train_time_s,
                                  time.time() - t0)         # 7
        t = self.cfg.training
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            record.update(self.evaluate(step))
            if math.isfinite(record.get("entropy", float("nan"))):
                self.law_points.append((record["entropy"], record["eval_accuracy"]))
                from megatron_rl.analysis import entropy_law_metrics

                record.update(entropy_law_metrics(self.law_points))
        self.log(record)
        skipped = any(m.get("nonfinite_skipped") for m in step_metrics)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        return record

    # -- the phases ----------------------------------------------------------------------------

    def rank_share(self, prompts):
        """This DP rank's contiguous share of a step's rollout.prompts_per_step prompts."""
        per_rank = self.cfg.rollout.prompts_per_step // self.info.dp_size
        return prompts[self.info.dp_rank * per_rank: (self.info.dp_rank + 1) * per_rank]

    def rank_prompts(self, step: int):
        """This DP rank's share of the step's (prompt ids, answer) pairs."""
        return self.rank_share(self.task.prompts_for_step(step, self.cfg.rollout.prompts_per_step))

    def rollout(self, step: int) -> RolloutBatch:
        """This DP rank's prompts, algorithm.n samples each. With algorithm.filter_equal_groups:
        resample, dynamic sampling (`resample`) follows, and the batch comes back scored."""
        rc = self.cfg.rollout
        batch = self.generate(self.rank_prompts(step),
                              seed=derive_seed(rc.seed, step, self.info.dp_rank))
        if self.cfg.algorithm.filter_equal_groups == "resample":
            batch = self.resample(step, batch)
        t0 = time.time()
        if rc.async_rollout and step < self.cfg.training.steps:  # the next step's, meanwhile
            self.engine.prefetch([p for p, _ in self.rank_prompts(step + 1)], self.sampling)
        batch.rollout_time_s += time.time() - t0
        return batch

    def generate(self, prompts, seed: int) -> RolloutBatch:
        """`prompts` ((token ids, answer) pairs; may be empty) through the engine. Collective:
        every rank calls it together."""
        t0 = time.time()
        samples = self.engine.generate([p for p, _ in prompts], self.sampling, seed=seed)
        return RolloutBatch(samples=samples, answers=[prompts[s.prompt_index][1] for s in samples],
                            rollout_time_s=time.time() - t0,
                            generated_tokens=sum(len(s.output_ids) for s in samples))

    def resample(self, step: int, batch: RolloutBatch) -> RolloutBatch:
        """Dynamic sampling (DAPO): scores the step's groups and, while any DP rank holds fewer
        than rollout.prompts_per_step / DP informative ones (rewards not all equal), runs an
        extra round on its share of Task.prompts_for_resample(step, round), for at most
        algorithm.resample_max_rounds rounds. Generation is collective, so every rank takes part
        in every round, with no prompts once it has enough (the decision is all-reduced).
        Returns the scored batch of this rank's prompts_per_step / DP groups: the first
        informative ones in draw order, topped up after the last round with uninformative ones,
        which get no loss (as with filter_equal_groups: true)."""
        from megatron_rl.algorithms import informative_groups, keep_groups

        alg, rc, info = self.cfg.algorithm, self.cfg.rollout, self.info
        n, need = alg.n, rc.prompts_per_step // info.dp_size
        self.score(batch)
        drawn = [batch]
        found = int(informative_groups(batch.rewards, n).sum()) // n
        rounds = 0
        while rounds < alg.resample_max_rounds and self.any_rank(found < need):
            rounds += 1
            extra = self.task.prompts_for_resample(step, rounds, rc.prompts_per_step)
            mine = self.rank_share(extra) if found < need else []
            more = self.generate(mine, seed=derive_seed(rc.seed, step, info.dp_rank,
                                                        RESAMPLE_SEED_TAG, rounds))
            self.score(more)
            drawn.append(more)
            found += int(informative_groups(more.rewards, n).sum()) // n
        samples = [s for b in drawn for s in b.samples]
        answers = [a for b in drawn for a in b.answers]
        rewards = torch.cat([b.rewards for b in drawn])
        groups = keep_groups(rewards, n, need)
        rows = [g * n + i for g in groups for i in range(n)]
        kept = RolloutBatch(samples=[samples[r] for r in rows], answers=[answers[r] for r in rows],
                            rewards=rewards[rows],
                            rollout_time_s=sum(b.rollout_time_s for b in drawn),
                            generated_tokens=sum(b.generated_tokens for b in drawn))
        for index, sample in enumerate(kept.samples):
            sample.prompt_index = index // n  # the group's place in the kept batch
        # over DP: prompts drawn, informative groups kept, rewards and responses drawn
        totals = torch.tensor([len(samples) / n, int(informative_groups(kept.rewards, n).sum()) / n,
                               float(rewards.sum()), len(samples)], dtype=torch.float64)
        dist.all_reduce(totals, group=self.dp_group)
        prompts_drawn, informative, reward_sum, responses = totals.tolist()
        kept.sampling_metrics = {"rollout/resample_rounds": rounds,
                                 "rollout/prompts_drawn": prompts_drawn,
                                 "rollout/informative_groups": informative,
                                 "rollout/reward_mean_drawn": reward_sum / responses}
        if informative < rc.prompts_per_step:
            logger.info(f"step {step}: {informative:.0f} of {rc.prompts_per_step} groups "
                        f"informative after {rounds} extra round(s) "
                        f"(algorithm.resample_max_rounds={alg.resample_max_rounds}); the "
                        f"other {rc.prompts_per_step - informative:.0f} get no loss")
        return kept

    def score_texts(self, responses: List[str], answers: List[str]) -> List[float]:
        """Training rewards: reward.fn's Scorer (rewards/scoring.py: the task's check in this
        process, or reward workers with a timeout; a reward that is not a finite number in
        [reward.min_value, reward.max_value] is a verifier fault: 0, counted, logged)."""
        return self.scorers(self.cfg.reward.fn)(responses, answers)

    def score(self, batch: RolloutBatch) -> None:
        if batch.rewards is not None:  # scored in rollout (dynamic sampling)
            return
        responses = [self.task.decode(s.output_ids) for s in batch.samples]
        batch.rewards = torch.tensor(self.score_texts(responses, batch.answers),
                                     dtype=torch.float32)

    def advantages(self, batch: RolloutBatch) -> None:
        """Advantages of each group of n samples (contiguous, on one rank); groups whose rewards
        are all equal are dropped from the loss when algorithm.filter_equal_groups is set."""
        from megatron_rl.algorithms import compute_advantages, informative_groups
        from megatron_rl.training.rl_batch import build_mini_batches, response_mask

        alg, t = self.cfg.algorithm, self.cfg.training
        batch.response_mask = response_mask(batch.samples)
        batch.advantages = compute_advantages(alg, batch.rewards, batch.response_mask)
        keep = informative_groups(batch.rewards, alg.n) if alg.filter_equal_groups else \
            torch.ones_like(batch.rewards, dtype=torch.bool)
        batch.mini_batches = build_mini_batches(batch.samples, batch.advantages, keep,
                                                t.mini_batches, t.micro_batch_size,
                                                self.info.device)

    def old_logprobs(self, batch: RolloutBatch) -> None:
        """The policy that sampled, recomputed by the trainer; and the frozen reference policy's
        when a KL to it is set. Set on the MicroBatches of the last pipeline stage."""
        from megatron_rl.training.actor import compute_logprobs

        temperature, vocab = self.cfg.rollout.temperature, self.task.vocab_size
        for mini in batch.mini_batches:
            old = compute_logprobs(self.model, mini, temperature, vocab, chunked=self.chunked)
            if old is not None:
                for mb, lp in zip(mini, old):
                    mb.old_logprobs = lp
                    m = mb.loss_mask
                    batch.logprob_diffs.append(float(
                        ((lp - mb.rollout_logprobs).abs() * m).sum() / m.sum().clamp(min=1)))
            if self.ref_model is not None:
                ref = compute_logprobs(self.ref_model, mini, temperature, vocab,
                                       chunked=self.chunked)
                if ref is not None:
                    for mb, lp in zip(mini, ref):
                        mb.ref_logprobs = lp

    def train(self, step: int, batch: RolloutBatch):
        """PPO epochs over the mini-batches, one optimizer step each. Every
        training.probe_interval steps the entropy-dynamics probe reads the logits of the first
        micro-batch around the first optimizer step. Returns (per-update metrics, probe)."""
        from megatron_rl.analysis import probe_batch_logits, probe_entropy_dynamics
        from megatron_rl.training.actor import train_mini_batch

        t, alg = self.cfg.training, self.cfg.algorithm
        step_metrics, probe = [], None
        for epoch in range(t.ppo_epochs):
            for index, mini in enumerate(batch.mini_batches):
                probing = (t.probe_interval and step % t.probe_interval == 0
                           and epoch == index == 0)
                if probing:  # logits of a fixed batch around this one optimizer step
                    probe_inputs = mini[:1]
                    before = probe_batch_logits(self.model, probe_inputs)
                # The first optimizer step runs on the weights that computed old_logprobs.
                step_metrics.append(train_mini_batch(
                    self.model, self.optimizer, mini, alg, self.cfg.rollout.temperature,
                    self.task.vocab_size, seed=derive_seed(alg.seed, step, epoch, index),
                    old_is_current=epoch == index == 0, chunked=self.chunked))
                self.scheduler.step(1)
                if probing:
                    after = probe_batch_logits(self.model, probe_inputs)
                    if after is not None:  # the last pipeline stage holds the logits
                        probe = probe_entropy_dynamics(
                            before, after, self.cfg.rollout.temperature, self.tp_group,
                            vocab_size=self.task.vocab_size, mask=probe_inputs[0].loss_mask,
                            dp_group=self.dp_group)
        return step_metrics, probe

    def sync_weights(self) -> None:
        """SGLang engines get the new weights; the built-in engine reads them in place."""
        self.engine.update_weights()

    def _build_eval_sets(self):
        """The evaluation sets (analysis/validation.py eval_specs): data.eval_sets, or the
        task's held-out set, each scored by its reward spec's Scorer."""
        from megatron_rl.analysis.validation import build_eval_sets

        return build_eval_sets(self.cfg, self.task, self.scorers, self.info.dp_rank,
                               self.info.dp_size)

    def evaluate(self, step: int) -> Dict[str, float]:
        """Every evaluation set's metrics, eval/mean/accuracy with data.eval_sets, and
        eval_accuracy: the value of training.law_metric, what the law and the plots use."""
        from megatron_rl.analysis.validation import eval_seed, run_evaluation

        _, record = run_evaluation(
            self.engine, self.eval_sets, self.task.decode, stop_token_ids=(self.task.eos_id,),
            seed=eval_seed(self.cfg.rollout.seed, step, self.info.dp_rank),
            dp_group=self.dp_group, law_metric=self.cfg.training.law_metric)
        return record

    def dp_mean(self, value: float) -> float:
        x = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(x, group=self.dp_group)
        return x.item() / self.info.dp_size

    def step_record(self, step: int, batch: RolloutBatch, step_metrics: List[Dict], probe,
                    train_time_s: float, step_time_s: float) -> Dict:
        """The step's metrics: rewards and rollout statistics, the mean of each update metric,
        throughput, reward-worker faults, the probe's agreement. Collective (DP means)."""
        from megatron_rl.algorithms import rollout_metrics

        t, alg, n_dp = self.cfg.training, self.cfg.algorithm, self.info.dp_size
        record = dict(step=step, reward_mean=self.dp_mean(float(batch.rewards.mean())),
                      lr=self.optimizer.param_groups[0]["lr"],
                      weight_version=self.engine.weight_version,
                      rollout_time_s=batch.rollout_time_s, train_time_s=train_time_s,
                      rollout_weight_version=min(s.weight_version for s in batch.samples),
                      step_time_s=step_time_s)
        record.update({f"rollout/{k}": v for k, v in rollout_metrics(
            batch.rewards, batch.advantages, batch.response_mask, alg.n).items()})
        record.update(batch.sampling_metrics)
        for key in sorted({k for m in step_metrics for k in m}):
            values = [m[key] for m in step_metrics if key in m]  # skipped updates lack most
            record[key] = sum(values) / len(values)
        if batch.logprob_diffs:
            record["rollout_train_logprob_diff"] = (sum(batch.logprob_diffs)
                                                    / len(batch.logprob_diffs))
        response_tokens = self.dp_mean(float(batch.generated_tokens)) * n_dp
        record["rollout_tokens_per_s"] = response_tokens / max(batch.rollout_time_s, 1e-9)
        trained_tokens = self.dp_mean(float(sum(mb.tokens.numel() for mini in batch.mini_batches
                                                for mb in mini))) * n_dp * t.ppo_epochs
        record["train_tokens_per_s"] = trained_tokens / max(train_time_s, 1e-9)
        if self.cfg.reward.fn != "exact" or any(self.reward_faults.values()):
            record.update({f"reward/{k}_total": v for k, v in self.reward_faults.items()})
        if self.task.skipped_rows and step == self.start_step + 1:
            record.update({f"data/skipped_{k}": v for k, v in self.task.skipped_rows.items()})
        if probe is not None:
            record.update(probe.metrics)
            if self.is_logger:
                from megatron_rl.analysis import save_probe

                save_probe(self.out_dir, step, probe)
        return record

    def log(self, record: Dict) -> None:
        """Every record goes to the same sinks (metrics.jsonl, TensorBoard, wandb); step records
        also to the bar and, every training.log_interval steps, a console line."""
        if not self.is_logger:
            return
        self.sinks.write(record)
        step = record["step"]
        entropy = record.get("entropy", float("nan"))
        if step == 0:
            logger.info("step 0: " + " ".join(f"{k} {v:.3f}" for k, v in record.items()
                                              if k != "step"))
            return
        self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", entropy=f"{entropy:.3f}",
                             s_per_step=f"{record['step_time_s']:.2f}",
                             rollout_tok_s=f"{record['rollout_tokens_per_s']:.0f}",
                             train_tok_s=f"{record['train_tokens_per_s']:.0f}")
        self.bar.update(1)
        if step % self.cfg.training.log_interval == 0:
            logger.info(f"step {step}: reward {record['reward_mean']:.3f} entropy "
                        f"{entropy:.4f} " + (f"eval_acc {record['eval_accuracy']:.3f} "
                                             if "eval_accuracy" in record else "")
                        + f"{record['step_time_s']:.2f}s")

    def _on_stop_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and signal.Signals.SIGINT.name in self._stop_signals:
            raise KeyboardInterrupt
        self._stop_signals.append(name)
        if signum == signal.SIGINT:
            logger.info("SIGINT: finishing the current step, then a checkpoint and exit "
                        "(Ctrl-C again to abort without one)")

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (all-reduced: every rank decides the same)."""
        x = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item())

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> Dict:
        """What the trainer itself checkpoints besides model, optimizer and scheduler."""
        return {"weight_version": self.engine.weight_version,
                "law_points": [list(p) for p in self.law_points]}

    def save(self) -> str:
        from megatron_rl.checkpointing.checkpoint import save_checkpoint

        # With the divergence guard on, one more is kept: the newest checkpoint is known good
        # only once the next step's rollouts, sampled from its weights, look healthy.
        keep = self.cfg.training.keep_checkpoints + (1 if self.guard.steps else 0)
        return save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer,
                               self.scheduler, self.state_dict(), keep=keep)

    def load(self, candidates: List[str]) -> int:
        """Model, optimizer, scheduler and trainer state from the first of `candidates` (newest
        first) that verifies and loads; each one skipped is reported, and none loading is a
        CheckpointError. Returns the weight version the engine starts at."""
        from megatron_rl.checkpointing.checkpoint import load_newest_intact

        path, train_state = load_newest_intact(candidates, self.model, self.optimizer,
                                               self.scheduler)
        self.step = train_state["step"]
        self.law_points = [tuple(p) for p in train_state.get("law_points", [])]
        logger.info(f"resumed from {path} at step {self.step}")
        return train_state.get("weight_version", self.step)

    def close(self) -> None:
        """Release everything, whatever state construction or training stopped in: the engine
        (its servers), the reward workers, the sinks, the bar, the process groups. Collective
        when the process groups exist."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None:
            self.engine.shutdown()
        if self.bar is not None:
            self.bar.close()
        if self.scorers is not None:
            self.scorers.close()
        if self.sinks is not None:
            self.sinks.close()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        from megatron_rl.parallel import state

        state.destroy()
